"""Reward functions that misbehave: each fault masks its samples, nothing blocks, no child is left behind."""

import json
import multiprocessing as mp
import re
import time

import pyarrow as pa
import pytest
import torch

from distpg.config import TaskConfig
from distpg.learner import Learner
from distpg.orchestrator import TrainingError, train
from distpg.rewards import RewardError, score
from distpg.rollout import reward_isolation
from distpg.tasks import make_task
from tests.conftest import small_config

PROMPTS = ["abc=", "xyz=", "aaa=", "zzz="]  # two below "m", two above
COMPLETIONS = ["ok", "ok", "no", "ok"]


def misbehaving(fault):
    return make_task(TaskConfig(name="tests.user_task:misbehaving", params={"fault": fault}))


def no_children_left():
    return not mp.active_children()


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_raising_on_some_samples_masks_only_those(isolation):
    rewards, ok, errors, _ = score(misbehaving("some_raise"), PROMPTS, COMPLETIONS, isolation, timeout_s=20)
    assert ok == [False, True, False, True] and rewards == [0.0, 1.0, 0.0, 1.0]
    assert len(errors) == 2 and errors[0].startswith("KeyError")
    assert no_children_left()


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_nan_and_none_are_masked_and_all_failed_is_an_error(isolation):
    with pytest.raises(RewardError, match="failed on all 4 samples"):
        score(misbehaving("nan"), PROMPTS, COMPLETIONS, isolation, timeout_s=20)


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_a_batch_that_every_function_returns_none_for_is_masked_not_an_error(isolation):
    """None says a function does not apply (TRL's convention; TRL warns and trains on): a batch that no function
    scores is masked, not the RewardError of a broken function. One that also raised on a sample still is,
    naming that sample's failure."""
    from distpg.rewards import NOT_SCORED, RewardFunction

    class Task:
        name = "several"
        reward_functions = [RewardFunction("a", lambda p, c: None), RewardFunction("b", lambda ps, cs: [None] * 4,
                                                                                  batched=True)]

    rewards, ok, errors, parts = score(Task(), PROMPTS, COMPLETIONS, isolation, timeout_s=20)
    assert rewards == [0.0] * 4 and ok == [False] * 4 and errors == [NOT_SCORED[1]] * 4
    assert parts == {"a": [None] * 4, "b": [None] * 4}
    Task.reward_functions[0] = RewardFunction("a", lambda p, c: 1 / 0 if p == "aaa=" else None)
    with pytest.raises(RewardError, match=re.escape("failed on all 4 samples (3 of them got None from every "
                                                    "function); first failure, for prompt 'aaa=' and completion "
                                                    "'no': a: ZeroDivisionError")):
        score(Task(), PROMPTS, COMPLETIONS, isolation, timeout_s=20)


def test_wrong_length_fails_the_batch():
    task = make_task(TaskConfig(name="tests.user_task:wrong_length"))
    with pytest.raises(RewardError, match="reward_batch returned 3 values for 4 samples"):
        score(task, PROMPTS, COMPLETIONS, "process", timeout_s=20)


def test_a_hanging_reward_is_killed_at_the_timeout():
    t0 = time.perf_counter()
    rewards, ok, errors, _ = score(misbehaving("hang"), PROMPTS, COMPLETIONS, "process", timeout_s=1.0)
    elapsed = time.perf_counter() - t0
    assert ok == [False] * 4 and "did not finish within rollout.reward_timeout_s=1s" in errors[0]
    assert elapsed < 1.0 + 30  # the function sleeps an hour: returning at all proves the timeout fired
    assert no_children_left()


def test_a_reward_that_kills_its_own_process_is_contained():
    rewards, ok, errors, _ = score(misbehaving("suicide"), PROMPTS, COMPLETIONS, "process", timeout_s=20)
    assert ok == [False] * 4 and "the reward process died (exit code -9)" in errors[0]
    assert no_children_left()


