"""rollout.colocate: rollout worker 0 in the learner's actor, on a real local Ray runtime."""

import json
import time

import pytest
import torch

from distpg import kernels
from distpg.colocated import ColocatedLearner
from distpg.config import ConfigError
from distpg.orchestrator import Trainer, TrainingError, plan_placement, sample_seed, step_prompts
from distpg.weights import FlatParams, WeightsError
from tests.conftest import small_config, train_stopped_after_checkpoint_then_resumed

KEYS = ("learner/loss", "learner/grad_norm", "rollout/reward_mean", "policy/version", "rollout/staleness_max")


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.ray
@pytest.mark.parametrize("extra", [["rollout.num_workers=1"], ["rollout.num_workers=2"],
                                   ["rollout.num_workers=1", "rollout.dtype=bfloat16"]],
                         ids=["1-worker", "2-workers", "1-worker-bf16"])
def test_a_colocated_run_computes_the_numbers_of_separate_actors(small_run, extra):
    # the session's runs: the plain 2-worker one is test_ray's and test_async's too, and the colocated 1-worker
    # one is the uninterrupted run of the resume test below
    run_apart, _ = small_run("run.steps=4", *extra)
    run_together, _ = small_run("run.steps=4", "rollout.colocate=true", *extra)
    apart, together = records(run_apart), records(run_together)
    assert len(apart) == len(together) == 4
    for a, t in zip(apart, together):
        assert {k: a[k] for k in KEYS} == {k: t[k] for k in KEYS}
    assert [t["policy/version"] for t in together] == [1, 2, 3, 4]


@pytest.mark.ray
def test_colocation_reserves_no_actor_for_worker_0_and_a_single_worker_step_is_one_call(ray_session, tmp_path):
    ray = ray_session
    cfg = small_config("rollout.num_workers=1", "rollout.colocate=true")
    placement = plan_placement(cfg, cpus=2, gpus=0)
    assert placement.bundles(1) == [{"CPU": 1.0}]  # the learner's bundle only
    two = plan_placement(small_config("rollout.colocate=true"), cpus=2, gpus=0)
    assert two.bundles(2) == [{"CPU": 1.0}, {"CPU": 0.5}] and two.bundle_index(1) == 1
    trainer = Trainer(cfg, tmp_path, placement)
    try:
        assert trainer.workers == [trainer.learner] and trainer.single_call
        trainer.broadcast(trainer.learner.get_weights.remote(), 0)
        trainer.open_outputs(0)
        calls, learner = [], trainer.learner

        class Counting:  # counts the remote calls the step makes to the learner's actor
            def __getattr__(self, name):
                calls.append(name)
                return getattr(learner, name)

        trainer.learner = Counting()
        try:
            record = trainer.sync_step(1)
        finally:
            trainer.learner = learner
        assert calls == ["step"] and record["policy/version"] == 1
        # the worker samples with the learner's very parameters (no copy) after the update
        shares = ray.get(learner.__ray_call__.remote(
            lambda self: self.worker.flat.flat.data_ptr() == self.flat.flat.data_ptr()), timeout=60)
        assert shares
        # nothing was published for the step: the driver holds no weights reference any more
        assert trainer.weights_ref is None and trainer.version == 1
        # the worker is labelled with the version it sampled with even when handed nothing
        batch = ray.get(learner.sample.remote(["abcd"], [99], 0), timeout=60)
        assert set(batch.column("policy_version").to_pylist()) == {1}
        trainer.logger.close()
    finally:
        trainer.close()


@pytest.mark.ray
def test_losing_the_learner_that_hosts_worker_0_stops_the_run_naming_it(ray_session, tmp_path):
    ray = ray_session
    cfg = small_config("rollout.colocate=true", "rollout.num_workers=2")
    trainer = Trainer(cfg, tmp_path, plan_placement(cfg, cpus=2, gpus=0))
    try:
        trainer.broadcast(trainer.learner.get_weights.remote(), 0)
        trainer.open_outputs(0)
        trainer.sync_step(1)
        ray.kill(trainer.learner, no_restart=True)
        # ray.kill is asynchronous: on a loaded machine the next sample call could still run before the kill
        # lands, and the update would fail instead (another message); wait until the actor is gone
        with pytest.raises(ray.exceptions.RayActorError):
            for _ in range(600):
                ray.get(trainer.learner.__ray_ready__.remote(), timeout=30)
                time.sleep(0.1)
        with pytest.raises(TrainingError, match=r"rollout worker 0, which runs in the learner's actor "
                           r"\(rollout.colocate\), died during step 2 .*so the run stops"):
            trainer.sync_step(2)
        assert trainer.restarts == 0  # not replaced as a worker would be
        trainer.logger.close()
    finally:
        trainer.close()


