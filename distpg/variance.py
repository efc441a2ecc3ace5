"""`distpg bench variance`: the variance of the policy-gradient estimate under each baseline.

On a fixed policy (the config's initial model) and task, draw M independent batches of P prompts x G
samples, compute the gradient estimate of every baseline from the *same* samples (common random numbers),
and report the total variance E‖ĝ − E ĝ‖² of each, and its ratio to `none`. All four estimators are
unbiased (tests/test_estimator.py proves it by enumeration), so a lower variance is a plain win.

The value baseline needs a trained value head: it is fitted first by regression to the rewards on
separate samples of the same fixed policy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from distpg import algo
from distpg.batch import to_learner_batch
from distpg.config import Config
from distpg.learner import Learner
from distpg.orchestrator import step_prompts
from distpg.rollout import RolloutWorker

BASELINES = ("none", "ema", "group", "value")


def _batch(worker: RolloutWorker, cfg: Config, k: int):
    prompts, ids = step_prompts(worker.task, cfg, 10_000 + k)
    lb = to_learner_batch([worker.sample(prompts, ids, seed=k)], pad_id=0)
    return lb


def _forward(learner: Learner, lb):
    tokens, mask = lb.tokens, lb.response_mask[:, 1:]
    logits, hidden = learner.model(tokens[:, :-1], return_hidden=True)
    # the tempered policy the samples come from (rollout.temperature), as the learner trains it
    logp = torch.gather(torch.log_softmax(learner.tempered(logits.float()), -1), -1, tokens[:, 1:, None]).squeeze(-1)
    return logp, mask, hidden


def fit_value_head(learner: Learner, worker: RolloutWorker, cfg: Config, iters: int) -> float:
    """Regress the value head on the fixed policy's samples; returns the final mean squared error."""
    head = learner.value_head
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    mse = float("nan")
    for k in range(iters):
        lb = _batch(worker, cfg, 50_000 + k)
        with torch.no_grad():
            _, mask, hidden = _forward(learner, lb)
        values = head(hidden).squeeze(-1)
        err = torch.where(mask, values - lb.rewards[:, None], 0.0)
        loss = (err**2).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mse = float(loss.detach())
    return mse


def bench_variance(cfg: Config, batches: int = 40, value_fit_iters: int = 150, out: Path | None = None,
                   policy: str | None = None) -> dict:
    """Variance of each baseline's gradient estimate on a fixed policy (the config's initial model, or the
    latest checkpoint of the run folder `policy`, whose config `cfg` must then be); prints a table."""
    cfg = _with_value(cfg)
    learner, worker = Learner(cfg), RolloutWorker(cfg, 0)
    if policy is not None:
        from distpg.evaluate import load_policy

        _, trained = load_policy(Path(policy))
        learner.model.load_state_dict(trained.state_dict())  # the same shape: cfg is the run's config
    worker.set_weights(learner.get_weights())
    params = list(learner.model.parameters())
    t0 = time.perf_counter()
    value_mse = fit_value_head(learner, worker, cfg, value_fit_iters)
    G = cfg.rollout.group_size
    estimates: dict[str, list[torch.Tensor]] = {b: [] for b in BASELINES}
    ema = None
    for k in range(batches):
        lb = _batch(worker, cfg, k)
        B = lb.tokens.shape[0]
        logp, mask, hidden = _forward(learner, lb)
        values = learner.value_head(hidden.detach()).squeeze(-1)
        rewards, ok = lb.rewards.view(-1, G), lb.ok.view(-1, G)
        for b in BASELINES:
            if b == "value":
                adv = algo.value_advantages(lb.rewards, values)
            else:
                adv = algo.advantages(rewards, ok, b, ema)[0].reshape(B)
            loss = algo.pg_loss(logp, mask, adv, num_samples=B)
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            estimates[b].append(-torch.cat([g.reshape(-1) for g in grads]).double())
        ema = algo.ema_update(ema, float(lb.rewards.mean()), cfg.algo.ema_decay)
    stats = {}
    for b, est in estimates.items():
        e = torch.stack(est)
        mean = e.mean(0)
        stats[b] = {"variance": float(((e - mean) ** 2).sum(1).mean()), "mean_norm": float(mean.norm())}
    ref = stats["none"]["variance"]
    for b in BASELINES:
        stats[b]["ratio_to_none"] = stats[b]["variance"] / ref
    result = {
        "task": cfg.task.name, "model": f"{cfg.model.n_layer}x{cfg.model.n_embd}",
        "prompts_per_batch": cfg.rollout.prompts_per_step, "group_size": G, "batches": batches,
        "policy": policy or "initial", "value_head_mse": value_mse, "seconds": time.perf_counter() - t0,
        "baselines": stats,
    }
    print(f"gradient variance on the {policy or 'initial'} {result['model']} policy, task {cfg.task.name}, "
          f"{batches} batches of {cfg.rollout.prompts_per_step} prompts x {G} samples (same samples for all)")
    print(f"{'baseline':<9} {'E|g - Eg|^2':>12} {'ratio to none':>14}")
    for b in BASELINES:
        print(f"{b:<9} {stats[b]['variance']:>12.4g} {stats[b]['ratio_to_none']:>14.3f}")
    print(f"(value head fitted for {value_fit_iters} batches first: mean squared error {value_mse:.4f})")
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1))
    return result


def _with_value(cfg: Config) -> Config:
    """The same config with a value head (the learner builds it for baseline=value)."""
    import dataclasses

    return dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, baseline="value"))


__all__ = ["bench_variance"]