def test_steps_whose_rewards_all_failed_stop_the_run_after_max_consecutive_skips_with_the_error():
    """A reward that timed out on every sample had a run "succeed" with reward nan at every step (a helper's
    trial): such a step teaches nothing. learner.max_consecutive_skips of them in a row are let go (a service
    down for a while); the next raises the last failure before the update changes anything (the version stays:
    the driver checkpoints the step before), and a step with a scored reward resets the count."""
    from distpg.rollout import RolloutWorker

    cfg = small_config("task.name=tests.user_task:misbehaving", "task.params={fault: hang}", "rollout.num_workers=1",
                       "rollout.reward_timeout_s=0.5", "learner.max_consecutive_skips=1")
    learner, worker = Learner(cfg), RolloutWorker(cfg, 0)
    weights = learner.get_weights()
    hung = worker.sample(["abca", "bcda"], [0, 1], seed=0, weights=weights)
    assert not any(hung.column("reward_ok").to_pylist())
    learner.learn(hung)  # the first is let go
    assert learner.version == 1 and learner.consecutive_skips == 1
    before = [p.detach().clone() for p in learner.model.parameters()]
    with pytest.raises(RewardError, match=re.escape(
            "no sample's reward was scored in 2 steps in a row (the last: the reward function did not finish within "
            "rollout.reward_timeout_s=0.5s); learner.max_consecutive_skips=1: nothing is learned")):
        learner.learn(hung)
    assert learner.version == 1 and all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))
    scored = hung.set_column(hung.schema.get_field_index("reward_ok"), "reward_ok",
                             pa.array([True] * hung.num_rows))  # as if the service came back
    learner.learn(scored)
    assert learner.version == 2 and learner.consecutive_skips == 0
    learner.learn(hung)  # let go again
    assert learner.version == 3


def shares(cfg, step: int) -> list[tuple[list[str], list[int]]]:
    """The prompts and ids of each worker's share of `step`, as the driver splits them."""
    from distpg.orchestrator import split, step_prompts

    prompts, ids = step_prompts(make_task(cfg.task), cfg, step)
    n = cfg.rollout.num_workers
    return list(zip(split(prompts, n), split(ids, n)))


def test_whether_failed_rewards_stop_the_run_is_decided_per_step_not_per_workers_share():
    """A reward function that raised on every sample of one worker's share stopped the run (RewardError in that
    worker), so the more workers shared a step, the likelier a partly failing function stopped it. It is the
    step's samples that count: that share is masked where another share of the step was scored, and the run
    stops where none was, naming the first failure; timeouts and samples no function applies to do not."""
    from distpg.rewards import step_failure
    from distpg.rollout import RolloutWorker

    cfg = small_config("task.name=tests.user_task:misbehaving", "rollout.num_workers=2")
    (p0, i0), (p1, i1) = shares(cfg, 1)
    cfg = small_config("task.name=tests.user_task:misbehaving", "rollout.num_workers=2",
                       f"task.params={{fault: listed, prompts: {json.dumps(p0)}}}")
    worker = RolloutWorker(cfg, 0)  # samples both shares (a worker's id only labels its rows)
    worker.set_weights(Learner(cfg).get_weights())
    b0, b1 = worker.sample(p0, i0, seed=0), worker.sample(p1, i1, seed=1)  # no RewardError from the worker
    assert not any(b0.column("reward_ok").to_pylist()) and all(b1.column("reward_ok").to_pylist())
    assert step_failure(cfg.task.name, [b0, b1]) is None  # the step learns from the second share
    why = step_failure(cfg.task.name, [b0])  # had the first share been the whole step
    assert why.startswith("the reward of task 'tests.user_task:misbehaving' failed on all 8 samples of the step; "
                          f"first failure, for prompt {p0[0]!r} and completion ")
    assert why.endswith(f": KeyError: {p0[0]!r}")
    for fault in ("hang", "nan"):  # a hung child's samples, and samples no function scored, are masked
        cfg = small_config("task.name=tests.user_task:misbehaving", f"task.params={{fault: {fault}}}",
                           "rollout.reward_timeout_s=0.5")
        worker = RolloutWorker(cfg, 0)
        worker.set_weights(Learner(cfg).get_weights())
        batch = worker.sample(["zab=", "zcd="], [0, 1], seed=0)  # "nan": None for prompts from "m" on
        assert not any(batch.column("reward_ok").to_pylist()) and step_failure(cfg.task.name, [batch]) is None


