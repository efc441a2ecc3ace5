"""Batched sampling: one prefill of the (left-padded) prompts, then one batched forward per new token on a
preallocated KV cache.

Sampling happens on the model's device with an explicit `torch.Generator` (same seed, same samples) by
the exponential-race trick (argmax p / E with E ~ Exp(1)), which never picks a token of probability 0 and
needs no host sync. The only host sync is an "all rows stopped?" check every `check_every` tokens.

The returned log-probabilities are under the distribution actually sampled from, i.e. after temperature,
top-k and top-p: these are the behaviour-policy log-probabilities μ that the learner needs for
off-policy correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distpg.model import GPT
from distpg.ragged import ragged_index


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into tokens."""

    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1.0 means no nucleus filter
    stop_token: int | None = None


@dataclass
class Generation:
    """Completions of a batch of B prompts, N = max_new_tokens columns.

    tokens:   (B, N) int64, `pad_id` after a row stopped
    logprobs: (B, N) float32, log μ(token), 0 where mask is False
    mask:     (B, N) bool, True for generated tokens (the stop token included)
    truncated:(B,) bool, True where the row hit max_new_tokens without the stop token
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor

    def rows(self) -> list[list[int]]:
        """The generated tokens of each row, as Python lists (stop token included)."""
        lengths = self.mask.sum(1).tolist()
        return [row[:n] for row, n in zip(self.tokens.tolist(), lengths)]


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the sampling distribution: (B, V) logits -> (B, V) float32, -inf where excluded."""
    logits = logits.float()
    if params.temperature == 0:
        # greedy: all mass on the argmax
        out = torch.full_like(logits, float("-inf"))
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first is kept)
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def sample_token(logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from (B, V) log-probabilities: argmax p / E, E ~ Exp(1) (exponential race)."""
    # clamp: a draw of exactly 0 would make p / E = 0 / 0 = NaN, which argmax would pick
    e = torch.empty_like(logp).exponential_(1.0, generator=generator).clamp_(min=torch.finfo(logp.dtype).tiny)
    return (logp.exp() / e).argmax(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> ids (B, Tp) and a bool mask (B, Tp) of real tokens."""
    lengths = np.array([len(p) for p in prompts])
    B, Tp = len(prompts), int(lengths.max())
    # scatter the concatenated prompts into their right-aligned slots, no loop over rows
    rows, cols = ragged_index(lengths, starts=Tp - lengths)
    ids = np.full((B, Tp), pad_id, dtype=np.int64)
    ids[rows, cols] = np.fromiter((t for p in prompts for t in p), dtype=np.int64, count=int(lengths.sum()))
    mask = np.zeros((B, Tp), dtype=bool)
    mask[rows, cols] = True
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(
    model: GPT,
    prompts: list[list[int]],
    params: SamplingParams,
    generator: torch.Generator,
    pad_id: int = 0,
    check_every: int = 4,
) -> Generation:
    """Sample one completion per prompt (repeat a prompt G times to get a group).

    Args:
        model: the policy.
        prompts: B token lists, each non-empty.
        params: temperature, top-k, top-p, stop token and max new tokens.
        generator: a torch.Generator on the model's device; it alone decides the samples.
        pad_id: token written after a row stopped.
        check_every: how often (in tokens) to check on the host whether every row has stopped.
    Returns:
        a `Generation` with (B, max_new_tokens) tokens, log-probabilities and mask.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.wte.weight.device
    N = params.max_new_tokens
    idx, prompt_mask = left_pad(prompts, pad_id, device)
    B, Tp = idx.shape
    key_mask = torch.cat([prompt_mask, torch.ones(B, N, dtype=torch.bool, device=device)], dim=1)
    next_pos = prompt_mask.sum(1)  # (B,) position id of the first new token
    positions = (prompt_mask.cumsum(1) - 1).clamp_(min=0)
    cache = model.new_cache(B, Tp + N)

    tokens = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)
    mask = torch.zeros((B, N), dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    logits = model(idx, positions=positions, key_mask=key_mask, cache=cache, pos=0)[:, -1]
    for t in range(N):
        logp = sampling_logprobs(logits, params)
        tok = sample_token(logp, generator)
        alive = ~done
        tokens[:, t] = torch.where(alive, tok, pad_id)
        logprobs[:, t] = torch.where(alive, logp.gather(-1, tok[:, None]).squeeze(-1), 0.0)
        mask[:, t] = alive
        if params.stop_token is not None:
            done = done | (tok == params.stop_token)
            if (t + 1) % check_every == 0 and bool(done.all()):
                break
        if t + 1 < N:
            logits = model(
                tokens[:, t : t + 1],
                positions=(next_pos + t)[:, None],
                key_mask=key_mask,
                cache=cache,
                pos=Tp + t,
            )[:, -1]
    truncated = ~done if params.stop_token is not None else torch.ones(B, dtype=torch.bool, device=device)
    return Generation(tokens=tokens, logprobs=logprobs, mask=mask, truncated=truncated)
