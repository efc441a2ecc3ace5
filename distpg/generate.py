"""Batched sampling: one prefill of the (left-padded) prompts, then one batched forward per new token on a
preallocated KV cache.

Sampling happens on the model's device with an explicit `torch.Generator` (same seed, same samples) by
inverse-CDF sampling: one uniform draw per row against the cumulative sum of the probabilities (float64,
two levels for large vocabularies), which never picks a token of probability 0 and needs no host sync.
(An exponential race, argmax p / E with E ~ Exp(1), needs one random draw per vocabulary entry: 13x
slower on a CPU at GPT-2's 50257 tokens, and `torch.multinomial` is slower still.) The only host syncs
are one before decoding (are the prompts padded?), an "all rows stopped?" check every `check_every`
tokens, and one at the end (are the log-probabilities finite? not with a diverged policy's NaN logits).

Where it pays, the decode loop does less than a plain `model(...)` call per token: each token's forward is
`decode_step` (functional calls instead of module calls, the cache written by the attention kernel; the
same logits), the attention mask is built once (and dropped when no prompt is padded), the output layer
runs on the last position only, and when at least half of the rows still being decoded have stopped (at the
stop token, or, checked with the host sync, at a stop string: `stop_when`), they are dropped from the batch
and the cache (the random draws stay per row, so dropping rows changes no sample).

On a CPU with n ≥ 2 intra-op threads the rows are split into n shards (at least `SHARD_MIN_ROWS` each),
each decoded by its own thread on one core, with the uniform draws of its rows: the same samples, and no
fork and join of the threads at each of a step's ~25 operations (the C attention kernel runs on one core;
at 4 layers x 256 wide, batch 64, the split generates 10-14% more tokens per second on 2 cores).

`generate(..., cuda_graph=True)` runs `_generate_static` instead: every decode step in the same shapes (no
row dropping, attention over the whole cache under a mask), which on a GPU is captured once as a CUDA graph
and replayed per token; on a CPU it runs the same steps eagerly and samples the same tokens (tested).

The returned log-probabilities are under the distribution actually sampled from, i.e. after temperature,
top-k and top-p: these are the behaviour-policy log-probabilities μ that the learner needs for
off-policy correction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from distpg import kernels
from distpg.model import (
    GPT,
    _attend_static,
    _attention_mask,
    decode_layers,
    decode_step,
    decode_stepper,
    decode_weights,
    output_layer,
)
from distpg.ragged import ragged_index

StopCheck = Callable[[list[list[int]]], list[bool]]  # rows' tokens so far -> which have ended (`generate`)


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into tokens."""

    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1.0 means no nucleus filter
    stop_token: int | tuple[int, ...] | None = None  # a row ends after sampling this token (or any of these)

    @property
    def filtered(self) -> bool:
        return filters(self.temperature, self.top_k, self.top_p)


def filters(temperature: float, top_k: int, top_p: float) -> bool:
    """Whether these settings sample from a narrower distribution μ than the policy's softmax(logits / T):
    top-k or top-p (greedy decoding samples nothing)."""
    return temperature > 0 and (top_k > 0 or top_p < 1.0)


@dataclass
class Generation:
    """Completions of a batch of B prompts, N = max_new_tokens columns.

    tokens:   (B, N) int64, `pad_id` after a row stopped
    logprobs: (B, N) float32, log μ(token), 0 where mask is False
    mask:     (B, N) bool, True for generated tokens (the stop token included)
    truncated:(B,) bool, True where the row hit max_new_tokens without the stop token
    policy_logprobs: (B, N) float32, log π(token) under the policy's softmax(logits / temperature) before
              top-k/top-p (π = μ·Z on a kept token, Z the mass kept); `logprobs` itself without them
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor
    policy_logprobs: torch.Tensor | None = None

    def __post_init__(self):
        if self.policy_logprobs is None:
            self.policy_logprobs = self.logprobs

    def rows(self) -> list[list[int]]:
        """The generated tokens of each row, as Python lists (stop token included)."""
        lengths = self.mask.sum(1).tolist()
        return [row[:n] for row, n in zip(self.tokens.tolist(), lengths)]


def _is_stop(tok: torch.Tensor, stop: int | torch.Tensor) -> torch.Tensor:
    """Which of the tokens (b,) end their row: equal to `stop`, one id, or to one of `stop`'s ids (a tensor on
    tok's device, `_stop_ids`)."""
    return tok == stop if isinstance(stop, int) else torch.isin(tok, stop)


