"""Asynchronous training on real Ray: bounded staleness, exactly-once consumption, and staleness 0 == sync."""

import json
import math
import time

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from distpg import algo
from distpg.orchestrator import Trainer, plan_placement, train
from distpg.rollout import RolloutWorker
from tests.conftest import small_config

ASYNC = ("run.mode=async", "log.ledger=true", "run.checkpoint_every=100")


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run):
    return load_file(str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
                         / "model.safetensors"))


@pytest.mark.ray
def test_staleness_zero_is_bitwise_sync(small_run, tmp_path):
    steps = "run.steps=4"
    sync, _ = small_run(steps)  # the session's plain 4-step run (test_ray's and test_colocate's too)
    train(small_config(steps, *ASYNC, "algo.max_staleness=0"), tmp_path / "async0")
    a, b = final_weights(sync), final_weights(tmp_path / "async0")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise, not allclose
    ra, rb = records(sync), records(tmp_path / "async0")
    assert [r["learner/loss"] for r in ra] == [r["learner/loss"] for r in rb]
    assert all(r["rollout/staleness_max"] == 0 for r in rb)


@pytest.mark.ray
def test_bounded_staleness_and_every_sample_consumed_exactly_once(ray_session, tmp_path):
    run = tmp_path / "async2"
    cfg = small_config("run.steps=12", *ASYNC, "algo.max_staleness=2", "rollout.prompts_per_step=8")
    train(cfg, run)
    recs = records(run)
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert all(r["rollout/staleness_max"] <= 2 for r in recs)
    assert max(r["rollout/staleness_max"] for r in recs) >= 1  # the workers really ran ahead of the learner
    generated = pq.read_table(run / "rollouts")
    consumed = pq.read_table(run / "ledger.parquet")
    gen_keys = list(zip(generated.column("prompt_id").to_pylist(), generated.column("sample_idx").to_pylist()))
    con_keys = list(zip(consumed.column("prompt_id").to_pylist(), consumed.column("sample_idx").to_pylist()))
    assert len(con_keys) == len(set(con_keys)) == 12 * 8 * cfg.rollout.group_size  # none twice, none lost
    assert set(con_keys) == set(gen_keys) and len(gen_keys) == len(set(gen_keys))
    # the version recorded in the rollouts is never more than K behind the update that consumed it
    version_of = dict(zip(gen_keys, generated.column("policy_version").to_pylist()))
    for key, v in zip(con_keys, consumed.column("version").to_pylist()):
        assert 0 <= (v - 1) - version_of[key] <= 2


class SlowWorker(RolloutWorker):
    """A rollout worker that takes 0.2 s longer per share: slower than the learner."""

    def sample(self, *args, **kwargs):
        time.sleep(0.2)
        return super().sample(*args, **kwargs)


@pytest.mark.ray
def test_the_ledger_of_an_interrupted_and_resumed_run_holds_every_step_once(ray_session, tmp_path, monkeypatch):
    # the ledger was written only at the end of a run, from the learner's memory: after an interruption and
    # --resume it held the resumed steps only. With run.eval_every=3 the interrupted run has evaluated the policy
    # after step 3, past the checkpoint the resume continues from: the resume forgets it and evaluates step 3
    # again, so the run ends with the evaluations of an uninterrupted one (3, and 5 at the end), each once
    from distpg.metrics import EVALS, MetricsLogger

    run = tmp_path / "run"
    # one rollout worker: one actor fewer to start, twice (the ledger is the learner's)
    cfg = small_config("run.steps=5", *ASYNC, "run.checkpoint_every=2", "algo.max_staleness=1", "run.eval_every=3",
                       "rollout.num_workers=1")
    real_log = MetricsLogger.log

    def interrupted_log(self, step, metrics, samples=None):  # after update 4, past the checkpoint of step 2
        if step == 4:
            raise KeyboardInterrupt("SIGTERM")
        return real_log(self, step, metrics, samples)

    monkeypatch.setattr(MetricsLogger, "log", interrupted_log)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run)
    evals = [json.loads(x) for x in (run / EVALS).read_text().splitlines()]
    assert [(e["step"], e["version"]) for e in evals] == [(3, 3)]
    monkeypatch.setattr(MetricsLogger, "log", real_log)
    train(cfg, run, resume=True)
    evals = [json.loads(x) for x in (run / EVALS).read_text().splitlines()]
    assert [(e["step"], e["version"]) for e in evals] == [(3, 3), (5, 5)]  # the driver evaluates between updates
    consumed, generated = pq.read_table(run / "ledger.parquet"), pq.read_table(run / "rollouts")
    keys = list(zip(consumed.column("prompt_id").to_pylist(), consumed.column("sample_idx").to_pylist()))
    assert len(keys) == len(set(keys)) == 5 * 4 * cfg.rollout.group_size  # every step's samples, none twice
    assert set(keys) == set(zip(generated.column("prompt_id").to_pylist(), generated.column("sample_idx").to_pylist()))
    assert sorted(set(consumed.column("version").to_pylist())) == [1, 2, 3, 4, 5]