@pytest.mark.ray
def test_a_share_whose_every_reward_failed_is_masked_where_the_rest_of_the_step_was_scored(ray_session, tmp_path,
                                                                                         capsys):
    """End to end with 2 workers: the function raises on every prompt of worker 0's share of step 1, so that
    share is all failed; the run trains on, the 8 samples masked, counted and said."""
    cfg = small_config("task.name=tests.user_task:misbehaving", "rollout.num_workers=2", "run.steps=2")
    (p0, _), _ = shares(cfg, 1)
    cfg = small_config("task.name=tests.user_task:misbehaving", "rollout.num_workers=2", "run.steps=2",
                       f"task.params={{fault: listed, prompts: {json.dumps(p0)}}}")
    assert train(cfg, tmp_path / "r")["steps"] == 2
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rollout/failed_rewards"] == 8 and first["policy/version"] == 1
    assert "distpg: warning: step 1: the reward failed for 8 of its 16 samples" in capsys.readouterr().out


@pytest.mark.ray
@pytest.mark.slow  # end to end; the default run checks its parts more cheaply (the docstring)
def test_training_goes_on_through_a_hanging_reward_then_stops(ray_session, tmp_path, capsys):
    """A reward function that hangs on every sample: each step's samples are masked, counted and said, and the
    run goes on for learner.max_consecutive_skips steps, then stops with the error. Its parts in the default run:
    the reward child killed at rollout.reward_timeout_s, in this process (test_a_hanging_reward_is_killed_at_the_
    timeout), the learner's count (test_steps_whose_rewards_all_failed_stop_the_run_after_max_consecutive_skips_
    with_the_error), and a run going on through rewards that fail in their child, masked and counted each step
    (test_the_prompts_tasks_reward_function_runs_in_a_child_by_default)."""
    cfg = small_config("task.name=tests.user_task:misbehaving", "task.params={fault: hang}",
                       "rollout.reward_timeout_s=1", "run.steps=5", "learner.max_consecutive_skips=2")
    t0 = time.perf_counter()
    with pytest.raises(TrainingError, match=r"learner update of step 3 failed: RewardError: no sample's reward was "
                                            r"scored in 3 steps in a row \(the last: the reward function did not "
                                            r"finish within rollout.reward_timeout_s=1s\)") as e:
        train(cfg, tmp_path / "r")
    elapsed = time.perf_counter() - t0
    assert e.value.last_step == 2
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["rollout/failed_rewards"] == 16 for r in recs)  # every sample masked, counted
    assert [r["policy/version"] for r in recs] == [1, 2]
    assert "distpg: warning: step 1: the reward failed for 16 of its 16 samples" in capsys.readouterr().out
    assert elapsed < 3 * (1 + 30) + 60  # not the hour the reward function asked for


@pytest.mark.ray
@pytest.mark.parametrize("layout", [["rollout.num_workers=1"], ["rollout.colocate=true", "rollout.num_workers=1"]],
                         ids=["actors", "colocated"])  # one worker, in an actor of its own or in the learner's
def test_a_reward_function_that_breaks_mid_run_stops_it_with_the_last_step_checkpointed(ray_session, tmp_path,
                                                                                       layout):
    """The reward service goes down at step 4 (every sample fails): the run stops with the function's error,
    and with step 3 checkpointed (run.checkpoint_every=2 alone would keep step 2), so fixing the reward and
    resuming redoes no update."""
    from distpg import checkpoint
    from distpg.checkpoint import resume_hint
    from distpg.orchestrator import TrainingError

    counter = tmp_path / "calls"
    cfg = small_config("task.name=tests.user_task:misbehaving", "run.steps=6",
                       f"task.params={{fault: after, calls: 48, counter: '{counter}'}}", *layout)  # 3 x 16 samples
    with pytest.raises(TrainingError, match="step 4 .*failed: RewardError: .*reward service unavailable") as e:
        train(cfg, tmp_path / "r")
    assert checkpoint.run_state(checkpoint.latest(tmp_path / "r"))["step"] == 3
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 3
    assert resume_hint(tmp_path / "r", 6, e.value.last_step) == (
        f"the latest checkpoint is step 3, the last step done: nothing is lost; continue with: "
        f"distpg train --resume {tmp_path / 'r'}")


class SlowThirdUpdate(Learner):
    """A learner whose third update takes a second: the shares of step 4 come back while it runs."""

    def update(self, *batches):
        if self.version == 2:
            time.sleep(1.0)
        return super().update(*batches)


