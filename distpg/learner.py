"""Learner: a plain class holding the policy being trained and its optimizer.

`update(*batches)` validates the trajectory batches, computes advantages, recomputes log-probabilities
in one batched forward (micro-batches only to fit memory), takes one optimizer step (learner.epochs x
learner.mini_batches of them, the steps after the first correcting every sample as off-policy), bumps the
policy version and returns the metrics and the new weights. An optimizer step whose loss or gradient is not
finite is skipped: parameters and optimizer state stay as they were (the version still counts the update).

The orchestrator makes it a Ray actor; tests construct it directly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time

import numpy as np
import pyarrow as pa
import torch

from distpg import algo, kernels
from distpg.batch import BatchError, LearnerBatch, to_learner_batch, validate
from distpg.config import Config
from distpg.generate import filters
from distpg.memory import retain_freed_memory
from distpg.model import forward_shared_prompts, token_logprobs
from distpg.policy import initial_policy, task_for
from distpg.rewards import RewardError, failure_in
from distpg.weights import FlatParams, WeightsMessage


def group_view(b: LearnerBatch) -> tuple[torch.Tensor, int]:
    """Order of samples that puts the G samples of each prompt in one row of a (P, G) view.

    Returns:
        order (B,) indices sorted by prompt_id, and G.
    Raises:
        BatchError if the prompts do not all have the same number of samples.
    """
    order = torch.argsort(b.prompt_id, stable=True)
    _, counts = torch.unique_consecutive(b.prompt_id[order], return_counts=True)
    G = int(counts[0])
    if not bool((counts == G).all()):
        raise BatchError(f"trajectory batch: prompts have different numbers of samples ({counts.unique().tolist()})")
    return order, G


class Learner:
    """The policy being trained, its optimizer, and the baseline state."""

    def __init__(self, cfg: Config, num_threads: int = 1, device: str = "cpu") -> None:
        retain_freed_memory()  # see distpg.memory: no page faults for each step's tensors
        torch.set_num_threads(max(1, num_threads))
        self.cfg = cfg
        self.device = device
        kernels.enabled = cfg.rollout.cpu_kernels  # the reference policy's forward (no autograd) may use them
        check_learner_dtype(cfg.learner.dtype, device)
        self.model = initial_policy(cfg, device)[1].train()
        self.vocab_size = self.model.shape.vocab_size  # every token id a batch may hold
        self.flat = FlatParams(self.model)
        ac, lc = cfg.algo, cfg.learner
        # a frozen copy of the initial policy for the KL penalty (also after a resume: built before loading)
        self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False) if ac.kl_coef > 0 else None
        # the value baseline: a linear head on the policy's final hidden states (detached: the value loss
        # trains the head only and never changes the policy)
        self.value_head = torch.nn.Linear(cfg.model.n_embd, 1).to(device) if ac.baseline == "value" else None
        if self.value_head is not None:
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        self.fused_adam = torch.device(device).type in ("cpu", "cuda")
        # PyTorch's fused AdamW (one kernel over each parameter, on the CPU as on CUDA): on a CPU, one thread,
        # a step took 0.26 / 2.9 / 127 ms at the tiny / 4x256 / GPT-2 124M policies against 1.1 / 15 / 795 ms
        # for the per-tensor loop PyTorch picks by default there (and 0.8 / 9 / 600-750 for foreach)
        self.optimizer = torch.optim.AdamW(
            self.trainable(), lr=lc.lr, betas=(lc.beta1, lc.beta2), weight_decay=lc.weight_decay,
            fused=self.fused_adam,
        )
        self.version = 0
        self.ema: float | None = None
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.ledger: list[torch.Tensor] | None = [] if cfg.log.ledger else None
        self.eval_task = self.test_task = None  # the task (and task.eval_prompts_path's), built by `evaluate`

    def trainable(self) -> list[torch.nn.Parameter]:
        head = list(self.value_head.parameters()) if self.value_head is not None else []
        return list(self.model.parameters()) + head

    # ------------------------------------------------------------------------------------------ weights
    def get_weights(self) -> WeightsMessage:
        return self.flat.pack(self.version)

    def get_version(self) -> int:
        return self.version

    def get_ledger(self) -> list[tuple[int, int, int]]:
        """Every (prompt_id, sample_idx, version) consumed by an update (with log.ledger on)."""
        if not self.ledger:
            return []
        return [tuple(r) for r in torch.cat(self.ledger, dim=1).T.tolist()]

    # ------------------------------------------------------------------------------------------- update
    def update(self, *batches: pa.RecordBatch) -> tuple[dict, WeightsMessage]:
        """One policy-gradient step on the given batches; returns (metrics, new weights)."""
        return self.learn(*batches), self.get_weights()

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision of the policy's forward passes: bfloat16 autocast with learner.dtype=bfloat16 (the
        parameters, gradients and optimizer state stay float32), else nothing changes. Its outputs are taken
        back to float32 before any loss term."""
        if self.cfg.learner.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=getattr(torch, self.cfg.learner.dtype))

    def tempered(self, logits: torch.Tensor) -> torch.Tensor:
        """The policy the learner follows is softmax(logits / rollout.temperature): the distribution the
        workers sample from (before top-k/top-p), as TRL, OpenRLHF and veRL have it."""
        T = self.cfg.rollout.temperature
        return logits if T == 1.0 else logits / T

    def learn(self, *batches: pa.RecordBatch) -> dict:
        """One policy-gradient step on the given batches; returns its metrics (`update` also publishes)."""
        t0 = time.perf_counter()
        for batch in batches:
            validate(batch, self.vocab_size)
        b = to_learner_batch(list(batches), pad_id=0)
        order, G = group_view(b)
        b = LearnerBatch(**{k: v[order] for k, v in b.__dict__.items()}).to(self.device)
        B = b.tokens.shape[0]
        staleness = self.version - b.policy_version  # (B,) versions behind the learner
        if bool((staleness < 0).any()):
            raise BatchError(f"trajectory batch: policy_version {int(b.policy_version.max())} is newer than the "
                             f"learner's {self.version}")
        # samples drawn from another policy than the learner's: older versions, or the same version sampled
        # in a lower precision (rollout.dtype), which is a slightly different distribution mu
        # and samples from a top-k/top-p filtered distribution, which is not the policy's: pi/mu <= 1 on
        # every token they hold (mu renormalises pi over a subset); a learner in a lower precision
        # (learner.dtype) differs from the sampler by its own rounding
        rc, lc = self.cfg.rollout, self.cfg.learner
        rounding = rc.dtype != "float32" or lc.dtype != "float32"
        stale = (staleness > 0) | rounding | filters(rc.temperature, rc.top_k, rc.top_p)
        ac = self.cfg.algo
        mb = lc.micro_batch_size or B
        chunks = [slice(s, s + mb) for s in range(0, B, mb)]  # for the reference policy's forward
        lengths = [int(b.response_mask[idx].any(0).nonzero().max()) + 1 for idx in chunks]  # trim padding
        prompt_len = b.response_mask.int().argmax(1)  # each row's first completion token follows its prompt

        # pi_old, the sampling version's policy, as the learner computes it: where the sampler and the learner
        # differ only by float rounding (float32 on both sides), the sampler's own log pi_old (before top-k/top-p)
        # is it; where either side runs in bfloat16, the two differ by that rounding (a few tenths of a nat on
        # logits as large as a pretrained GPT-2's), so for the samples of the learner's own version the learner
        # recomputes it, as veRL's and OpenRLHF's actors recompute old_log_prob: it anchors PPO's clip and the
        # KL penalty, and the sampler's mu enters only through the detached weight pi_old/mu. One no-grad forward
        # before the update where it is needed before the first optimizer step (the KL penalty, or several
        # optimizer steps); otherwise the first step's own forward gives it (`own` None, `fresh` set)
        # The value baseline's V(s_{i,t}) comes from the value head as it was before this update (as PPO computes
        # its advantages once per batch) where there are several optimizer steps: after a step on a sample, the
        # head has been fit to that sample's own return, and r_i - V(s_{i,t}) would no longer be an unbiased
        # baseline. One step alone (the defaults) takes them from its own forward. Where both are needed, the
        # one no-grad forward gives pi_old and the values
        pi_old = b.policy_logprobs
        fresh = (staleness == 0) if rounding else None
        own_needed = fresh is not None and bool(fresh.any()) and (self.ref_model is not None
                                                                   or lc.epochs * lc.mini_batches > 1)
        values_needed = self.value_head is not None and lc.epochs * lc.mini_batches > 1
        own, values = self._without_grad(self.model, b, chunks, lengths, prompt_len, own_needed,
                                         self.value_head if values_needed else None)
        if own is not None:
            pi_old, fresh = torch.where(fresh[:, None], own, b.policy_logprobs), None

        # KL to the reference policy: K_i = Σ_t k_t with log π from the sampler's policy (= πθ on-policy); its
        # score-function part enters through the rewards, its pathwise part through the loss below.
        ref_lp = torch.zeros_like(b.old_logprobs)
        kl_seq = torch.zeros(B, device=b.tokens.device)
        if self.ref_model is not None:
            ref_lp, _ = self._without_grad(self.ref_model, b, chunks, lengths, prompt_len)
            k = algo.kl_per_token(pi_old, ref_lp, ac.kl_estimator)
            kl_seq = torch.where(b.response_mask, k, 0.0).sum(1)
        returns = b.rewards - ac.kl_coef * kl_seq if self.ref_model is not None else b.rewards
        rewards, ok = returns.view(-1, G), b.ok.view(-1, G)
        adv, valid = algo.advantages(rewards, ok, ac.baseline, self.ema)
        # 1 / (reward std) of each sample's batch or group (ones without whitening), also for the value
        # baseline's per-token advantages, which are computed per micro-batch below, and for the KL's pathwise
        # part: whitening rescales each sample's whole gradient. The std is of the task's rewards, not of the
        # returns r - beta K: a group whose rewards are all equal differs only by its KL, and dividing by that
        # std (about beta times the KL's) would blow the KL penalty up into unit-size advantages
        scale = algo.whiten(torch.ones_like(adv), b.rewards.view(-1, G), ok, ac.whiten).reshape(B)
        adv, valid = adv.reshape(B) * scale, valid.reshape(B)

        unscored = not bool(b.ok.any())  # every reward of the step failed (timeouts, a dead child, a service down)
        if unscored and self.consecutive_skips >= lc.max_consecutive_skips:  # raised before anything changes
            why = failure[1] if (failure := failure_in(batches)) else "no reward function scored them"
            raise RewardError(
                f"no sample's reward was scored in {self.consecutive_skips + 1} steps in a row (the last: {why}); "
                f"learner.max_consecutive_skips={lc.max_consecutive_skips}: nothing is learned from such steps. Fix "
                "the reward function or what it calls, then resume from the latest checkpoint")

        # The version counts updates attempted: a skipped one publishes unchanged weights under the next
        # version, so version == step always holds (the async schedule relies on it).
        self.version += 1
        lr = lc.lr * algo.lr_factor(self.version, lc.lr_schedule, lc.warmup_steps, self.cfg.run.steps, lc.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.ledger is not None:  # (prompt_id, sample_idx, version of this update): consumed once, used or not
            self.ledger.append(torch.stack([b.prompt_id, b.sample_idx, torch.full_like(b.prompt_id, self.version)]))
        # learner.epochs passes over the batch, each split into learner.mini_batches parts of whole prompt groups,
        # an optimizer step each (PPO's epochs and mini-batches). After the first step the learner's policy is no
        # longer the one that sampled: every sample is off-policy, corrected by algo.off_policy (clipped: PPO's
        # surrogate around the sampling version's policy)
        groups = B // G
        bounds = [G * (groups * m // lc.mini_batches) for m in range(lc.mini_batches + 1)]
        parts = [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        diagnostics, corrected, off_tokens, taken, skipped = [], 0, 0, False, None
        batch = b, adv, valid, scale, returns, ref_lp, stale, prompt_len, values, pi_old, fresh  # the groups' order
        for epoch in range(lc.epochs):
            if epoch and lc.mini_batches > 1:  # each later pass splits the groups afresh, as PPO's loaders shuffle
                order = mini_batch_order(self.cfg.run.seed, self.version, epoch, groups, lc.mini_batches)
                rows_order = (torch.tensor(order)[:, None] * G + torch.arange(G)).reshape(-1).to(b.tokens.device)
                b = LearnerBatch(**{k: v[rows_order] for k, v in batch[0].__dict__.items()})
                adv, valid, scale, returns, ref_lp, stale, prompt_len, values, pi_old, fresh = (
                    None if t is None else t[rows_order] for t in batch[1:])
            for m, rows in enumerate(parts):
                off_policy = stale[rows] if epoch == 0 and m == 0 else torch.ones_like(stale[rows])
                step = self._optimizer_step(b, rows, adv, valid, scale, returns, ref_lp, off_policy, prompt_len,
                                            values, pi_old, fresh)
                if step is None:  # no sample of this part carries gradient (every reward failed)
                    continue
                diagnostics.append(step)
                corrected += step.pop("corrected")
                # of the tokens that carry gradient, as `corrected` counts them (a failed reward's never are)
                off_tokens += int((b.response_mask[rows] & (off_policy & valid[rows])[:, None]).sum())
                if step.pop("taken"):
                    taken = True
                else:
                    skipped = step
        # learner.max_consecutive_skips counts updates: one with a skipped optimizer step (a non-finite loss or
        # gradient), however many of its epochs x mini_batches steps were, is one skipped update; so is one
        # whose rewards all failed (checked above, before the update)
        if unscored:
            self.consecutive_skips += 1
        elif skipped is not None:
            self.consecutive_skips += 1
            limit = lc.max_consecutive_skips
            if self.consecutive_skips > limit:
                raise FloatingPointError(
                    f"{self.consecutive_skips} consecutive updates had a non-finite loss or gradient "
                    f"(loss {skipped['loss']}, grad norm {skipped['grad_norm']}) and were skipped; "
                    f"learner.max_consecutive_skips={limit}. Lower learner.lr, check the reward scale, or resume "
                    "from the latest checkpoint"
                )
        elif taken:
            self.consecutive_skips = 0
        if taken and bool(ok.any()):
            self.ema = algo.ema_update(self.ema, float(rewards[ok].mean()), self.cfg.algo.ema_decay)

        def mean(key: str) -> float:
            return sum(d[key] for d in diagnostics) / len(diagnostics) if diagnostics else 0.0

        learn_s = time.perf_counter() - t0
        metrics = {
            "learner/loss": mean("loss"),
            "learner/grad_norm": mean("grad_norm"),
            "learner/lr": lr,
            "learner/entropy": mean("entropy"),
            "learner/kl": mean("kl"),
            "learner/skipped_steps": self.skipped_steps,
            "learner/value_loss": mean("value_loss"),
            "learner/kl_ref": float(kl_seq.mean()),
            "learner/baseline_ema": self.ema if self.ema is not None else 0.0,
            "policy/version": self.version,
            "rollout/staleness_mean": float(staleness.float().mean()),
            "rollout/staleness_max": int(staleness.max()),
            "learner/offpolicy_corrected_frac": corrected / max(1, off_tokens),
            "perf/learner_tokens_per_s": float(b.response_mask.shape[0] * b.tokens.shape[1]) / learn_s,
            "perf/learner_compute_s": learn_s,
        }
        return metrics

    def _without_grad(self, model: torch.nn.Module, b: LearnerBatch, chunks: list[slice], lengths: list[int],
                      prompt_len: torch.Tensor, logprobs: bool = True, value_head: torch.nn.Module | None = None
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One no-grad forward of `model` (the policy, or the KL's reference policy) over the batch as the update
        runs it (in learner.dtype, each group's prompt once, in micro-batches `chunks` trimmed to `lengths`, the
        output layer at the response tokens only), for (B, T) log-probabilities of each row's response tokens
        (tempered; 0 elsewhere) where `logprobs`, and (B, T-1) values V(s_t) from `value_head` where given; None
        for either not asked for (and no forward where neither is)."""
        if not logprobs and value_head is None:
            return None, None
        tokens = b.tokens
        out = torch.zeros(tokens.shape, device=tokens.device) if logprobs else None
        values = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, device=tokens.device) \
            if value_head is not None else None
        with torch.no_grad():
            for idx, L in zip(chunks, lengths):
                keep = b.response_mask[idx, 1:L] & logprobs  # no logits at all for the values alone
                with self.autocast():
                    res = forward_shared_prompts(model, tokens[idx, : L - 1], prompt_len[idx],
                                                 return_hidden=value_head is not None, logits_at=keep)
                logits, hidden = res if value_head is not None else (res, None)
                if out is not None:
                    lp = token_logprobs(self.tempered(logits.float()), tokens[idx, 1:L][keep])
                    out[idx, 1:L] = unpacked(keep, lp)
                if values is not None:
                    values[idx, : L - 1] = value_head(hidden.float()).squeeze(-1)
        return out, values

    def _optimizer_step(self, b: LearnerBatch, rows: slice, adv: torch.Tensor, valid: torch.Tensor,
                        scale: torch.Tensor, returns: torch.Tensor, ref_lp: torch.Tensor, stale: torch.Tensor,
                        prompt_len: torch.Tensor, baseline: torch.Tensor | None = None,
                        pi_old: torch.Tensor | None = None, fresh: torch.Tensor | None = None) -> dict | None:
        """One optimizer step on the samples `rows` of the batch (the whole batch, or a mini-batch of whole
        prompt groups), in micro-batches of learner.micro_batch_size; `stale` marks the samples to correct as
        off-policy; `baseline`: the value baseline's V(s_{i,t}) of the whole batch, (B, T-1) (None: this step's
        value head's); `pi_old`: (B, T) log pi_old, the clip's anchor (None: the sampler's `policy_logprobs`);
        `fresh`: (B,) samples whose pi_old is this step's own log-probabilities, detached (the first optimizer
        step's, where nothing was recomputed before). Returns its diagnostics (None, and no step, where no sample
        carries gradient); skips the step where the loss or the gradient is not finite."""
        ac = self.cfg.algo
        if not bool(valid[rows].any()):
            return None  # an optimizer step would only replay momentum
        B, num_tokens = rows.stop - rows.start, int(b.response_mask[rows].sum())
        learned_tokens = int((b.response_mask[rows] & valid[rows, None]).sum())
        mb = self.cfg.learner.micro_batch_size or B
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = ent_sum = kl_sum = value_loss_sum = 0.0
        corrected = 0
        for lo in range(0, B, mb):
            chunk = slice(rows.start + lo, min(rows.start + lo + mb, rows.stop))
            L = int(b.response_mask[chunk].any(0).nonzero().max()) + 1  # trim padding
            tokens, mask = b.tokens[chunk, :L], b.response_mask[chunk, 1:L]
            # model(tokens[:, :-1]) with a group's prompt once: logits (N, V) at the mask's N response tokens only
            # (none at prompt and padding positions, where the loss does not look), and (b, L-1, C) hidden states
            # for the value head; float32 from here on (the loss terms, the value head), whatever learner.dtype
            # the forward ran in
            with self.autocast():
                out = forward_shared_prompts(self.model, tokens[:, :-1], prompt_len[chunk],
                                             return_hidden=self.value_head is not None, logits_at=mask)
            logits, hidden = out if self.value_head is not None else (out, None)
            # log pi over the vocabulary once, for the tokens' log-probabilities and the entropy: (N, V), the
            # largest tensors of an update with a large vocabulary (GPT-2's 50257)
            logp_all = torch.log_softmax(self.tempered(logits.float()), dim=-1)
            picked = logp_all.gather(-1, tokens[:, 1:][mask][:, None]).squeeze(-1)  # (N,), as token_logprobs
            logp = unpacked(mask, picked)  # (b, L-1), 0 outside
            grad_mask = mask & valid[chunk, None]
            sample_adv = adv[chunk]
            loss = torch.zeros((), device=logp.device)
            if self.value_head is not None:
                values = self.value_head(hidden.detach().float()).squeeze(-1)  # (b, L-1): V(s_t) of the token at t
                v = values if baseline is None else baseline[chunk, : L - 1]
                sample_adv = algo.value_advantages(returns[chunk], v) * scale[chunk, None]
                err = torch.where(grad_mask, values - returns[chunk, None], 0.0)
                value_loss = (err**2).sum() / max(1, num_tokens)  # logged as it is (TRL's loss/value_avg)
                loss = loss + ac.value_coef * value_loss
                value_loss_sum += value_loss.item()
            anchor = (b.policy_logprobs if pi_old is None else pi_old)[chunk, 1:L]
            if fresh is not None:
                anchor = torch.where(fresh[chunk, None], logp.detach(), anchor)
            pg, n_corrected = algo.off_policy_loss(
                logp, b.old_logprobs[chunk, 1:L], grad_mask, sample_adv, stale[lo:lo + mb], num_samples=B,
                mode=ac.off_policy, cap=ac.is_cap, clip_eps=ac.clip_eps, dual_clip=ac.dual_clip, agg=ac.loss_agg,
                num_tokens=num_tokens, policy_logprobs=anchor,
            )
            loss = loss + pg
            corrected += int(n_corrected)
            # the chunk's share of the part's response tokens of the samples that carry gradient: the logged entropy
            # and KL diagnostic are means over those tokens of the part, so micro-batching must not change them; the
            # entropy bonus is their sum over every response token of the part, as the policy-gradient term's
            # token mean: a sample whose reward failed adds 0 to every term, and failures leave the terms' ratio
            kept = int(grad_mask.sum())
            n = kept / max(1, learned_tokens)
            learned = grad_mask[mask]  # (N,): which of the packed response tokens (logp_all's rows) count
            if self.ref_model is not None:
                norm = B if ac.loss_agg == "seq_sum" else max(1, num_tokens)
                loss = loss + ac.kl_coef * algo.kl_pathwise(logp, ref_lp[chunk, 1:L], grad_mask, ac.kl_estimator,
                                                            norm, weight=scale[chunk])
            if ac.entropy_coef > 0:
                ent = algo.entropy_of_logprobs(logp_all, learned)
                loss = loss - ac.entropy_coef * ent * (kept / max(1, num_tokens))
            else:  # logged only: no autograd graph (it held three more (N, V) tensors until the step's end)
                with torch.no_grad():
                    ent = algo.entropy_of_logprobs(logp_all, learned)
            loss.backward()
            loss_sum += loss.item()
            with torch.no_grad():
                ent_sum += ent.item() * n
                kl_sum += algo.kl_k3(logp, b.policy_logprobs[chunk, 1:L], grad_mask).item() * n

        grad_norm = self._grad_norm()
        taken = math.isfinite(loss_sum) and math.isfinite(grad_norm)
        if taken:
            clip = self.cfg.learner.grad_clip
            if clip > 0:  # the policy's gradient and the value head's each to the norm `clip`, apart: one clip over
                # both would let a large value loss scale the policy's step down, and the value loss would move
                # the policy after all (PPO's critic in OpenRLHF and veRL has an optimizer and a clip of its own)
                torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), clip)
                if self.value_head is not None:
                    torch.nn.utils.clip_grad_norm_(list(self.value_head.parameters()), clip)
            self.optimizer.step()
        else:
            self.skipped_steps += 1  # learner.max_consecutive_skips is checked per update, in `learn`
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum, "grad_norm": grad_norm, "entropy": ent_sum, "kl": kl_sum,
                "value_loss": value_loss_sum, "corrected": corrected, "taken": taken}

    def _grad_norm(self) -> float:
        """The norm of every trainable parameter's gradient (the value head's too), as the step's skip check needs
        it: a non-finite one would turn a clip's scale, and so every parameter it clips, into NaN (learner.grad_clip
        clips the policy's and the value head's gradients apart)."""
        grads = [p.grad for p in self.trainable() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def evaluate(self) -> dict:
        """The current policy's figures on the task's held-out prompts (or task.eval_prompts_path's), greedy,
        as `distpg eval` scores them (`run.eval_every`), with the version scored. A reward function that fails
        on every prompt raises RewardError."""
        from distpg.evaluate import eval_metrics, evaluate, test_set
        from distpg.rollout import sampling_params

        cfg = self.cfg
        if self.eval_task is None:
            self.eval_task = task_for(cfg)
            if cfg.task.eval_prompts_path:  # a test set instead of the held-out prompts
                budget = sampling_params(cfg, self.eval_task).max_new_tokens
                self.test_task = test_set(cfg, cfg.task.eval_prompts_path, self.eval_task.tokenizer, budget,
                                          "task.eval_prompts_path")
        self.model.eval()
        try:
            res = evaluate(cfg, self.model, task=self.eval_task, test=self.test_task)
        finally:
            self.model.train()
        return {"version": self.version, "prompts": cfg.task.eval_prompts_path or "held-out", **eval_metrics(res)}

    # -------------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """Everything needed to continue exactly: weights, optimizer, version, baseline."""
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "value_head": {k: v.detach().cpu().clone() for k, v in self.value_head.state_dict().items()}
            if self.value_head is not None else None,
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "version": self.version,
            "ema": self.ema,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state(self, state: dict) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(state["model"][name])
        if self.value_head is not None and state.get("value_head"):
            self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a checkpoint of an earlier distpg names the per-tensor loop
            group["fused"], group["foreach"] = self.fused_adam or None, None
        self.version = int(state["version"])
        self.ema = state["ema"]
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))


def unpacked(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` (N,) of the N True entries of `mask` (b, T), in row-major order (as the logits at `logits_at`),
    back in place: (b, T), float32 0 elsewhere; differentiable in `values`."""
    return torch.zeros(mask.shape, device=values.device).masked_scatter(mask, values)


def check_learner_dtype(dtype: str, device: str) -> None:
    """learner.dtype=bfloat16 on a GPU needs bfloat16 in hardware (compute capability 8.0, Ampere, or newer; ROCm):
    raises ValueError on an older GPU. torch.cuda.is_bf16_supported() alone says yes there too: since PyTorch 2.3
    it counts emulation (a bfloat16 tensor can be made), under which the products run slower than in float32,
    and it asks about the current device, not `device`."""
    dev = torch.device(device)
    if dtype != "bfloat16" or dev.type != "cuda":
        return
    if not torch.version.hip and torch.cuda.get_device_capability(dev) < (8, 0):
        raise ValueError(f"learner.dtype=bfloat16: this GPU ({torch.cuda.get_device_name(dev)}) has no bfloat16 in "
                         "hardware (it needs compute capability 8.0, Ampere, or newer); use learner.dtype=float32")


def mini_batch_order(seed: int, version: int, epoch: int, groups: int, parts: int) -> list[int]:
    """The order of a step's prompt groups in pass `epoch` (> 0) of learner.epochs: a random split into `parts`
    mini-batches of the sizes the first pass has (a permutation drawn from run.seed, the update's version and
    the pass, so a resumed run draws the same), each mini-batch's groups in their batch order. The first pass
    keeps the batch order. Against the batch's order of groups (by prompt id)."""
    perm = np.random.default_rng([seed, version, epoch]).permutation(groups).tolist()
    bounds = [groups * m // parts for m in range(parts + 1)]
    return [g for lo, hi in zip(bounds, bounds[1:]) for g in sorted(perm[lo:hi])]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