@pytest.mark.ray
@pytest.mark.parametrize("schedule", ["exact", pytest.param("newest", marks=pytest.mark.slow)])  # newest: ~10 s
def test_exact_staleness_schedule_gives_the_same_numbers_twice(ray_session, tmp_path, monkeypatch, schedule):
    """algo.staleness_schedule=exact: step s is sampled with version max(0, s - 1 - K) whatever the timing, so
    two runs of the same config and seed agree bitwise, and every batch is exactly min(s - 1, K) versions old.
    Here the default schedule (newest) hands the workers fresher versions than that."""
    monkeypatch.setattr(Trainer, "worker_class", SlowWorker)
    # K = 3 and two calls queued per worker: a worker issues step s when its step s - 2 is done, by when the
    # learner has made version s - 3 (or s - 4): newer than s - 1 - K
    cfg = small_config("run.steps=8", *ASYNC, "algo.max_staleness=3", f"algo.staleness_schedule={schedule}")
    runs = ["a", "b"] if schedule == "exact" else ["a"]
    for name in runs:
        train(cfg, tmp_path / name)
    ra = records(tmp_path / "a")
    exact = [min(s - 1, 3) for s in range(1, 9)]
    if schedule == "newest":
        assert [r["rollout/staleness_max"] for r in ra] != exact and all(r["rollout/staleness_max"] <= 3 for r in ra)
        return
    assert [r["rollout/staleness_max"] for r in ra] == exact
    assert [r["rollout/staleness_mean"] for r in ra] == exact
    rb = records(tmp_path / "b")
    for key in ("learner/loss", "learner/grad_norm", "rollout/reward_mean"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    consumed = pq.read_table(tmp_path / "a" / "ledger.parquet")  # still every sample exactly once
    keys = list(zip(consumed.column("prompt_id").to_pylist(), consumed.column("sample_idx").to_pylist()))
    assert len(keys) == len(set(keys)) == 8 * cfg.rollout.prompts_per_step * cfg.rollout.group_size


# ------------------------------------------------------------------- off-policy loss, hand-worked


def test_off_policy_loss_without_stale_samples_is_pg_loss():
    logp = torch.tensor([[-0.5, -1.0], [-0.2, -0.3]], requires_grad=True)
    old = torch.tensor([[-0.1, -0.1], [-0.9, -0.9]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -2.0])
    for mode in algo.OFF_POLICY:
        loss, corrected = algo.off_policy_loss(logp, old, mask, adv, torch.tensor([False, False]), 2, mode=mode)
        assert torch.equal(loss, algo.pg_loss(logp, mask, adv, 2)) and int(corrected) == 0


def test_truncated_importance_weights_by_hand():
    # sample 0 stale, sample 1 fresh. Ratios of sample 0: exp(-0.5 - -1.0) = e^0.5 = 1.6487 (capped to 1.2),
    # exp(-1.0 - -0.5) = e^-0.5 = 0.6065 (kept). Sample 1 uses weight 1.
    # loss = -(1/2) * [A0 * (1.2 * -0.5 + 0.6065 * -1.0) + A1 * (1 * -0.2)] with A0 = 1, A1 = -2
    #      = -(1/2) * [(-0.6 - 0.6065) + 0.4] = -(1/2) * (-0.8065) = 0.40327
    logp = torch.tensor([[-0.5, -1.0], [-0.2, -0.3]], requires_grad=True)
    old = torch.tensor([[-1.0, -0.5], [-0.2, -0.3]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -2.0])
    loss, corrected = algo.off_policy_loss(logp, old, mask, adv, torch.tensor([True, False]), 2,
                                           mode="truncated", cap=1.2)
    assert loss.item() == pytest.approx(0.5 * (0.6 + 0.60653 - 0.4), abs=1e-5)
    assert int(corrected) == 1  # only the first token's ratio exceeded the cap
    loss.backward()
    # d loss / d logp = -A * coef / B: (-1.2/2, -0.6065/2) for sample 0, (+2/2, 0) for sample 1
    assert torch.allclose(logp.grad, torch.tensor([[-0.6, -0.30327], [1.0, 0.0]]), atol=1e-5)


def test_clipped_surrogate_by_hand():
    # one stale sample, A = 1, ratios e^0.5 = 1.6487 and e^-0.5 = 0.6065, eps 0.2:
    # min(ρA, clip(ρ)A) = min(1.6487, 1.2) = 1.2 (clipped, no gradient) and min(0.6065, 0.8) = 0.6065 (gradient ρ)
    # loss = -(1.2 + 0.6065) / 1 = -1.8065; d loss / d logp = (0, -0.6065)
    logp = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -0.5]])
    loss, corrected = algo.off_policy_loss(logp, old, torch.tensor([[True, True]]), torch.tensor([1.0]),
                                           torch.tensor([True]), 1, mode="clipped", clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.80653, abs=1e-5)
    assert int(corrected) == 1
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.60653]]), atol=1e-5)


