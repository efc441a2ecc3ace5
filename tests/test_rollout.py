"""RolloutWorker as a plain class: weights handed along with a sample call, zero-copy loading."""

import dataclasses

import pytest
import torch

from distpg import kernels
from distpg.learner import Learner
from distpg.rollout import RolloutWorker
from distpg.weights import WeightsError
from tests.conftest import small_config

PROMPTS, IDS = ["abcd=", "dcba=", "bbad="], [0, 1, 2]


def test_weights_handed_with_sample_are_loaded_first_without_a_copy(pack_every_weight):
    cfg = small_config()
    learner, worker, copied = Learner(cfg), RolloutWorker(cfg, 0), RolloutWorker(cfg, 0)
    v0 = learner.get_weights()
    _, v1 = learner.update(worker.sample(PROMPTS, IDS, seed=0, weights=v0))
    assert worker.version == 0

    batch = worker.sample(PROMPTS, IDS, seed=1, weights=v1)
    assert worker.version == 1 and set(batch.column("policy_version").to_pylist()) == {1}
    assert float(batch.schema.metadata[b"sync_s"]) >= 0
    assert worker.flat.held is v1  # the parameters are views of the message's buffer
    start = v1.buffer.ctypes.data
    assert all(start <= p.data_ptr() < start + v1.nbytes for p in worker.model.parameters())

    # the same versions through the copying load, which overwrites the same parameter memory: the weights
    # laid out for oneDNN for v0 (kernels.packed_weights) must not serve v1
    copied.flat.load(v0, share=False)
    copied.version = 0
    copied.sample(PROMPTS, IDS, seed=0)
    assert kernels.packing_unavailable(torch.float32) or copied.model in kernels._packs  # v0's, kept
    pointers = [p.data_ptr() for p in copied.model.parameters()]
    copied.flat.load(v1, share=False)
    copied.version = 1
    assert [p.data_ptr() for p in copied.model.parameters()] == pointers
    other = copied.sample(PROMPTS, IDS, seed=1)
    assert batch.replace_schema_metadata(None).equals(other.replace_schema_metadata(None))
    assert all(torch.equal(a, b) for a, b in zip(worker.model.parameters(), copied.model.parameters()))

    worker.sample(PROMPTS, IDS, seed=2, weights=v1)  # the version held: nothing to load
    assert worker.flat.held is v1
    copied.set_weights(v0)  # a new version drops the old one's pre-packed weights before it loads
    assert copied.model not in kernels._packs
    with pytest.raises(WeightsError, match="holds policy v1 and was handed the older v0"):
        worker.sample(PROMPTS, IDS, seed=3, weights=v0)
    assert worker.version == 1


def test_a_corrupted_message_from_another_node_is_refused():
    cfg = small_config()
    learner, worker = Learner(cfg), RolloutWorker(cfg, 0)
    v0 = learner.get_weights()
    _, v1 = learner.update(worker.sample(PROMPTS, IDS, seed=0, weights=v0))
    corrupted = dataclasses.replace(v1, buffer=v1.buffer.copy(), node="another node")
    corrupted.buffer[7] += 1.0
    with pytest.raises(WeightsError, match="v1: checksum mismatch"):
        worker.sample(PROMPTS, IDS, seed=1, weights=corrupted)
    assert worker.version == 0 and worker.flat.held is v0


def test_sample_before_any_weights_is_an_error():
    worker = RolloutWorker(small_config(), 0)
    with pytest.raises(RuntimeError, match="before set_weights"):
        worker.sample(PROMPTS, IDS, seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_worker_on_cuda_copies_the_handed_weights_to_the_device():
    cfg = small_config()
    learner, cpu, gpu = Learner(cfg), RolloutWorker(cfg, 0), RolloutWorker(cfg, 0, device="cuda")
    v0 = learner.get_weights()
    _, v1 = learner.update(cpu.sample(PROMPTS, IDS, seed=0, weights=v0))
    gpu.sample(PROMPTS, IDS, seed=1, weights=v1)
    assert gpu.version == 1 and gpu.flat.held is None and gpu.flat.flat.is_cuda
    for a, b in zip(learner.model.parameters(), gpu.model.parameters()):
        assert b.is_cuda and torch.equal(a.detach().cpu(), b.cpu())