def _stop_ids(params: SamplingParams, device) -> int | torch.Tensor | None:
    """`params.stop_token` as `_is_stop` takes it: one id, or several as a tensor made once per generation."""
    stop = params.stop_token
    if stop is None or isinstance(stop, int):
        return stop
    return stop[0] if len(stop) == 1 else torch.tensor(stop, device=device)


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the sampling distribution: (B, V) logits -> (B, V) float32, -inf where excluded."""
    logits = logits.float()
    if params.temperature == 0:
        # greedy: all mass on the argmax (log 1 = 0; NaN where the logits are not finite, for `generate` to name)
        out = torch.full_like(logits, float("-inf"))
        best = logits.argmax(-1, keepdim=True)
        return out.scatter_(-1, best, logits.gather(-1, best) * 0.0)
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


CDF_BLOCK = 256  # vocabulary entries per block of the two-level inverse-CDF search


def _search(cdf: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the first entry of each row of `cdf` (B, n) above u · total, and u · total (B, 1)."""
    total = cdf[:, -1:]
    # u · total < total, so some entry exceeds it; nextafter guards the rounding of the product
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    # the clamp changes nothing for finite probabilities; with NaN ones (a diverged policy) it keeps the index
    # in range, so that the NaN reaches the log-probabilities that `generate` checks, not an index error
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1), target


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row: the first index whose cumulative probability exceeds u · total.

    Large vocabularies take two levels, which reads the probabilities once instead of writing a float64
    cumulative sum of all of them: pick a block of CDF_BLOCK tokens by its mass, then the token inside
    the block with what is left of u (the same u, rescaled: the same token up to rounding).

    Args:
        probs: (B, V) non-negative, unnormalised is fine.
        u: (B,) float64 uniform draws in [0, 1).
    Returns:
        (B,) int64 tokens; a token of probability 0 spans an empty interval and is never picked.
    """
    B, V = probs.shape
    K = CDF_BLOCK
    if V <= 2 * K:
        return _search(probs.cumsum(-1, dtype=torch.float64), u)[0].squeeze(-1)
    nb = V // K
    mass = probs[:, : nb * K].reshape(B, nb, K).sum(-1)  # (B, nb) float32 sums of 256 entries
    if V > nb * K:
        mass = torch.cat([mass, probs[:, nb * K :].sum(-1, keepdim=True)], dim=1)
    mass = mass.double()
    cdf = mass.cumsum(-1)
    block, target = _search(cdf, u)  # (B, 1) each
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    rest = ((target - before) / mass.gather(1, block)).clamp(0.0, 1.0).squeeze(-1)  # u within the block
    cols = block * K + torch.arange(K, device=probs.device)  # (B, K)
    inside = probs.gather(1, cols.clamp(max=V - 1)).masked_fill(cols >= V, 0.0)
    tok = cols.gather(1, _search(inside.cumsum(-1, dtype=torch.float64), rest)[0]).squeeze(-1)
    return tok.clamp_(max=V - 1)  # a no-op for finite probabilities (past V they are 0), as in `_search`


def sample_token(logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from (B, V) log-probabilities (inverse CDF, one uniform draw per row)."""
    u = torch.rand(logp.shape[0], generator=generator, dtype=torch.float64, device=logp.device)
    return inverse_cdf(logp.exp(), u)