def test_decoupled_clipped_surrogate_by_hand():
    """Top-k samples: the clip ratio is r = πθ/π_old (π_old: the sampling version's policy before the
    filter) and w = π_old/μ (the kept mass, ≤ 1) weights the surrogate without being clipped. A = -1, so a
    token is clipped where its ratio is below 1 - ε = 0.8."""
    logp = torch.tensor([[-0.7, -1.2]], requires_grad=True, dtype=torch.float64)
    mu = torch.tensor([[-0.3, -0.6]], dtype=torch.float64)
    pi_old = torch.tensor([[-0.4, -0.6 + math.log(0.5)]], dtype=torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    mask, stale = torch.tensor([[True, True]]), torch.tensor([True])
    loss, corrected = algo.off_policy_loss(logp, mu, mask, adv, stale, 1, mode="clipped", clip_eps=0.2,
                                           policy_logprobs=pi_old)
    r = (logp - pi_old).exp().detach()  # e^-0.3 = 0.741 (clipped), e^0.093 = 1.097 (inside)
    w = (pi_old - mu).exp()  # e^-0.1 = 0.905, 0.5
    assert r[0, 0] < 0.8 < r[0, 1] < 1.2
    assert loss.item() == pytest.approx(-(w[0, 0] * 0.8 * -1.0 + w[0, 1] * r[0, 1] * -1.0).item(), rel=1e-12)
    assert int(corrected) == 1
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, (w[0, 1] * r[0, 1]).item()]], dtype=torch.float64))
    # the plain surrogate on ρ = πθ/μ (no π_old) clips both tokens (ρ = 0.67 and 0.55): no gradient at all,
    # although the policy that sampled token 1 has not moved away from it
    logp.grad = None
    plain, corrected = algo.off_policy_loss(logp, mu, mask, adv, stale, 1, mode="clipped", clip_eps=0.2)
    assert plain.item() == pytest.approx(1.6, rel=1e-12) and int(corrected) == 2
    plain.backward()
    assert not logp.grad.any()


def test_unknown_off_policy_mode():
    t = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="algo.off_policy='vtrace': allowed are clipped, truncated, none"):
        algo.off_policy_loss(t, t, t.bool(), torch.zeros(1), torch.tensor([True]), 1, mode="vtrace")


class CountsSetWeights(RolloutWorker):
    """A rollout worker that counts the set_weights calls made to it from outside (not from its sample)."""

    outside = 0
    in_sample = False

    def set_weights(self, msg):
        self.outside += not self.in_sample
        return super().set_weights(msg)

    def sample(self, *args, **kwargs):
        self.in_sample = True
        try:
            return super().sample(*args, **kwargs)
        finally:
            self.in_sample = False

    def get_outside(self):
        return self.outside


@pytest.mark.ray
def test_async_workers_get_each_version_with_a_sample_call(ray_session, tmp_path, monkeypatch):
    ray = ray_session
    cfg = small_config("run.steps=6", *ASYNC, "algo.max_staleness=1")

    monkeypatch.setattr(Trainer, "worker_class", CountsSetWeights)
    trainer = Trainer(cfg, tmp_path / "r", plan_placement(cfg, cpus=2, gpus=0))
    try:
        (tmp_path / "r").mkdir()
        trainer.run()
        # the run's first broadcast is the only set_weights call: every later version rode on a sample call
        assert ray.get([w.get_outside.remote() for w in trainer.workers], timeout=60) == [1, 1]
        held = ray.get([w.get_version.remote() for w in trainer.workers], timeout=60)
        assert min(held) >= 6 - 1 - 1  # the last steps sampled with recent versions (K = 1)
    finally:
        trainer.close()
    recs = records(tmp_path / "r")
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert all(r["perf/sync_s"] >= 0 for r in recs) and any(r["perf/sync_s"] > 0 for r in recs[1:])


class IgnoresLaterWeights(RolloutWorker):
    """A rollout worker that loads the weights of the first sample call that carries some, and ignores the
    later ones (it samples with the version it holds)."""

    carried = 0

    def sample(self, prompts, prompt_ids, seed, weights=None):
        if weights is not None:
            self.carried += 1
            if self.carried > 1:
                weights = None
        return super().sample(prompts, prompt_ids, seed, weights)


