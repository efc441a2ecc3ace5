"""`distpg eval`'s scoring on a real (briefly trained) policy and its exact-match rule."""

import json

import pytest

from distpg import kernels
from distpg.checkpoint import CheckpointError
from distpg.evaluate import evaluate, exact_match, resolve_checkpoint
from distpg.learner import Learner
from distpg.policy import task_for
from tests.conftest import small_config


@pytest.mark.parametrize("completion, target, same", [
    (" river", "river", True),  # a GPT-2-style completion starts with a space
    ("river\n", "river", True),
    ("dcba", "dcba", True),
    ("dcb a", "dcba", False),  # whitespace inside counts
    ("dcb", "dcba", False),
    ("", "", True),
])
def test_exact_match_ignores_whitespace_at_the_ends_only(completion, target, same):
    assert exact_match(completion, target) is same


def test_evaluate_counts_exact_matches_of_the_greedy_completions(pack_every_weight):
    cfg = small_config()
    learner = Learner(cfg)
    result = evaluate(cfg, learner.model.eval())
    assert result.num_prompts == len(result.samples) > 0
    expected = sum(exact_match(c, t) for _, c, t, _ in result.samples) / result.num_prompts
    assert result.exact_match == expected
    # greedy decoding is deterministic: the same policy gives the same completions
    again = evaluate(cfg, learner.model)
    assert [s[1] for s in again.samples] == [s[1] for s in result.samples]
    assert learner.model not in kernels._packs  # the pre-packed weights do not outlive the call
    # the reward is the task's own on each completion
    task = task_for(cfg)
    assert [task.reward(p, c) for p, c, _, _ in result.samples] == [r for *_, r in result.samples]


def test_eval_gives_each_reward_function_s_mean_beside_the_sum(tmp_path, pack_every_weight):
    """With several reward functions (task.reward a list), eval's result has each one's mean over the held-out
    prompts it scored (what `distpg eval` prints and writes to --json) beside the weighted sum's."""
    words = ["ant", "bee", "cat", "owl", "eel", "fox", "gnu", "emu"]  # held out with eval_seed 1234: fox, gnu
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}:", "id": i}) + "\n" for i, w in enumerate(words)))
    cfg = small_config("task.name=prompts", f"task.prompts_path={prompts}", "task.num_eval=2",
                       "task.reward=[tests.user_rewards:length_unless_vowel, tests.user_rewards:id_unless_zero]",
                       "task.reward_weights=[0.5, 2]")
    result = evaluate(cfg, Learner(cfg).model.eval())
    assert [p for p, *_ in result.samples] == ["say fox:", "say gnu:"]
    lengths = [len(c) for _, c, _, _ in result.samples]
    assert result.reward_parts == pytest.approx({"length_unless_vowel": sum(lengths) / 2,
                                                 "id_unless_zero": (0.05 + 0.06) / 2})
    assert [r for *_, r in result.samples] == pytest.approx([0.5 * lengths[0] + 0.1, 0.5 * lengths[1] + 0.12])
    assert result.reward_mean == pytest.approx(0.25 * sum(lengths) + 0.11)


