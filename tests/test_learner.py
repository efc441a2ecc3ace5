"""The learner as a plain class: bad numbers skip the step and leave every state untouched."""

import pytest
import torch

from distpg.learner import Learner
from distpg.rollout import RolloutWorker
from tests.conftest import small_config


def setup(*overrides):
    cfg = small_config(*overrides)
    learner, worker = Learner(cfg), RolloutWorker(cfg, 0)
    worker.set_weights(learner.get_weights())
    return learner, worker


def snapshot(learner):
    params = [p.detach().clone() for p in learner.model.parameters()]
    moments = {k: {n: t.clone() for n, t in v.items()} for k, v in learner.optimizer.state.items()}
    return params, moments


def nan_forward(model):
    real = model.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        return out * float("nan")

    return forward


def test_non_finite_loss_skips_the_step_and_changes_nothing():
    learner, worker = setup()
    batch = worker.sample(["abcd=", "dcba="], [0, 1], seed=0)
    learner.update(batch)  # one real step first, so the optimizer has moments to protect
    params, moments = snapshot(learner)
    version = learner.version
    learner.model.forward = nan_forward(learner.model)
    metrics, weights = learner.update(batch)
    # the version still counts the update (unchanged weights are published as the next version)
    assert metrics["learner/skipped_steps"] == 1 and learner.version == weights.version == version + 1
    new_params, new_moments = snapshot(learner)
    assert all(torch.equal(a, b) for a, b in zip(params, new_params))
    assert moments.keys() == new_moments.keys()
    for k in moments:
        assert all(torch.equal(moments[k][n], new_moments[k][n]) for n in moments[k])
    assert all(p.grad is None for p in learner.model.parameters())
    del learner.model.forward  # back to the real forward: training goes on
    metrics, _ = learner.update(batch)
    assert learner.version == version + 2 and metrics["learner/skipped_steps"] == 1


def test_too_many_consecutive_skips_stop_with_a_clear_message():
    learner, worker = setup("learner.max_consecutive_skips=2")
    batch = worker.sample(["abcd="], [0], seed=0)
    learner.model.forward = nan_forward(learner.model)
    learner.update(batch)
    learner.update(batch)
    with pytest.raises(FloatingPointError, match=r"3 consecutive updates .* learner.max_consecutive_skips=2"):
        learner.update(batch)


def test_micro_batches_give_the_same_gradient_step():
    a, worker = setup()
    b, _ = setup("learner.micro_batch_size=3")
    batch = worker.sample(["abcd=", "bbca=", "ddda="], [0, 1, 2], seed=3)
    ma, _ = a.update(batch)
    mb, _ = b.update(batch)
    assert ma["learner/loss"] == pytest.approx(mb["learner/loss"], rel=1e-5)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_recomputed_logprobs_match_the_samplers():
    learner, worker = setup()
    batch = worker.sample(["abcd=", "dcba="], [0, 1], seed=1)
    metrics, _ = learner.update(batch)
    # k3 KL between the sampler's stored log-probs and the learner's recomputation: ~0 on-policy
    assert 0 <= metrics["learner/kl"] < 1e-6