@pytest.mark.ray
@pytest.mark.parametrize("schedule", ["newest", "exact"])
def test_an_async_batch_of_another_version_than_its_call_carried_stops_the_run(ray_session, tmp_path, monkeypatch,
                                                                               schedule):
    """In async mode the driver checks each batch against the version its call carried, as in sync mode: a worker
    that samples with an older one (the learner would take any version up to its own, past the staleness bound)
    stops the run naming the worker, the step and both versions."""
    from distpg.orchestrator import TrainingError

    # one rollout worker: one actor fewer to start (the check is the same for each worker's batches)
    cfg = small_config("run.steps=8", *ASYNC, "algo.max_staleness=1", f"algo.staleness_schedule={schedule}",
                       "rollout.num_workers=1")
    monkeypatch.setattr(Trainer, "worker_class", IgnoresLaterWeights)
    trainer = Trainer(cfg, tmp_path / "r", plan_placement(cfg, cpus=2, gpus=0))
    try:
        (tmp_path / "r").mkdir()
        with pytest.raises(TrainingError, match=r"rollout worker \d sampled step \d+ with policy version\(s\) "
                           r"\[\d+\] after being handed version \d+"):
            trainer.run()
    finally:
        trainer.close()


@pytest.mark.ray
def test_a_kill_right_after_a_checkpoint_keeps_the_rollouts_of_the_steps_it_kept(ray_session, tmp_path, monkeypatch):
    # the rollouts of the steps since the last flush were only in the driver's memory when a checkpoint was
    # written: a kill before the next flush lost them, and the resume (which does not redo those steps) never
    # wrote them, while the ledger holds them
    from distpg import checkpoint
    from distpg.batch import RolloutWriter

    run = tmp_path / "run"
    # log.rollout_flush_every=2: steps 1-2 are flushed at step 2, step 3 is buffered at checkpoint 3
    # one rollout worker: one actor fewer to start, twice (the rollouts are written by the driver)
    cfg = small_config("run.steps=4", *ASYNC, "run.checkpoint_every=3", "algo.max_staleness=1", "rollout.num_workers=1")
    real_save, real_flush = checkpoint.save, RolloutWriter.flush

    def save_then_killed(run_dir, step, *args, **kwargs):
        out = real_save(run_dir, step, *args, **kwargs)
        if step == 3:  # SIGKILL right after checkpoint 3: what the driver held in memory is gone
            monkeypatch.setattr(RolloutWriter, "flush", lambda self: None)
            raise KeyboardInterrupt("SIGKILL")
        return out

    monkeypatch.setattr(checkpoint, "save", save_then_killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run)
    monkeypatch.setattr(checkpoint, "save", real_save)
    monkeypatch.setattr(RolloutWriter, "flush", real_flush)
    train(cfg, run, resume=True)
    generated, consumed = pq.read_table(run / "rollouts"), pq.read_table(run / "ledger.parquet")
    assert sorted(set(generated.column("step").to_pylist())) == [1, 2, 3, 4]
    keys = list(zip(generated.column("prompt_id").to_pylist(), generated.column("sample_idx").to_pylist()))
    assert len(keys) == len(set(keys)) == 4 * 4 * cfg.rollout.group_size
    assert set(keys) == set(zip(consumed.column("prompt_id").to_pylist(), consumed.column("sample_idx").to_pylist()))


class SixSecondWorker(RolloutWorker):
    """A rollout worker whose every share takes about 6 s: longer than the pipeline's 5 s wait for a result,
    well within rollout.timeout_s=9."""

    def sample(self, *args, **kwargs):
        time.sleep(6.0)
        return super().sample(*args, **kwargs)


@pytest.mark.ray
@pytest.mark.slow  # ~15 s: the shares must outlast the pipeline's 5 s wait
def test_a_queued_share_is_not_timed_while_it_waits_behind_the_one_before(ray_session, tmp_path, monkeypatch):
    # a worker queues two calls; the second was timed from when it was issued, so a healthy worker whose
    # shares take more than half of rollout.timeout_s was replaced as hung while it sampled the first
    monkeypatch.setattr(Trainer, "worker_class", SixSecondWorker)
    cfg = small_config("run.steps=2", *ASYNC, "algo.max_staleness=1", "rollout.num_workers=1",
                       "rollout.timeout_s=9", "rollout.max_restarts=0")
    train(cfg, tmp_path / "r")  # steps 1 and 2 are issued at once; step 2 ends about 12 s later
    assert [(r["step"], r["workers/restarts"]) for r in records(tmp_path / "r")] == [(1, 0), (2, 0)]
