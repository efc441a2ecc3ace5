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
    copied.set_weights(v0)  # a new version drops the old one's pre-packed weights before it loads (their
    kept = kernels._packs.get(copied.model)  # memory, the transposed layout's, stays for the next ones)
    assert kept is None or kept.packed == [] and kept.key is kernels._SPARE and kept.buffer is not None
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


def test_stop_strings_cut_each_completion_after_the_token_that_completes_one(pack_every_weight, decoded_rows):
    """rollout.stop: the same samples as without it (the same seed and weights), each cut after the token that
    completes the first stop string in its text: tokens, both log-prob lists and the text cut together, not
    truncated; completions without one unchanged; the rows that reached one decoded no further (checked with the
    stop token). The learner takes the cut batch; eval cuts the same way."""
    from distpg.evaluate import evaluate

    decoded = decoded_rows
    plain, cfg = small_config("task.length=6"), small_config("task.length=6", "rollout.stop=[ab, c]")
    learner = Learner(plain)
    v0 = learner.get_weights()
    before = RolloutWorker(plain, 0).sample(PROMPTS, IDS, seed=0, weights=v0)
    rows_decoded, decoded[:] = sum(decoded), []
    after = RolloutWorker(cfg, 0).sample(PROMPTS, IDS, seed=0, weights=v0)
    assert sum(decoded) < rows_decoded
    decode, cut = RolloutWorker(cfg, 0).tokenizer.decode, 0
    for x, y in zip(before.to_pylist(), after.to_pylist()):
        tokens = x["completion_tokens"]  # the first prefix whose text holds a stop string, token by token
        n = next((k for k in range(1, len(tokens) + 1) if "ab" in decode(tokens[:k]) or "c" in decode(tokens[:k])),
                 None)
        if n is None:
            assert y == x
            continue
        cut += 1
        assert y["completion_tokens"] == tokens[:n] and y["completion_text"] == decode(tokens[:n])
        text = y["completion_text"]
        assert text.endswith(("ab", "c")) and text.count("c") + text.count("ab") == 1
        for name in ("completion_logprobs", "completion_policy_logprobs"):
            assert y[name] == x[name][:n]
        assert y["truncated"] is False
    assert 0 < cut < before.num_rows
    learner.update(after)  # a valid batch

    for c in [c for _, c, _, _ in evaluate(cfg, learner.model.eval(), temperature=1.0).samples]:
        ends = [c.find(s) + len(s) for s in ("ab", "c") if s in c]
        assert not ends or min(ends) == len(c), c

    from distpg.config import ConfigError
    from distpg.orchestrator import validate_with_task
    from distpg.policy import task_for

    never = small_config("task.length=6", r'rollout.stop=[ab, "\n"]')  # the task's characters have no newline
    with pytest.raises(ConfigError, match=r"rollout.stop: the policy's tokenizer cannot write '\\n', so it would "
                                          "never end a completion"):
        validate_with_task(never, task_for(never))