def test_a_checkpoint_folder_is_read_with_its_runs_config_and_other_folders_are_named(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_000004"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"")
    (tmp_path / "run" / "config.yaml").write_text("{}")
    assert resolve_checkpoint(ckpt) == (tmp_path / "run", ckpt)

    copied = tmp_path / "copied"  # `cp -r RUN/checkpoints/step_N copied`: no config.yaml two levels up
    copied.mkdir()
    (copied / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="checkpoint folder outside its run folder"):
        resolve_checkpoint(copied)
    (copied / "config.json").write_text("{}")  # a Hugging Face folder (`distpg export`'s output)
    with pytest.raises(CheckpointError, match=r"Hugging Face GPT-2 folder, not a distpg run: .*model.init_from="):
        resolve_checkpoint(copied)

    # a path that does not exist says so; a checkpoint that run.keep_checkpoints deleted names those kept
    with pytest.raises(CheckpointError, match=r"'.*/runs/typo': no such folder; give a run folder or one of its"):
        resolve_checkpoint(tmp_path / "runs" / "typo")
    with pytest.raises(CheckpointError, match=r"step_000002': no such folder; the run's checkpoints are step_000004 "):
        resolve_checkpoint(ckpt.parent / "step_000002")


def test_failed_rewards_are_counted_and_shown_as_failed_not_as_zero(tmp_path, capsys):
    """A reward that raises on some held-out prompts: eval's mean is over the others and says how many
    failed; the samples show "failed"; every reward failing is a one-paragraph error, exit code 1."""
    from distpg import checkpoint
    from distpg.cli import main
    from distpg.config import dump_run_config

    cfg = small_config("task.name=tests.user_task:misbehaving", "task.params.fault=some_raise")
    learner = Learner(cfg)
    result = evaluate(cfg, learner.model.eval())
    bad = [p[0] < "m" for p, *_ in result.samples]  # the prompts misbehaving raises on
    assert 0 < sum(bad) < len(bad) and result.failed == sum(bad)
    assert all((r is None) == b for (*_, r), b in zip(result.samples, bad))
    good = [r for *_, r in result.samples if r is not None]
    assert result.reward_mean == pytest.approx(sum(good) / len(good))

    run = tmp_path / "run"  # the same policy as a run folder, for the command
    run.mkdir()
    (run / "config.yaml").write_text(dump_run_config(cfg))
    checkpoint.save(run, 1, learner.state(), keep=1)
    assert main(["eval", str(run), "--samples", str(len(bad))]) == 0
    out = capsys.readouterr().out
    # which checkpoint was scored: a run folder means its latest
    assert out.startswith(f"checkpoint {run / 'checkpoints' / 'step_000001'} (step 1 of run.steps="
                          f"{cfg.run.steps}, run.seed={cfg.run.seed}); greedy\n")
    assert f"({sum(bad)} of {len(bad)} rewards failed, left out)" in out
    assert out.count("reward failed)") == sum(bad)
    # the error itself, of the first that failed (the samples only say "failed")
    first = next(i for i, b in enumerate(bad) if b)
    prompt, completion = result.samples[first][:2]
    named = f"for prompt {prompt!r} and completion {completion!r}: KeyError: {prompt!r}"
    assert result.first_failure == named
    assert f"distpg: warning: {sum(bad)} of the {len(bad)} rewards failed; the first {named}\n" in out
    # --json: the same figures and every sample, the failed rewards as null
    assert main(["eval", str(run), "--samples", "0", "--json", str(tmp_path / "eval.json")]) == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["step"] == 1 and data["run_seed"] == cfg.run.seed and data["temperature"] == 0.0
    assert data["reward_mean"] == result.reward_mean and data["exact_match"] == result.exact_match
    assert data["failed_rewards"] == sum(bad) and data["num_prompts"] == len(bad) and data["first_failure"] == named
    assert [(s["prompt"], s["completion"], s["target"], s["reward"]) for s in data["samples"]] == result.samples
    assert f"wrote {tmp_path / 'eval.json'}" in capsys.readouterr().out
    for bad, says in ((str(tmp_path / "no" / "eval.json"), f"no folder {str(tmp_path / 'no')!r}"),
                      ("", "is a folder"), (str(tmp_path), "is a folder; give a file name")):
        # a missing folder; an empty name is not "no file"; a folder
        assert main(["eval", str(run), "--json", bad]) == 2
        err = capsys.readouterr().err
        assert "--json" in err and says in err and not (tmp_path / "no").exists()
    (run / "config.yaml").write_text(dump_run_config(small_config("task.name=tests.user_task:always_fails")))
    assert main(["eval", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("distpg: eval failed: the reward function of task 'always_fails' failed on all")
    assert "Traceback" not in err


@pytest.mark.parametrize("fault, why", [
    ("hang", "the reward function did not finish within rollout.reward_timeout_s=2s"),
    ("suicide", r"the reward process died \(exit code -9\)"),
])
def test_eval_runs_a_users_reward_function_as_training_does(fault, why):
    """A user's reward function that hangs or kills its process: eval, like a rollout worker, runs it in a
    child with rollout.reward_timeout_s, and says what happened instead of hanging or dying with it."""
    from distpg.rewards import RewardError

    cfg = small_config("task.name=tests.user_task:misbehaving", f"task.params.fault={fault}",
                       "rollout.reward_timeout_s=2")
    with pytest.raises(RewardError, match=rf"task 'misbehaving' gave no reward for the \d+ held-out prompts: {why}"):
        evaluate(cfg, Learner(cfg).model.eval())


def test_eval_of_a_function_that_returns_none_for_every_prompt_says_there_is_no_reward(tmp_path):
    """None for every held-out prompt (a forgotten `return`) is masked as in training, so the reward scores none:
    the evaluation says so rather than report a mean of nothing."""
    from distpg.rewards import RewardError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}:"}) + "\n" for w in ["ant", "bee", "cat", "dog"]))
    cfg = small_config("task.name=prompts", f"task.prompts_path={prompts}", "task.num_eval=2",
                       "task.reward=tests.user_rewards:forgot_return")
    with pytest.raises(RewardError, match="task 'prompts' gave no reward for the 2 held-out prompts: returned None: "
                                          "no reward for this sample"):
        evaluate(cfg, Learner(cfg).model.eval())


def test_eval_json_is_written_before_the_samples_are_printed(tmp_path, monkeypatch):
    """`distpg eval RUN --json F | head`: the pipe closing while samples print does not lose the file."""
    import sys

    from distpg import checkpoint
    from distpg.cli import main
    from distpg.config import dump_run_config

    cfg = small_config()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_run_config(cfg))
    checkpoint.save(run, 1, Learner(cfg).state(), keep=1)

    class Head:  # `head -2`: takes the first two lines, then closes the pipe
        lines = 0

        def write(self, text):
            if self.lines >= 2:
                raise BrokenPipeError(32, "Broken pipe")
            self.lines += text.count("\n")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Head())
    assert main(["eval", str(run), "--samples", "4", "--json", str(tmp_path / "eval.json")]) == 141  # as a pipe's
    assert json.loads((tmp_path / "eval.json").read_text())["num_prompts"] == cfg.task.num_eval