@pytest.mark.ray
def test_in_async_mode_a_reward_function_that_breaks_stops_the_run_with_its_last_update_checkpointed(
        ray_session, tmp_path, monkeypatch):
    """As above with workers sampling a step ahead of the learner: step 4's shares fail while the learner applies
    step 3's update, which is logged and checkpointed before the run stops (a checkpoint taken at once would
    hold that update under step 2's number; none at all was taken before)."""
    from distpg import checkpoint
    from distpg.checkpoint import resume_hint
    from distpg.orchestrator import Trainer, TrainingError

    monkeypatch.setattr(Trainer, "learner_class", SlowThirdUpdate)
    counter = tmp_path / "calls"
    # one worker: its shares run one after another, so step 4's (the first to fail) always comes back during
    # update 3 (with two, under load one worker's step 4 failed while the other still sampled step 3)
    cfg = small_config("task.name=tests.user_task:misbehaving", "run.steps=8", "run.mode=async",
                       "algo.max_staleness=1", "run.checkpoint_every=100", "rollout.num_workers=1",
                       f"task.params={{fault: after, calls: 48, counter: '{counter}'}}")  # 3 x 16 samples
    with pytest.raises(TrainingError, match="step 4 .*failed: RewardError: .*reward service unavailable") as e:
        train(cfg, tmp_path / "r")
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and e.value.last_step == 3
    saved = checkpoint.latest(tmp_path / "r")
    assert checkpoint.run_state(saved)["step"] == 3
    assert json.loads((saved / "state.json").read_text())["version"] == 3  # step 3's update, no later one
    assert resume_hint(tmp_path / "r", 8, 3) == (
        f"the latest checkpoint is step 3, the last step done: nothing is lost; continue with: "
        f"distpg train --resume {tmp_path / 'r'}")


@pytest.mark.ray
def test_in_async_mode_a_failure_held_for_the_step_the_run_stops_at_is_said(ray_session, tmp_path, monkeypatch,
                                                                              capsys):
    """As above, but step 3's record also ends the run (its stop rule, here forced): the run ends at step 3,
    checkpointed, and the held failure of step 4's share is printed, not dropped. One worker: its shares run one
    after another, so step 4's (the first to fail) always comes back while the learner applies update 3 (with
    two, a worker's step 4 could fail while the other still sampled step 3, before any update was in flight)."""
    from distpg import checkpoint, orchestrator
    from distpg.orchestrator import Trainer

    monkeypatch.setattr(Trainer, "learner_class", SlowThirdUpdate)
    monkeypatch.setattr(orchestrator, "stop_reward_reached", lambda cfg, recent: len(recent) == 3)
    counter = tmp_path / "calls"
    cfg = small_config("task.name=tests.user_task:misbehaving", "run.steps=8", "run.mode=async",
                       "algo.max_staleness=1", "run.checkpoint_every=100", "rollout.num_workers=1",
                       f"task.params={{fault: after, calls: 48, counter: '{counter}'}}")  # 3 x 16 samples
    assert train(cfg, tmp_path / "r")["steps"] == 3
    assert checkpoint.run_state(checkpoint.latest(tmp_path / "r"))["step"] == 3
    out = capsys.readouterr().out
    assert "distpg: warning: rollout of step 4 failed: RewardError" in out and "reward service unavailable" in out


def strict(constant: str):
    raise ValueError(f"metrics.jsonl holds {constant}, which strict JSON parsers reject")