def test_colocate_needs_sync_mode_and_frees_a_workers_share():
    with pytest.raises(ConfigError, match=r"rollout.colocate=true needs run.mode=sync"):
        small_config("rollout.colocate=true", "run.mode=async")
    # 2 CPUs: the learner (1) and 2 workers (0.5 each) fit; 3 workers only when one is in the learner
    with pytest.raises(ConfigError, match=r"need 2.5 CPUs, but the Ray cluster has 2; .*or rollout.colocate=true"):
        plan_placement(small_config("rollout.num_workers=3", "rollout.prompts_per_step=6"), cpus=2, gpus=0)
    p = plan_placement(small_config("rollout.num_workers=3", "rollout.prompts_per_step=6", "rollout.colocate=true"),
                       cpus=2, gpus=0)
    assert p.reserved(3, "CPU") == 2.0 and len(p.bundles(3)) == 3


@pytest.mark.parametrize("dtype, layout", [("float32", "onednn"), ("float32", "transposed"), ("bfloat16", "onednn")])
def test_the_colocated_worker_samples_as_a_separate_one_in_one_process(pack_every_weight, monkeypatch, dtype, layout):
    """Without Ray: ColocatedLearner.step gives the batch and update of a RolloutWorker + Learner pair, also with
    learner.dtype=bfloat16 (the worker in the learner's process samples in float32 with the learner's float32
    parameters: the autocast covers the learner's passes only)."""
    from distpg.learner import Learner
    from distpg.rollout import RolloutWorker

    monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", layout)  # the transposed one is Intel's, oneDNN's the others'
    cfg = small_config("rollout.num_workers=1", f"learner.dtype={dtype}")
    both = ColocatedLearner(cfg)
    both.set_weights(both.get_weights())
    worker, learner = RolloutWorker(cfg, 0), Learner(cfg)
    weights = learner.get_weights()
    memory = []  # where the kept memory lies after each step
    for step in (1, 2, 3):
        prompts, ids = step_prompts(both.worker.task, cfg, step)
        seed = sample_seed(cfg.run.seed, step, 0)
        batch, metrics = both.step(prompts, ids, seed)
        ref_batch = worker.sample(prompts, ids, seed, weights)
        ref_metrics, weights = learner.update(ref_batch)
        assert batch.column("completion_tokens").equals(ref_batch.column("completion_tokens"))
        assert batch.column("completion_logprobs").equals(ref_batch.column("completion_logprobs"))
        assert metrics["learner/loss"] == ref_metrics["learner/loss"]
        assert {k: v for k, v in metrics.items() if not k.startswith("perf/")} == \
            {k: v for k, v in ref_metrics.items() if not k.startswith("perf/")}
        assert batch.column("policy_version").to_pylist() == [step - 1] * batch.num_rows
        # the sampled version's pre-packed weights are not kept over the update, their memory is (for the next)
        kept = kernels._packs.get(both.worker.model)  # (oneDNN's copies have no buffer: nothing is kept)
        assert kept is None if layout == "onednn" else kept.packed == [] and kept.key is kernels._SPARE
        memory.append(None if kept is None else kept.buffer.data_ptr())
    assert len(set(memory)) == 1  # each version's copies went into the memory the one before left
    assert all(torch.equal(a, b) for a, b in zip(both.model.parameters(), learner.model.parameters()))
    with pytest.raises(WeightsError, match=r"handed v2; its learner holds v3"):
        both.set_weights(learner.get_weights().__class__(2, weights.buffer, weights.manifest, weights.checksum))


def test_a_colocated_worker_samples_a_state_loaded_under_the_version_it_holds():
    """load_state writes new values into the parameters the worker views, perhaps under the version the
    worker already sampled: it must sample the loaded weights (no pre-packed copy of the old ones)."""
    cfg = small_config("rollout.num_workers=1")
    a, b = ColocatedLearner(cfg), ColocatedLearner(small_config("rollout.num_workers=1", "run.seed=5"))
    prompts, ids = step_prompts(a.worker.task, cfg, 1)
    a.sample(prompts, ids, seed=3)
    state = b.state()
    state["version"] = a.version  # b's weights under the version a holds
    a.load_state(state)
    got = a.sample(prompts, ids, seed=3)
    fresh = ColocatedLearner(cfg)
    fresh.load_state(state)
    want = fresh.sample(prompts, ids, seed=3)
    assert got.column("completion_tokens").equals(want.column("completion_tokens"))
    assert got.column("completion_logprobs").equals(want.column("completion_logprobs"))