def test_eval_initial_scores_the_policy_the_run_starts_from_not_its_checkpoint(tmp_path, capsys):
    """`distpg eval RUN --initial`: the baseline of a before/after comparison, on the same held-out prompts."""
    import torch

    from distpg import checkpoint
    from distpg.cli import main
    from distpg.config import dump_run_config

    cfg = small_config()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_run_config(cfg))
    trained = Learner(cfg)
    with torch.no_grad():  # a checkpoint far from the initial policy
        for p in trained.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    checkpoint.save(run, 3, trained.state(), keep=1)
    before = evaluate(cfg, Learner(cfg).model.eval())  # the learner's step-0 policy

    assert main(["eval", str(run), "--initial", "--samples", "0", "--json", str(tmp_path / "initial.json")]) == 0
    assert f"the initial policy of {run} (step 0 of run.steps={cfg.run.steps}, run.seed={cfg.run.seed}, " \
           "initialised from run.seed); greedy" in capsys.readouterr().out
    initial = json.loads((tmp_path / "initial.json").read_text())
    assert initial["step"] == 0 and initial["checkpoint"] is None
    assert [s["completion"] for s in initial["samples"]] == [c for _, c, _, _ in before.samples]
    assert initial["reward_mean"] == before.reward_mean

    assert main(["eval", str(run), "--samples", "0", "--json", str(tmp_path / "latest.json")]) == 0
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["step"] == 3 and latest["samples"] != initial["samples"]

    assert main(["eval", str(tmp_path), "--initial"]) == 2  # not a run folder
    assert "--initial scores the policy a run folder's config starts from" in capsys.readouterr().err