@pytest.mark.ray
def test_the_prompts_tasks_reward_function_runs_in_a_child_by_default(ray_session, tmp_path):
    """task.name=prompts with a user's task.reward: `rollout.reward_isolation: auto` runs it in a child, so
    a function that kills its own process costs its batches, not the workers (nor the run)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}:", "reference": w}) + "\n"
                               for w in ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"]))
    # one rollout worker: one actor fewer to start (its reward child dies as each of two would)
    cfg = small_config("task.name=prompts", f"task.prompts_path={prompts}", "task.num_eval=2",
                       "task.reward=tests.user_rewards:kills_its_process", "run.steps=2", "rollout.max_restarts=0",
                       "rollout.num_workers=1")
    assert reward_isolation(cfg) == "process"
    train(cfg, tmp_path / "r")
    recs = [json.loads(x, parse_constant=strict) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["rollout/failed_rewards"] == 16 for r in recs)  # every sample masked, counted
    assert all(r["rollout/reward_mean"] is None for r in recs)  # no reward to average: null, strict JSON
    assert reward_isolation(small_config()) == "none"  # the built-in tasks score in the worker
    assert reward_isolation(small_config("task.name=tests.user_task:make")) == "process"
    assert reward_isolation(small_config("task.name=tests.user_task:make", "rollout.reward_isolation=none")) == "none"


@pytest.mark.ray
def test_steps_no_reward_function_scores_are_masked_with_a_warning_and_the_run_goes_on(ray_session, tmp_path,
                                                                                        capsys):
    """A function returning None for every sample of a worker's share (TRL's "does not apply"; TRL warns and
    trains on) stopped the run as a broken one. Now each step says how many of its samples got no reward, those
    rows are reward_ok false in the rollouts and counted in rollout/failed_rewards, they carry no gradient (no
    optimizer step where none was scored), and the run goes on. Seed 2 draws only vowel words (None) for step
    5, a consonant in each of steps 1-4 and 6: a step with no reward is left out of run.stop_reward's window
    (its NaN held the mean there for 5 steps), so the run stops after the 5 steps with one, at step 6."""
    import pyarrow.parquet as pq

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}:"}) + "\n"
                               for w in ["ant", "eel", "owl", "emu", "ape", "cat", "dog", "fox"]))
    cfg = small_config("task.name=prompts", f"task.prompts_path={prompts}", "task.num_eval=2", "run.seed=2",
                       "run.steps=8", "run.stop_reward=0", "rollout.num_workers=1",
                       "task.reward=tests.user_rewards:length_unless_vowel")
    assert train(cfg, tmp_path / "r")["steps"] == 6
    rows = pq.read_table(tmp_path / "r" / "rollouts").to_pylist()
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    out = capsys.readouterr().out
    assert "reached run.stop_reward=0.0; stopping at step 6" in out
    for rec in recs:
        step = [r for r in rows if r["step"] == rec["step"]]
        vowel = [r["prompt_text"].split()[1][0] in "aeiou" for r in step]
        assert [r["reward_ok"] for r in step] == [not v for v in vowel]
        assert rec["rollout/failed_rewards"] == sum(vowel)
        assert (f"distpg: warning: step {rec['step']}: {sum(vowel)} of its 16 samples got no reward" in out) == \
            any(vowel)
        assert (rec["learner/grad_norm"] == 0) == all(vowel) == (rec["step"] == 5)


def test_none_for_every_sample_of_the_first_step_is_a_forgotten_return_and_later_a_warning(tmp_path, capsys):
    """A function that forgot its `return` gives None for every sample: where that is the whole of the run's first
    step, the driver stops the run, saying so, rather than train on nothing with a warning a step; at a later
    step it is a warning (a resumed run never redoes the first step: it stops where the uninterrupted one
    would). The worker's batch, scored in its reward child, says how many samples no function scored."""
    from distpg.orchestrator import Throttle, say_not_scored
    from distpg.rollout import RolloutWorker

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}:"}) + "\n" for w in ["ant", "bee", "cat", "dog"]))
    cfg = small_config("task.name=prompts", f"task.prompts_path={prompts}", "task.num_eval=1",
                       "task.reward=tests.user_rewards:forgot_return")
    learner, worker = Learner(cfg), RolloutWorker(cfg, 0)
    worker.set_weights(learner.get_weights())
    batch = worker.sample(["say ant:", "say bee:"], [0, 1], seed=0)
    assert batch.schema.metadata[b"not_scored"] == b"8"
    with pytest.raises(TrainingError, match="every reward function returned None for all 8 samples of the run's "
                                            "first step: a function that forgot its `return` does that"):
        say_not_scored(1, [batch], Throttle(3))
    throttle = Throttle(3)  # log.print_every=3: said at step 2, then at 5 with the count of steps 3-5
    for step in range(2, 7):
        say_not_scored(step, [batch], throttle)
    out = capsys.readouterr().out
    warned = re.findall(r"distpg: warning: step (\d+): 8 of its 8 samples got no reward"
                        r"( \(\d+ in all since step \d+'s warning\))? \(every", out)
    assert warned == [("2", ""), ("5", " (24 in all since step 2's warning)")]