def _sample(logits: torch.Tensor, params: SamplingParams,
            u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, V) logits and (B,) uniforms -> tokens (B,), their log μ (B,) float32, and their log π under the
    policy's softmax(logits / temperature) before top-k/top-p (the same tensor as log μ without them)."""
    if params.temperature == 0 or params.filtered:
        logp = sampling_logprobs(logits, params)
        tok = logp.argmax(-1) if params.temperature == 0 else inverse_cdf(logp.exp(), u)
        log_mu = logp.gather(-1, tok[:, None]).squeeze(-1)
        if not params.filtered:
            return tok, log_mu, log_mu
        log_pi = torch.log_softmax(logits.float() / params.temperature, dim=-1).gather(-1, tok[:, None])
        return tok, log_mu, log_pi.squeeze(-1)
    # plain temperature sampling: one fused softmax instead of log_softmax + exp
    x = logits.float()
    probs = torch.softmax(x if params.temperature == 1.0 else x / params.temperature, dim=-1)
    tok = inverse_cdf(probs, u)
    log_mu = probs.gather(-1, tok[:, None]).squeeze(-1).log()
    return tok, log_mu, log_mu


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


# Prompts of up to this many tokens are prefilled one position at a time where the decode step runs in C (one
# call per position, all rows: the same products in 64-row pieces, without the batched forward's few dozen
# operator calls per layer; at `distpg bench`'s 8-token prompts, 4x256 and 64 rows, 30 against 37 ms, best of
# 8). Longer ones go through the batched forward, whose attention does not re-read the cache at every position,
# and so do models wider than PREFILL_IN_C_MAX_WIDTH, whose products dominate: the batched forward reads each
# weight once for all positions (GPT-2 124M, 8-token prompts, 64 rows: 1.03 against 1.13 s, best of 3; at 512
# wide the two were within 2%, at 256 and below the position-by-position prefill is 3-8% faster).
PREFILL_IN_C_MAX = 32
PREFILL_IN_C_MAX_WIDTH = 512


def _prefill(model: GPT, idx, positions, key_mask, cache_k, cache_v, step=None) -> torch.Tensor:
    """`model(idx, ...)[:, -1]` on the cache tensors (from position 0), with the output layer on the last
    position only.

    idx, positions (b, T); key_mask (b, >= T) bool, the real prompt slots, or None (no padding); cache_k, cache_v
    (n_layer, b, H, T_max, D); step: the generation's `decode_stepper`, which prefills short prompts position by
    position where it runs in C. Returns logits (b, V).
    """
    T = idx.shape[1]
    # the C step reads embedding rows by id unchecked: ids out of range go to the batched forward's IndexError
    if (getattr(step, "in_c", False) and T <= PREFILL_IN_C_MAX and model.shape.n_embd <= PREFILL_IN_C_MAX_WIDTH
            and int(idx.max()) < model.shape.vocab_size and int(idx.min()) >= 0):
        for t in range(T):
            seen = None
            if key_mask is not None:  # the real slots so far, and the query itself (a padding query sees itself)
                seen = key_mask[:, : t + 1].clone()
                seen[:, t] = True
                seen = seen[:, None, None, :]
            hidden = step.step(idx[:, t], positions[:, t], seen, cache_k, cache_v, t)
        return output_layer(model, hidden)  # the last position's only
    attn_mask = _attention_mask(T, 0, key_mask, idx.device)
    x = model.wte(idx) + model.wpe(positions)
    for i, block in enumerate(model.h):
        x = block(x, attn_mask, (cache_k[i], cache_v[i]), 0)
    return output_layer(model, model.ln_f(x[:, -1]))


def _distinct(prompts: list[list[int]]) -> tuple[list[int], list[int]] | None:
    """The first row of each distinct prompt and, for every row, which of them it repeats; None when no
    prompt repeats (a group of G samples per prompt repeats each G times)."""
    first: dict[tuple[int, ...], int] = {}
    reps: list[int] = []
    inverse = []
    for i, p in enumerate(prompts):
        key = tuple(p)
        if key not in first:
            first[key] = len(reps)
            reps.append(i)
        inverse.append(first[key])
    return None if len(reps) == len(prompts) else (reps, inverse)