def test_exact_match_counts_only_the_held_out_prompts_with_a_reference(tmp_path, capsys):
    """A prompts file without references (a TRL dataset keeps its answers in other columns): an empty completion
    is not an exact match of a missing reference. Exact match is over the prompts that have one, n/a without."""
    from distpg import checkpoint
    from distpg.cli import main
    from distpg.config import dump_run_config

    words = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {w}:", **({"reference": w} if i % 2 else {})}) + "\n"
                            for i, w in enumerate(words)))
    cfg = small_config("task.name=prompts", f"task.prompts_path={path}", "task.num_eval=6",
                       "task.reward=tests.user_rewards:length_of_reference_or_none")
    learner = Learner(cfg)
    result = evaluate(cfg, learner.model.eval())
    with_ref = [(c, t) for _, c, t, _ in result.samples if t is not None]
    assert 0 < len(with_ref) < result.num_prompts and result.with_target == len(with_ref)
    assert result.exact_match == sum(exact_match(c, t) for c, t in with_ref) / len(with_ref)

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_run_config(cfg))
    checkpoint.save(run, 1, learner.state(), keep=1)
    assert main(["eval", str(run), "--samples", "6", "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert f"(of the {len(with_ref)} with a reference)" in out and "(no reference, reward" in out
    assert json.loads((tmp_path / "e.json").read_text())["prompts_with_reference"] == len(with_ref)

    path.write_text("".join(json.dumps({"prompt": f"say {w}:"}) + "\n" for w in words))  # no reference at all
    cfg = small_config("task.name=prompts", f"task.prompts_path={path}", "task.num_eval=6",
                       "task.reward=tests.user_rewards:length_of_reference_or_none")
    assert evaluate(cfg, learner.model).exact_match is None
    (run / "config.yaml").write_text(dump_run_config(cfg))
    (run / "prompts.sha256").unlink(missing_ok=True)
    assert main(["eval", str(run), "--samples", "0", "--json", str(tmp_path / "e.json")]) == 0
    assert "exact_match n/a (no held-out prompt has a reference)" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["exact_match"] is None


def test_eval_scores_a_test_file_with_the_runs_tokenizer_reward_functions_and_budget(tmp_path, capsys,
                                                                                      pack_every_weight):
    """`distpg eval RUN --prompts FILE`: every prompt of another file (a test set), in file order, encoded with
    the run's character tokenizer (built from its training file), scored by its reward functions (a batched one
    gets the test file's columns) with its completion budget; a prompt the model cannot hold with that budget is
    left out and counted; a run of another task, or a character the run never saw, is refused naming --prompts."""
    from distpg import checkpoint
    from distpg.cli import main
    from distpg.config import ConfigError, dump_run_config
    from distpg.rollout import sampling_params

    words = ["ant", "bee", "cat", "owl", "eel", "fox", "gnu", "emu"]
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": f"say {w}:", "reference": w, "id": i}) + "\n"
                                  for i, w in enumerate(words)))
    cfg = small_config("task.name=prompts", f"task.prompts_path={train_file}", "task.num_eval=2",
                       "task.reward=[tests.user_rewards:length_unless_vowel, tests.user_rewards:id_unless_zero]")
    learner = Learner(cfg)
    budget = sampling_params(cfg, task_for(cfg)).max_new_tokens
    assert budget == 4  # the longest reference + 1 (the test file, without references, would have 32)
    room = cfg.model.n_positions - budget  # "say " + k letters + ":" is k + 5 characters
    tests = ["say gnat:", "say nag:", "say one:", "say " + "a" * (room - 5) + ":", "say " + "a" * (room - 4) + ":"]
    test_file.write_text("".join(json.dumps({"prompt": p, "id": 10 + i}) + "\n" for i, p in enumerate(tests)))
    result = evaluate(cfg, learner.model.eval(), prompts_path=str(test_file))
    assert [p for p, *_ in result.samples] == tests[:4] and result.left_out == 1  # the last: one token too long
    completions = [c for _, c, _, _ in result.samples]
    assert all(len(c) <= budget for c in completions) and max(map(len, completions)) >= 3  # the run's budget
    # "one" and "aaa...": a vowel, scored by the id alone
    assert [r for *_, r in result.samples] == pytest.approx([len(completions[0]) + 0.10, len(completions[1]) + 0.11,
                                                             0.12, 0.13])
    assert result.reward_parts["id_unless_zero"] == pytest.approx(0.115)

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_run_config(cfg))
    checkpoint.save(run, 1, learner.state(), keep=1)
    assert main(["eval", str(run), "--prompts", str(test_file), "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert f"left out 1 prompt of {test_file} longer than the model holds" in out
    assert f"prompts of {test_file}: 4 | reward_mean" in out and "exact_match n/a (no prompt has a reference)" in out
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["prompts_path"] == str(test_file) and record["num_prompts"] == 4 and record["left_out"] == 1

    test_file.write_text(json.dumps({"prompt": tests[4], "id": 1}) + "\n")  # every prompt too long: the limit is the
    # run's room, which the message explains, not a task.max_prompt_tokens the run never set
    with pytest.raises(ConfigError, match=rf"distpg eval --prompts {test_file}: the model holds prompts of at most "
                                          rf"{room} tokens with the run's completion budget \(model.n_positions="
                                          rf"{cfg.model.n_positions} - {budget} completion tokens\): every prompt of "
                                          rf"'{test_file}' is longer \(the shortest has {room + 1} tokens\)"):
        evaluate(cfg, learner.model, prompts_path=str(test_file))
    test_file.write_text(json.dumps({"prompt": "say yak:", "id": 1}) + "\n")  # 'y' and 'k': not in the training file
    with pytest.raises(ConfigError, match=rf"distpg eval --prompts {test_file}: .*cannot encode the prompt 'say yak:'"):
        evaluate(cfg, learner.model, prompts_path=str(test_file))
    with pytest.raises(ConfigError, match="for a run of task.name=prompts; this run's task is 'reverse'"):
        evaluate(small_config(), learner.model, prompts_path=str(test_file))


def test_a_test_file_that_is_missing_or_malformed_is_named_by_its_own_field_not_task_prompts_path(tmp_path):
    """`distpg eval --prompts FILE` and task.eval_prompts_path: the error names that option and the file, not
    "task.prompts_path='FILE'", which is the run's training file (another one) in the user's config."""
    from distpg.config import ConfigError
    from distpg.evaluate import test_set

    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": f"say {w}:", "reference": w}) + "\n"
                                  for w in ["ant", "bee", "cat", "owl"]))
    cfg = small_config("task.name=prompts", f"task.prompts_path={train_file}", "task.num_eval=2",
                       "task.reward=distpg.examples.rewards:match_reference")
    missing, bad = tmp_path / "missing.jsonl", tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "say ant:"}\n{"promt": "say bee:"}\n')
    for field in ("distpg eval --prompts", "task.eval_prompts_path"):
        with pytest.raises(ConfigError) as e:
            test_set(cfg, str(missing), None, 4, field)
        assert str(e.value) == f"{field} {missing}: no such file"
        with pytest.raises(ConfigError) as e:
            test_set(cfg, str(bad), None, 4, field)
        assert str(e.value).startswith(f"{field} {bad}: line 2: expected an object with a 'prompt' key")