@pytest.mark.ray
@pytest.mark.slow  # ~5 s: the in-process test above checks the rule
def test_a_reward_function_that_forgot_its_return_stops_the_run_at_its_first_step(ray_session, tmp_path):
    """None for every sample of the run's first step is a function returning nothing at all: the run stops
    there, saying so, rather than training on nothing with a warning a step."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}:"}) + "\n" for w in ["ant", "bee", "cat", "dog"]))
    cfg = small_config("task.name=prompts", f"task.prompts_path={prompts}", "task.num_eval=1",
                       "rollout.num_workers=1", "task.reward=tests.user_rewards:forgot_return")
    with pytest.raises(TrainingError, match="every reward function returned None for all 16 samples of the run's "
                                            "first step: a function that forgot its `return` does that"):
        train(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.ray
def test_a_trl_style_reward_function_scores_a_training_run(ray_session, tmp_path):
    """A TRL reward function (a batch, the file's columns as keyword lists) on real workers, in their reward
    child: every rollout row's reward is its own prompt's `id` / 100 (plus 1 for the answer, never produced by
    an untrained policy), so the columns reached it aligned with the samples."""
    import pyarrow.parquet as pq

    words = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}:", "answer": w * 3, "id": i}) + "\n"
                               for i, w in enumerate(words)))
    cfg = small_config("task.name=prompts", f"task.prompts_path={prompts}", "task.num_eval=2",
                       "task.reward=tests.user_rewards:trl_style", "run.steps=2")
    train(cfg, tmp_path / "r")
    rows = pq.read_table(tmp_path / "r" / "rollouts").to_pylist()
    assert len(rows) == 2 * 16 and all(r["reward_ok"] for r in rows)
    ids = {f"say {w}:": i for i, w in enumerate(words)}
    assert [r["reward"] for r in rows] == pytest.approx([ids[r["prompt_text"]] / 100 for r in rows])
    assert len({r["prompt_text"] for r in rows}) > 1


@pytest.mark.ray
def test_an_evaluation_whose_reward_function_fails_is_reported_and_training_goes_on(ray_session, tmp_path, capsys):
    # one rollout worker: one actor fewer to start (the learner evaluates)
    cfg = small_config("task.name=tests.user_task:misbehaving", "task.params={fault: held_out}", "run.steps=2",
                       "run.eval_every=1", "rollout.num_workers=1")
    assert train(cfg, tmp_path / "r")["steps"] == 2
    out = capsys.readouterr().out
    assert out.count("distpg: the evaluation after step") == 2 and "LookupError: no grader for held-out prompts" in out
    assert "training goes on" in out and not (tmp_path / "r" / "eval.jsonl").exists()


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_several_reward_functions_are_a_weighted_sum_that_leaves_out_a_none(isolation):
    """TRL's reward_funcs with reward_weights: each sample's reward is the weighted sum of the values its
    functions give it (a None leaves that function out); a sample none scores is masked; each one's values come
    back by name, also from the reward child."""
    from distpg.rewards import RewardFunction

    class Task:
        name = "several"
        reward_functions = [
            RewardFunction("a", lambda p, c: {"abc=": 1.0, "xyz=": None, "aaa=": None, "zzz=": 2}[p], weight=0.5),
            RewardFunction("b", lambda ps, cs: [None if p == "aaa=" else 3 for p in ps], batched=True, weight=-1.0),
        ]

    rewards, ok, errors, parts = score(Task(), PROMPTS, COMPLETIONS, isolation, timeout_s=20)
    assert rewards == [0.5 * 1 - 3, -3.0, 0.0, 0.5 * 2 - 3] and ok == [True, True, False, True]
    assert errors == ["every reward function returned None for this sample (none applies to it)"]
    assert parts == {"a": [1.0, None, None, 2.0], "b": [3.0, 3.0, None, 3.0]}


def test_one_reward_function_failing_masks_its_samples_however_the_others_score_them():
    from distpg.rewards import RewardFunction, score_each

    def flaky(prompt, completion):
        if prompt == "xyz=":
            raise KeyError(prompt)
        return 1.0

    class Task:
        name = "several"
        reward_functions = [RewardFunction("ok", lambda ps, cs: [1.0] * len(ps), batched=True),
                            RewardFunction("flaky", flaky)]

    rewards, ok, errors, parts = score_each(Task(), PROMPTS, COMPLETIONS)
    assert ok == [True, False, True, True] and rewards == [2.0, 0.0, 2.0, 2.0]
    assert errors == ["flaky: KeyError: 'xyz='"]
    assert parts == {"ok": [1.0] * 4, "flaky": [1.0, None, 1.0, 1.0]}
    Task.reward_functions[0] = RewardFunction("short", lambda ps, cs: [1.0], batched=True)  # the wrong length
    with pytest.raises(RewardError, match="the reward functions of task 'several' failed on all 4 samples; .*: "
                                          "short: ValueError: short returned 1 values for 4 samples"):
        score(Task(), PROMPTS, COMPLETIONS)


@pytest.mark.ray
def test_several_reward_functions_score_a_training_run_and_eval_every_scores_a_test_file(ray_session, tmp_path,
                                                                                         monkeypatch, capsys):
    """One run of the same prompts and reward functions for what two runs showed (a runtime's actors started once):

    task.reward as a list with task.reward_weights, on real workers in their reward child: every rollout
    row's reward is the weighted sum of the per-sample and the TRL-style function's values, each kept in its
    own column (null where it returned None); a row neither scores is masked; metrics.jsonl has each one's
    mean and std per step.

    task.eval_prompts_path (TRL's eval_dataset): run.eval_every scores every prompt of that file, with the run's
    tokenizer, reward functions (the file's own columns) and budget, as `distpg eval --prompts` scores the
    checkpoint of the same step; a path relative to the driver's folder reaches the learner actor."""
    import numpy as np
    import pyarrow.parquet as pq

    from distpg.evaluate import evaluate, load_policy

    words = ["ant", "bee", "cat", "owl", "eel", "fox", "gnu", "emu"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"say {w}:", "id": i}) + "\n"
                                                  for i, w in enumerate(words)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"prompt": p, "id": 20 + i}) + "\n"
                                                 for i, p in enumerate(["say gnat:", "say nag:", "say one:"])))
    monkeypatch.chdir(tmp_path)  # the learner actor runs in the Ray session's folder, not this one
    cfg = small_config("task.name=prompts", "task.prompts_path=train.jsonl", "task.num_eval=2", "run.steps=2",
                       "task.reward=[tests.user_rewards:length_unless_vowel, tests.user_rewards:id_unless_zero]",
                       "task.reward_weights=[0.5, 2]", "task.eval_prompts_path=test.jsonl", "run.eval_every=2")
    train(cfg, tmp_path / "r")
    (evaluation,) = [json.loads(x) for x in (tmp_path / "r" / "eval.jsonl").read_text().splitlines()]
    assert evaluation["prompts"] == str(tmp_path / "test.jsonl")  # made absolute for the actors
    assert evaluation["eval/num_prompts"] == 3 and evaluation["eval/left_out"] == 0
    res = evaluate(*load_policy(tmp_path / "r" / "checkpoints" / "step_000002"), prompts_path="test.jsonl")
    assert evaluation["eval/reward_mean"] == res.reward_mean
    assert evaluation["eval/rewards/id_unless_zero"] == pytest.approx(0.21) == res.reward_parts["id_unless_zero"]
    assert {"eval/rewards/length_unless_vowel", "eval/rewards/id_unless_zero"} <= set(evaluation)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("eval "))
    assert f"| id_unless_zero {evaluation['eval/rewards/id_unless_zero']:.3f} |" in line
    rows = pq.read_table(tmp_path / "r" / "rollouts").to_pylist()
    assert len(rows) == 2 * 16
    ids = {f"say {w}:": i for i, w in enumerate(words)}
    for r in rows:
        word = r["prompt_text"].split()[1][:-1]
        length = None if word[0] in "aeiou" else float(len(r["completion_text"]))
        id_ = None if ids[r["prompt_text"]] == 0 else ids[r["prompt_text"]] / 100
        assert r["reward/length_unless_vowel"] == length
        assert r["reward/id_unless_zero"] == pytest.approx(id_)
        assert r["reward_ok"] == (word != "ant")  # "ant": a vowel and id 0, scored by neither
        if r["reward_ok"]:
            assert r["reward"] == pytest.approx(0.5 * (length or 0) + 2 * (id_ or 0))
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for rec in recs:
        step = [r for r in rows if r["step"] == rec["step"]]
        for name in ("length_unless_vowel", "id_unless_zero"):
            values = [r[f"reward/{name}"] for r in step if r[f"reward/{name}"] is not None]
            if not values:  # it scored no sample of this step: null (strict JSON)
                assert rec[f"rollout/rewards/{name}/mean"] is None and rec[f"rollout/rewards/{name}/std"] is None
                continue
            assert rec[f"rollout/rewards/{name}/mean"] == pytest.approx(np.mean(values), rel=1e-6)
            assert rec[f"rollout/rewards/{name}/std"] == pytest.approx(np.std(values), rel=1e-5, abs=1e-7)
        assert rec["rollout/failed_rewards"] == sum(r["prompt_text"] == "say ant:" for r in step)
    assert any(r["prompt_text"] == "say ant:" for r in rows)  # scored by neither
    assert any(r["reward/length_unless_vowel"] is None and r["reward_ok"] for r in rows)  # by one