def _prefill_distinct(model: GPT, prompts: list[list[int]], st: _Setup, key_mask: torch.Tensor | None,
                      cache_k: torch.Tensor, cache_v: torch.Tensor, step=None) -> torch.Tensor:
    """`_prefill` of the left-padded prompts into positions [0, Tp) of the caches, each distinct prompt run
    once: its keys, values and last logits are copied to the rows that repeat it (the same numbers; with
    groups of G, 1/G of the prompt tokens' work). key_mask: the real cache slots, or None (no padding).
    Returns the logits (B, V); `step` as `_prefill` takes it."""
    Tp = st.idx.shape[1]
    device = st.idx.device
    distinct = _distinct(prompts)
    if distinct is None:
        return _prefill(model, st.idx, st.positions, key_mask, cache_k, cache_v, step)
    reps, inverse = (torch.tensor(x, device=device) for x in distinct)
    part = model.new_cache(len(reps), Tp)
    logits = _prefill(model, st.idx[reps], st.positions[reps], None if key_mask is None else key_mask[reps],
                      part.k, part.v, step)
    cache_k[:, :, :, :Tp] = part.k[:, inverse]
    cache_v[:, :, :, :Tp] = part.v[:, inverse]
    return logits[inverse]


@torch.inference_mode()
def generate(
    model: GPT,
    prompts: list[list[int]],
    params: SamplingParams,
    generator: torch.Generator,
    pad_id: int = 0,
    check_every: int = 4,
    weights_key: object = None,
    cuda_graph: bool = False,
    stop_when: StopCheck | None = None,
) -> Generation:
    """Sample one completion per prompt (repeat a prompt G times to get a group).

    Args:
        model: the policy.
        prompts: B token lists, each non-empty.
        params: temperature, top-k, top-p, stop token and max new tokens.
        generator: a torch.Generator on the model's device; it alone decides the samples.
        pad_id: token written after a row stopped.
        check_every: how often (in tokens) to check on the host whether every row has stopped, and
            whether enough have stopped to drop them from the batch.
        weights_key: on a CPU the weight matrices are laid out for the products once (`kernels.packed_weights`)
            and kept for the next call with the same key: pass a value that changes whenever the model's
            weights do (a policy version); None lays them out for this call only.
        cuda_graph: decode in fixed shapes (`_generate_static`), on a GPU replaying one token's step as a
            CUDA graph; on a CPU the same steps run one by one (which is how the tests check them).
        stop_when: called every `check_every` tokens (less often on long rows: `stop_check_due`) with the tokens
            so far of the rows still decoded; True where a row has ended (its text holds a stop string,
            `stop_checker`): that row is decoded no further, as after the stop token, and dropped with the
            others. Its tokens up to the check are kept: the caller cuts them (`rollout.cut_at_stops`) as it
            would a row decoded to the end, and gets the same tokens. Not with `cuda_graph` (its rows run to the
            end; the cut is the same).
    Returns:
        a `Generation` with (B, max_new_tokens) tokens, log-probabilities and mask.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    with kernels.packed_weights(model, decode_weights(model), weights_key, len(prompts)):
        n = 1 if cuda_graph or model.wte.weight.device.type != "cpu" else shard_count(len(prompts))
        if n > 1:
            gen = _generate_sharded(model, prompts, params, generator, pad_id, check_every, n, stop_when)
        elif cuda_graph:
            gen = _generate_static(model, prompts, params, generator, pad_id, check_every)
        else:
            gen = _generate(model, prompts, params, generator, pad_id, check_every, stop_when=stop_when)
    # a sampled token never has probability 0, so its log-probability is finite unless the logits were not
    if not bool(torch.isfinite(gen.logprobs).all()):  # host sync, once per generation
        raise FloatingPointError(
            "generate: the policy's next-token probabilities are not finite (nan or inf logits): its weights have "
            "diverged (in training: a learning rate too high, learner.lr; lower it and resume from a checkpoint "
            "from before the divergence)")
    return gen


SHARD_MIN_ROWS = 16  # rows per shard at least: below, a thread's share is too small to pay for its handoff
SHARDS: int | None = None  # None: one shard per intra-op thread (`shard_count`); a number forces it (tests)
_pool: tuple[ThreadPoolExecutor, int] | None = None  # the shards' threads, and how many
_pool_lock = threading.Lock()


def shard_count(rows: int) -> int:
    """How many threads decode a CPU batch of `rows`: one per intra-op thread, each with SHARD_MIN_ROWS rows."""
    if SHARDS is not None:
        return max(1, min(SHARDS, rows))
    return max(1, min(torch.get_num_threads(), rows // SHARD_MIN_ROWS))


def _generate_sharded(model: GPT, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator,
                      pad_id: int, check_every: int, n: int, stop_when: StopCheck | None = None) -> Generation:
    """`_generate` on n contiguous shards of the rows at once, each in its own thread with one intra-op thread
    and the pre-packed weights of the calling thread, each row with the uniform draws it gets unsharded."""
    global _pool
    B = len(prompts)
    uniforms = _draws(generator, params.max_new_tokens, B, model.wte.weight.device)
    bounds = np.linspace(0, B, n + 1).round().astype(int).tolist()
    packs, threads = kernels.active_packs(), torch.get_num_threads()

    def shard(i: int) -> Generation:
        torch.set_num_threads(1)  # this thread's OpenMP team: the shards share the cores, one each
        lo, hi = bounds[i], bounds[i + 1]
        with torch.inference_mode(), kernels.using_packs(packs):
            return _generate(model, prompts[lo:hi], params, generator, pad_id, check_every,
                             uniforms[:, lo:hi].contiguous(), stop_when)

    with _pool_lock:
        if _pool is None or _pool[1] < n - 1:
            _pool = (ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="distpg-shard"), n - 1)
        pool = _pool[0]
    try:
        futures = [pool.submit(shard, i) for i in range(1, n)]
        parts = [shard(0)] + [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)
    return Generation(tokens=torch.cat([g.tokens for g in parts]), logprobs=torch.cat([g.logprobs for g in parts]),
                      mask=torch.cat([g.mask for g in parts]), truncated=torch.cat([g.truncated for g in parts]),
                      policy_logprobs=torch.cat([g.policy_logprobs for g in parts]) if params.filtered else None)


def _draws(generator: torch.Generator, N: int, B: int, device) -> torch.Tensor:
    """(N, B) float64 uniforms: one draw per new token and row, all made up front (so dropping stopped rows, or
    splitting the rows into shards, changes no sample)."""
    return torch.rand((N, B), generator=generator, dtype=torch.float64, device=device)


@dataclass
class _Setup:
    """What both decode loops start from: the left-padded prompts, their positions, the uniform draws, and
    the output buffers."""

    idx: torch.Tensor  # (B, Tp) prompt ids
    prompt_mask: torch.Tensor  # (B, Tp) real prompt tokens
    key_mask: torch.Tensor  # (B, Tp + N) real cache slots
    positions: torch.Tensor  # (B, Tp) position ids of the prompts
    new_positions: torch.Tensor  # (B, N) position ids of the new tokens
    uniforms: torch.Tensor  # (N, B) float64: one draw per row and new token
    tokens: torch.Tensor  # (B, N) outputs, as in Generation
    logprobs: torch.Tensor
    policy_logprobs: torch.Tensor  # `logprobs` itself unless the sampling is filtered
    mask: torch.Tensor


def _setup(model: GPT, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator,
           pad_id: int, uniforms: torch.Tensor | None = None) -> _Setup:
    device = model.wte.weight.device
    idx, prompt_mask = left_pad(prompts, pad_id, device)
    B, Tp = idx.shape
    N = params.max_new_tokens
    if Tp + N > model.shape.n_positions:
        raise ValueError(f"sequence of {Tp + N} tokens exceeds n_positions={model.shape.n_positions}")
    logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)
    return _Setup(
        idx=idx,
        prompt_mask=prompt_mask,
        key_mask=torch.cat([prompt_mask, torch.ones(B, N, dtype=torch.bool, device=device)], dim=1),
        positions=(prompt_mask.cumsum(1) - 1).clamp_(min=0),
        new_positions=prompt_mask.sum(1, keepdim=True) + torch.arange(N, device=device),
        uniforms=_draws(generator, N, B, device) if uniforms is None else uniforms,
        tokens=torch.full((B, N), pad_id, dtype=torch.long, device=device),
        logprobs=logprobs,
        policy_logprobs=torch.zeros_like(logprobs) if params.filtered else logprobs,
        mask=torch.zeros((B, N), dtype=torch.bool, device=device),
    )


def _generate(model: GPT, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator,
              pad_id: int, check_every: int, uniforms: torch.Tensor | None = None,
              stop_when: StopCheck | None = None) -> Generation:
    device = model.wte.weight.device
    N = params.max_new_tokens
    st = _setup(model, prompts, params, generator, pad_id, uniforms)
    B, Tp = st.idx.shape
    padded = not bool(st.prompt_mask.all())  # no padding: no attention mask at all while decoding
    key_mask, new_positions, uniforms = st.key_mask, st.new_positions, st.uniforms
    tokens, logprobs, policy_logprobs, mask = st.tokens, st.logprobs, st.policy_logprobs, st.mask
    cache = model.new_cache(B, Tp + N)
    # the rows still decoded: their original indices (None: all B), cache, key mask and stopped flags
    rows, cache_k, cache_v = None, cache.k, cache.v
    keys = key_mask[:, None, None, :] if padded else None  # (b, 1, 1, S)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    stopping = params.stop_token is not None or stop_when is not None  # rows may end before the budget
    stop = _stop_ids(params, device)

    step = decode_stepper(model, B)
    logits = _prefill_distinct(model, prompts, st, key_mask if padded else None, cache_k, cache_v, step)
    for t in range(N):
        tok, logp, logpi = _sample(logits, params, uniforms[t] if rows is None else uniforms[t, rows])
        alive = None
        if stopping:
            alive = ~stopped
            tok = torch.where(alive, tok, pad_id)
            logp = torch.where(alive, logp, 0.0)
            logpi = torch.where(alive, logpi, 0.0) if params.filtered else logp
            if stop is not None:
                stopped = stopped | _is_stop(tok, stop)
        out = slice(None) if rows is None else rows
        tokens[out, t], logprobs[out, t] = tok, logp
        if params.filtered:
            policy_logprobs[out, t] = logpi
        if alive is not None:
            mask[out, t] = alive
        if t + 1 == N:
            break
        if stopping and (t + 1) % check_every == 0:
            if stop_when is not None and stop_check_due(t + 1, check_every):
                stopped = _stopped_by(stop_when, tokens, stopped, rows, t + 1)
            n_live = int((~stopped).sum())  # host sync
            if n_live == 0:
                break
            if n_live <= stopped.numel() // 2:  # at least half stopped: drop them from batch and cache
                keep = (~stopped).nonzero().squeeze(-1)
                rows = keep if rows is None else rows[keep]
                cache_k, cache_v = cache_k[:, keep], cache_v[:, keep]  # (n_layer, b, H, T_max, D)
                tok, stopped = tok[keep], stopped[keep]
                keys = None if keys is None else keys[keep]
        pos_in = new_positions[:, t] if rows is None else new_positions[rows, t]
        attn_mask = None if keys is None else keys[..., : Tp + t + 1]
        logits = step(tok, pos_in, attn_mask, cache_k, cache_v, Tp + t)
    if not stopping:
        mask.fill_(True)
        truncated = torch.ones(B, dtype=torch.bool, device=device)
    else:
        truncated = torch.zeros(B, dtype=torch.bool, device=device)  # dropped rows had all stopped
        truncated[slice(None) if rows is None else rows] = ~stopped
    return Generation(tokens=tokens, logprobs=logprobs, mask=mask, truncated=truncated, policy_logprobs=policy_logprobs)


def stop_check_due(n: int, every: int) -> bool:
    """Whether `generate` asks `stop_when` about the rows after their n-th token: every `every` tokens up to
    8·every, then every `every`·⌊n / 8·every⌋, about 8 times per doubling of n. Each check decodes every live
    row whole, so checking every `every` tokens would cost decodes growing with the square of the length (1.3 s
    for 64 rows of 1,024 tokens with GPT-2's tokenizer); this way they grow linearly, and a row that reached a
    stop string is decoded at most about n/8 tokens past it."""
    return n % (every * max(1, n // (8 * every))) == 0


def _stopped_by(stop_when: StopCheck, tokens: torch.Tensor, stopped: torch.Tensor, rows: torch.Tensor | None,
                n: int) -> torch.Tensor:
    """`stopped` (the rows still decoded), with the live ones whose first `n` tokens `stop_when` says ended."""
    live = (~stopped).nonzero().squeeze(-1)
    if live.numel() == 0:
        return stopped
    index = live if rows is None else rows[live]
    ended = stop_when(tokens[index, :n].tolist())  # a live row has sampled all n (none is the stop token)
    hit = torch.tensor(ended, dtype=torch.bool, device=stopped.device)
    if not bool(hit.any()):
        return stopped
    stopped = stopped.clone()
    stopped[live[hit]] = True
    return stopped


def stop_checker(tokenizer, stops: list[str]) -> StopCheck:
    """`generate`'s `stop_when` for stop strings: a row has ended once its text holds one of `stops`."""
    def ended(rows: list[list[int]]) -> list[bool]:
        return [holds_stop(tokenizer, stops, row) for row in rows]

    return ended


def holds_stop(tokenizer, stops: list[str], ids: list[int]) -> bool:
    """Does the text of `ids` hold one of `stops`? Once a prefix's does, every longer prefix's does."""
    text = tokenizer.decode(ids)
    return any(s in text for s in stops)


GRAPH_WARMUP = 2  # eager steps before the capture (on a side stream, as CUDA graphs need)


def _generate_static(model: GPT, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator,
                     pad_id: int, check_every: int) -> Generation:
    """`_generate` with every decode step in the same shapes, so that on a GPU one step is captured as a CUDA
    graph and replayed for each new token (a GPU runs a small policy's step in less time than the host takes to
    launch its ~160 kernels one by one).

    Each step samples the token (the same uniform draws as `_generate`, so the same samples up to float
    rounding), records it, and runs `decode_step` with `_attend_static` over the whole zero-filled cache; the
    token index lives in a device tensor that the step itself advances. Rows that stopped are not dropped
    (the shapes stay fixed); the host checks every `check_every` tokens whether all rows have stopped.
    """
    device = model.wte.weight.device
    N = params.max_new_tokens
    st = _setup(model, prompts, params, generator, pad_id)
    B, Tp = st.idx.shape
    cache = model.new_cache(B, Tp + N)
    cache.k.zero_()
    cache.v.zero_()
    logits = _prefill_distinct(model, prompts, st, st.key_mask, cache.k, cache.v)
    layers = decode_layers(model)
    slots = torch.arange(Tp + N, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)  # the token index, advanced by the step
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    stop = _stop_ids(params, device)  # made before a capture: a graph cannot copy a list to the device

    def step() -> None:
        tok, logp, logpi = _sample(logits, params, st.uniforms.index_select(0, t).squeeze(0))
        if params.stop_token is not None:
            alive = ~stopped
            tok = torch.where(alive, tok, pad_id)
            logp = torch.where(alive, logp, 0.0)
            logpi = torch.where(alive, logpi, 0.0) if params.filtered else logp
            stopped.logical_or_(_is_stop(tok, stop))
            st.mask.index_copy_(1, t, alive[:, None])
        st.tokens.index_copy_(1, t, tok[:, None])
        st.logprobs.index_copy_(1, t, logp[:, None])
        if params.filtered:
            st.policy_logprobs.index_copy_(1, t, logpi[:, None])
        pos = t + Tp  # the new token's cache slot
        attn_mask = (st.key_mask & (slots <= pos))[:, None, None, :]  # (B, 1, 1, Tp + N)
        positions = st.new_positions.index_select(1, t).squeeze(1)
        logits.copy_(decode_step(model, layers, tok, positions, attn_mask, cache.k, cache.v, pos, _attend_static))
        t.add_(1)

    graph = None
    side = torch.cuda.Stream(device) if device.type == "cuda" else None  # for the eager warm-up steps
    for i in range(N):
        if side is None:
            step()
        elif i < GRAPH_WARMUP:  # eager, as a capture needs (cuBLAS and the allocator set up first)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            if graph is None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()  # recorded, not run
            graph.replay()
        if params.stop_token is not None and (i + 1) % check_every == 0 and bool(stopped.all()):  # host sync
            break
    if params.stop_token is None:
        st.mask.fill_(True)
    truncated = ~stopped if params.stop_token is not None else torch.ones_like(stopped)
    return Generation(tokens=st.tokens, logprobs=st.logprobs, mask=st.mask, truncated=truncated,
                      policy_logprobs=st.policy_logprobs)