def test_the_drivers_wait_for_an_eval_every_evaluation_grows_with_its_prompts(tmp_path, monkeypatch):
    """run.eval_every's evaluation was waited for ray.timeout_s (300 s) however many prompts it scores, so a large
    test file on a slow learner stopped the run. The wait is ray.timeout_s plus rollout.timeout_s for each worker's
    share of a step's samples among the evaluation's completions (one per prompt), worked by hand here."""
    from distpg.config import load_config
    from distpg.orchestrator import eval_prompts, eval_wait

    cfg = load_config()  # the default: 32 prompts x 8 samples over 2 workers, a share of 128; 128 held out
    assert eval_prompts(cfg, task_for(cfg)) == (128, "task.num_eval")
    timeout, why = eval_wait(cfg, 128, "task.num_eval")
    assert timeout == 300 + 300 * 1 and why == (
        "ray.timeout_s=300 + rollout.timeout_s=300 x 1: one rollout.timeout_s for each 128 of the 128 completions "
        "(task.num_eval), a worker's share of a step (rollout.prompts_per_step=32 / rollout.num_workers=2 x "
        "rollout.group_size=8); raise rollout.timeout_s if the evaluation is just slow")
    assert eval_wait(cfg, 5000, "f")[0] == 300 + 300 * 40  # ceil(5000 / 128) shares
    uneven = small_config("rollout.prompts_per_step=5", "rollout.group_size=3", "rollout.timeout_s=7",
                          "ray.timeout_s=2")  # the bigger worker draws ceil(5 / 2) x 3 = 9 samples
    assert eval_wait(uneven, 9, "f")[0] == 2 + 7 and eval_wait(uneven, 10, "f")[0] == 2 + 7 * 2
    # a test file is counted as the learner reads it: 300 prompts the model holds (and one too long for it, left
    # out), a share of 2 x 4 = 8, 38 shares
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"say {w}:"}) + "\n" for w in "abcdefgh"))
    held = [f"say {a}{b}{c}:" for a in "abcdefgh" for b in "abcdefgh" for c in "abcdefgh"][:300]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [*held, "a" * 5000]))
    monkeypatch.chdir(tmp_path)
    cfg = small_config("task.name=prompts", "task.prompts_path=train.jsonl", "task.num_eval=2",
                       "task.reward=tests.user_rewards:length_unless_vowel", "task.eval_prompts_path=test.jsonl",
                       "run.eval_every=2")
    count = eval_prompts(cfg, task_for(cfg))
    assert count == (300, "task.eval_prompts_path=test.jsonl")
    assert eval_wait(cfg, *count)[0] == 300 + 300 * 38