def test_a_bool_is_a_reward_and_a_value_beyond_float32_is_masked():
    """`return completion == target` gives 1.0/0.0; a finite Python float that float32 (the batch's reward
    column) cannot hold masks its sample instead of reaching the learner as inf."""
    import numpy as np

    from distpg.rewards import score_each

    class Task:
        values = [True, np.bool_(False), 1e39, -3.0e38]

        def reward(self, prompt, completion):
            return self.values[PROMPTS.index(prompt)]

    rewards, ok, errors, _ = score_each(Task(), PROMPTS, COMPLETIONS)
    assert rewards == [1.0, 0.0, 0.0, -3.0e38] and ok == [True, True, False, True]
    assert errors == ["ValueError: returned 1e+39, beyond float32's range (±3.4e38), in which rewards are stored"]
    assert np.isfinite(np.float32(rewards[3]))


@pytest.mark.parametrize("returned, named", [("1.0", "'1.0' (a str)"), (1.0, "1.0 (a float)"),
                                              (None, "None (a NoneType)"), ({"a": 1.0}, "{'a': 1.0} (a dict)")])
def test_a_batched_function_returning_one_value_instead_of_a_list_is_named_as_such(returned, named):
    """A TRL-style function that returns a string (whose characters would count as "values"), a single
    number or None instead of a list is an error saying what it returned, not "3 values for 4 samples" or
    "'float' object is not iterable"."""
    from distpg.rewards import RewardFunction

    class Task:
        name = "one"
        reward_functions = [RewardFunction("judge", lambda ps, cs: returned, batched=True)]

    with pytest.raises(RewardError, match=re.escape(f"ValueError: judge returned {named}, expected a list of 4 "
                                                    "values, one per sample")):
        score(Task(), PROMPTS, COMPLETIONS)