def test_follow_shares_a_buffer_of_the_same_dtype_and_copies_into_another():
    from distpg.model import GPT, ModelShape

    shape = ModelShape(vocab_size=11, n_layer=1, n_head=2, n_embd=8, n_positions=16)
    torch.manual_seed(0)
    src, same, half = GPT(shape), GPT(shape), GPT(shape).to(torch.bfloat16)
    fs, f32, f16 = FlatParams(src), FlatParams(same), FlatParams(half)
    f32.follow(fs)
    assert f32.flat.data_ptr() == fs.flat.data_ptr()
    with torch.no_grad():
        src.wte.weight.add_(1.0)  # an update in place is seen without another follow
    assert torch.equal(same.wte.weight, src.wte.weight)
    f16.follow(fs)
    assert f16.flat.dtype == torch.bfloat16 and f16.flat.data_ptr() != fs.flat.data_ptr()
    assert torch.equal(half.wte.weight, src.wte.weight.to(torch.bfloat16))
    other = FlatParams(GPT(ModelShape(vocab_size=12, n_layer=1, n_head=2, n_embd=8, n_positions=16)))
    with pytest.raises(WeightsError, match="differ in shape"):
        f32.follow(other)
    # a worker that followed and then loads a message copies into a buffer of its own, never the learner's
    before = src.wte.weight.detach().clone()
    msg = FlatParams(GPT(shape)).pack(7)
    f32.load(msg, share=False)
    assert torch.equal(src.wte.weight, before) and f32.flat.data_ptr() != fs.flat.data_ptr()


@pytest.mark.ray
def test_a_colocated_run_stopped_after_a_checkpoint_resumes_exactly(small_run, tmp_path, monkeypatch):
    from distpg import checkpoint

    overrides = ("run.steps=4", "run.checkpoint_every=2", "rollout.num_workers=1", "rollout.colocate=true")
    cfg = small_config(*overrides)
    run_whole, _ = small_run(*overrides)  # the colocated 1-worker run of the test above
    train_stopped_after_checkpoint_then_resumed(cfg, tmp_path / "cut", 2, monkeypatch)
    whole, cut = records(run_whole), records(tmp_path / "cut")
    assert [{k: r[k] for k in KEYS} for r in cut] == [{k: r[k] for k in KEYS} for r in whole]
    a = checkpoint.load(checkpoint.latest(run_whole))[0]["model"]
    b = checkpoint.load(checkpoint.latest(tmp_path / "cut"))[0]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_colocated_worker_views_the_learners_device_buffer():
    cfg = small_config("rollout.num_workers=1")
    both = ColocatedLearner(cfg, device="cuda")
    both.set_weights(both.get_weights())
    prompts, ids = step_prompts(both.worker.task, cfg, 1)
    batch, metrics = both.step(prompts, ids, sample_seed(cfg.run.seed, 1, 0))
    assert both.worker.flat.flat.is_cuda and both.worker.flat.flat.data_ptr() == both.flat.flat.data_ptr()
    assert metrics["policy/version"] == 1 and batch.num_rows == len(prompts) * cfg.rollout.group_size


def test_a_node_resource_only_worker_0_would_have_used_is_refused_when_colocated():
    nodes = [{"CPU": 4, "distpg_node_1": 1}, {"CPU": 4, "distpg_node_2": 1}]
    with pytest.raises(ConfigError, match=r"'distpg_node_1' pins no rollout worker, because with rollout.colocate"):
        plan_placement(small_config("rollout.colocate=true", "rollout.node_resource=[distpg_node_1, distpg_node_2]"),
                       cpus=8, gpus=0, nodes=nodes)
    with pytest.raises(ConfigError, match=r"'distpg_node_1' pins no rollout worker"):
        plan_placement(small_config("rollout.colocate=true", "rollout.num_workers=1",
                                    "rollout.node_resource=distpg_node_1"), cpus=8, gpus=0, nodes=nodes)
    # worker 1 keeps its pin; the same list without colocation pins both
    both = "rollout.node_resource=[distpg_node_1, distpg_node_2]"
    p = plan_placement(small_config("rollout.colocate=true", "rollout.num_workers=3", "rollout.prompts_per_step=6",
                                    both), cpus=8, gpus=0, nodes=nodes)
    assert [b.get("distpg_node_2", 0) > 0 for b in p.bundles(3)[1:]] == [True, False]
    plan_placement(small_config("rollout.node_resource=[distpg_node_1, distpg_node_2]"), cpus=8, gpus=0, nodes=nodes)
