"""The distributed parts on a real local Ray runtime: 2 rollout workers and a learner."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from distpg.batch import BatchError, make_batch
from distpg.learner import Learner
from distpg.metrics import CONTRACT_METRICS
from distpg.orchestrator import (
    Trainer,
    TrainingError,
    plan_placement,
    rollout_stats,
    sample_seed,
    split,
    step_prompts,
    train,
)
from distpg.rollout import RolloutWorker
from tests.conftest import small_config

pytestmark = pytest.mark.ray


def test_every_step_samples_with_the_version_handed_along(ray_session, tmp_path):
    ray = ray_session
    cfg = small_config("run.steps=4")
    trainer = Trainer(cfg, tmp_path, plan_placement(cfg, cpus=2, gpus=0))
    # the same steps in one process without Ray: the distributed loop must not change a number
    workers = [RolloutWorker(cfg, w, 1) for w in range(2)]
    learner = Learner(cfg, 1)
    weights = learner.get_weights()
    try:
        trainer.broadcast(trainer.learner.get_weights.remote(), 0)
        trainer.open_outputs(0)
        for step in range(1, 5):
            record = trainer.sync_step(step)
            learner_version = ray.get(trainer.learner.get_version.remote(), timeout=60)
            held = ray.get([w.get_version.remote() for w in trainer.workers], timeout=60)
            assert learner_version == step == record["policy/version"] == trainer.version
            # the new version goes out with the next sample calls; this step sampled with the previous one,
            # which the learner held when it updated (staleness 0)
            assert held == [step - 1, step - 1] and record["rollout/staleness_mean"] == 0

            prompts, ids = step_prompts(trainer.task, cfg, step)
            batches = [w.sample(split(prompts, 2)[i], split(ids, 2)[i], sample_seed(cfg.run.seed, step, i), weights)
                       for i, w in enumerate(workers)]
            metrics, weights = learner.update(*batches)
            assert metrics["learner/loss"] == record["learner/loss"]
            assert metrics["learner/grad_norm"] == record["learner/grad_norm"]
            assert rollout_stats(batches)["rollout/reward_mean"] == record["rollout/reward_mean"]
        # a worker that samples with another version than it was handed stops the run
        trainer.version += 1  # what the driver believes it handed; the workers get the version they hold
        with pytest.raises(TrainingError, match=r"rollout worker 0 sampled step 5 with policy version\(s\) "
                           r"\[4\] after being handed version 5"):
            trainer.collect(5)
    finally:
        trainer.close()


def test_training_run_folder_and_determinism(small_run, tmp_path):
    cfg = small_config("run.steps=4")
    run_a, a = small_run("run.steps=4")  # the session's plain 4-step run (the colocate and async tests' too)
    evaluated = small_config("run.steps=4", "run.eval_every=2")  # scoring the held-out prompts changes nothing
    train(evaluated, tmp_path / "b")
    train(small_config("run.steps=4", "run.seed=1"), tmp_path / "c")
    assert a["steps"] == 4

    def records(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    ra, rb, rc = records(run_a), records(tmp_path / "b"), records(tmp_path / "c")
    assert [r["step"] for r in ra] == [1, 2, 3, 4]
    for r in ra:
        assert set(CONTRACT_METRICS) <= set(r)
    assert [r["policy/version"] for r in ra] == [1, 2, 3, 4]
    same = ("rollout/reward_mean", "learner/loss", "learner/grad_norm", "learner/entropy")
    assert [[r[k] for k in same] for r in ra] == [[r[k] for k in same] for r in rb]  # same seed, same numbers
    assert [r["learner/loss"] for r in ra] != [r["learner/loss"] for r in rc]

    # every sample is in the Parquet files exactly once, with the contract's columns
    table = pq.read_table(run_a / "rollouts")
    keys = list(zip(table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist()))
    assert len(keys) == len(set(keys)) == 4 * cfg.rollout.prompts_per_step * cfg.rollout.group_size
    assert set(table.column("worker_id").to_pylist()) == {0, 1}
    assert table.column("policy_version").to_pylist()[:16] == [0] * 16  # step 1 sampled with the initial weights
    # checkpoints every 2 steps and at the end
    assert (run_a / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert (run_a / "checkpoints" / "step_000002" / "model.safetensors").exists()

    # run.eval_every=2: the learner's policy after steps 2 and 4 scored as `distpg eval` scores its checkpoints,
    # in eval.jsonl and TensorBoard; a resume forgets the evaluations of the policies it redoes
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distpg.evaluate import evaluate, load_policy
    from distpg.orchestrator import prepare_run_dir

    run = tmp_path / "b"
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [(e["step"], e["version"]) for e in evals] == [(2, 2), (4, 4)]
    for e in evals:
        res = evaluate(*load_policy(run / "checkpoints" / f"step_{e['step']:06d}"))
        assert (e["eval/reward_mean"], e["eval/exact_match"]) == (res.reward_mean, res.exact_match)
        assert e["eval/num_prompts"] == 16 and e["eval/failed_rewards"] == 0
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(x.step, x.value) for x in acc.Scalars("eval/reward_mean")] == \
        [(e["version"], pytest.approx(e["eval/reward_mean"])) for e in evals]
    (run / "checkpoints" / "latest").write_text("step_000002\n")  # as if stopped before checkpoint 4
    assert prepare_run_dir(evaluated, run, resume=True) == 2
    assert [json.loads(line)["version"] for line in (run / "eval.jsonl").read_text().splitlines()] == [2]


def test_learner_rejects_a_malformed_batch_whole():
    cfg = small_config()
    learner, worker = Learner(cfg), RolloutWorker(cfg, 0)
    worker.set_weights(learner.get_weights())
    good = worker.sample(["abcd="], [0], seed=0)
    bad_tokens = good.column("completion_tokens").to_pylist()
    bad_tokens[0] = [999] * len(bad_tokens[0])
    bad = make_batch({**good.to_pydict(), "completion_tokens": bad_tokens})
    before = [p.clone() for p in learner.model.parameters()]
    with pytest.raises(BatchError, match="completion_tokens has token id 999"):
        learner.update(good, bad)
    assert learner.version == 0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))
    metrics, weights = learner.update(good)
    assert learner.version == weights.version == 1 and metrics["policy/version"] == 1


def test_max_time_stops_with_a_checkpoint_and_a_resume_counts_afresh(ray_session, tmp_path, capsys):
    run = tmp_path / "r"
    # one actor to start, not three (the budget is the driver's loop's, whatever the layout): colocated
    cfg = small_config("run.steps=50", "run.max_time_s=0.001", "run.checkpoint_every=100", "rollout.num_workers=1",
                       "rollout.colocate=true")
    assert train(cfg, run)["steps"] == 1  # the budget is spent by the first step
    assert "run.max_time_s=0.001 reached; stopping at step 1" in capsys.readouterr().out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert train(cfg, run, resume=True)["steps"] == 2  # a new start: a new budget, one more step


class SlowEvaluations(Learner):
    """A learner whose first evaluation takes 11 s and whose second hangs."""

    def evaluate(self):
        import time

        time.sleep(11 if self.version == 1 else 600)
        return super().evaluate()


@pytest.mark.ray
@pytest.mark.slow  # an evaluation of 11 s and one waited for 24 s
def test_an_evaluation_slower_than_ray_timeout_s_is_waited_for_by_its_size_and_a_hung_one_is_stopped(
        ray_session, tmp_path, monkeypatch):
    """run.eval_every's evaluation was waited for ray.timeout_s alone, so one merely slower stopped the run. It is
    waited for ray.timeout_s + rollout.timeout_s for each worker's share of a step among its completions: here
    16 held-out prompts and shares of 4 / 2 x 4 = 8 samples, 8 + 8 x 2 = 24 s. The first evaluation (11 s, past
    ray.timeout_s=8) is scored; the second, hung, stops the run with a message naming the settings."""
    monkeypatch.setattr(Trainer, "learner_class", SlowEvaluations)
    cfg = small_config("run.steps=3", "run.eval_every=1", "ray.timeout_s=8", "rollout.timeout_s=8")
    with pytest.raises(TrainingError) as e:
        train(cfg, tmp_path / "r")
    assert str(e.value).startswith(
        "the evaluation after step 2 did not finish within 24s (ray.timeout_s=8 + rollout.timeout_s=8 x 2: one "
        "rollout.timeout_s for each 8 of the 16 completions (task.num_eval), a worker's share of a step "
        "(rollout.prompts_per_step=4 / rollout.num_workers=2 x rollout.group_size=4); raise rollout.timeout_s if "
        "the evaluation is just slow)"), str(e.value)
    (record,) = [json.loads(x) for x in (tmp_path / "r" / "eval.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["eval/num_prompts"] == 16


def test_a_live_local_runtime_is_not_taken_for_one_going_down(ray_session):
    """`stop_local_ray` kills a runtime already going down at once (the process-group SIGTERM test in
    test_resume sees that); a live one, as this session's, answers its probe and is stopped gracefully."""
    from distpg.orchestrator import _going_down

    node = ray_session._private.worker._global_node
    assert node is not None and node.is_head()
    assert not _going_down(node)