def test_a_zero_dim_tensor_or_array_is_a_reward_and_other_values_name_their_type():
    """`return torch.tensor(score)` (as OpenRLHF's reward functions return tensors) or a 0-dim numpy array
    counts as its number; a list or a 1-element tensor is masked with an error naming its type."""
    import numpy as np
    import torch

    from distpg.rewards import score_each

    class Task:
        values = [torch.tensor(0.5), np.array(0.25), torch.tensor([0.5]), "0.5"]

        def reward(self, prompt, completion):
            return self.values[PROMPTS.index(prompt)]

    rewards, ok, errors, _ = score_each(Task(), PROMPTS, COMPLETIONS)
    assert rewards == [0.5, 0.25, 0.0, 0.0] and ok == [True, True, False, False]
    assert errors[0] == ("ValueError: returned tensor([0.5000]) (a Tensor), expected a finite number: a float, "
                         "an int, a bool or a 0-dim numpy/torch value")
    assert errors[1].startswith("ValueError: returned '0.5' (a str), expected a finite number")


def test_a_trl_style_function_gets_each_completions_token_ids(tmp_path):
    """TRL's `completion_ids`: each completion's token ids (its <eos> included where sampled), aligned with the
    completions, in the reward child: the function's reward is their number, the batch's completion_tokens'."""
    from distpg.rollout import RolloutWorker

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}:", "answer": w}) + "\n"
                               for w in ["ant", "bee", "cat", "dog", "eel"]))
    cfg = small_config("task.name=prompts", f"task.prompts_path={prompts}", "task.num_eval=1",
                       "task.reward=tests.user_rewards:trl_with_completion_ids")
    worker = RolloutWorker(cfg, 0)
    assert worker.reward_isolation == "process"
    batch = worker.sample(["say ant:", "say bee:"], [0, 1], seed=0, weights=Learner(cfg).get_weights()).to_pylist()
    assert [r["reward"] for r in batch] == [float(len(r["completion_tokens"])) for r in batch]
    assert len({r["reward"] for r in batch}) > 1
