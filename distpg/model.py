"""The policy: a decoder-only transformer with exactly the GPT-2 architecture.

Learned token and position embeddings, pre-LayerNorm blocks (LN -> causal self-attention -> residual,
LN -> GELU(tanh) MLP -> residual), a final LayerNorm and an output layer tied to the token embedding.
Module names follow Hugging Face's `GPT2LMHeadModel` (`wte`, `wpe`, `h.N.ln_1`, `attn.c_attn`, ...) so a
GPT-2 checkpoint maps onto it name for name (HF stores its `Conv1D` weights transposed).

Decoding uses a preallocated KV cache (`KVCache`): `forward(idx, cache=cache, pos=t)` writes the keys and
values of the new tokens at cache positions [t, t + T) and attends to everything written before.
Rows may be left-padded: `key_mask` marks the real cache slots and `positions` gives each token its
position id, so padded and unpadded prompts give the same logits.

The model knows nothing about distribution; the rollout workers and the learner wrap it from outside.
Loading and exporting Hugging Face GPT-2 folders lives in `distpg.hf`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from distpg import kernels
from distpg.memory import empty_on_huge_pages


@dataclass(frozen=True)
class ModelShape:
    """Architecture hyper-parameters (GPT-2 names)."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"model: n_embd={self.n_embd} must be divisible by n_head={self.n_head}")


# Size presets, from a model that trains in seconds on one CPU core up to GPT-2 124M.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64),
    "small": dict(n_layer=4, n_head=4, n_embd=256),
    "medium": dict(n_layer=6, n_head=8, n_embd=512),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # GPT-2 124M (with its 50257-token vocabulary)
}


class KVCache:
    """Preallocated keys and values for every layer, batch-major: (n_layer, B, H, T_max, D) each.

    Batch-major, the keys of a (row, head) pair's first S positions are one contiguous block, which the
    one-query decode step reads as a plain stream (see `_attend_new`), and a prefill's keys are already in the
    (B, H, S, D) layout of `F.scaled_dot_product_attention`.
    """

    def __init__(self, shape: ModelShape, batch_size: int, max_len: int, device, dtype) -> None:
        head_dim = shape.n_embd // shape.n_head
        size = (shape.n_layer, batch_size, shape.n_head, max_len, head_dim)
        # uninitialised: attention reads only slots already written ([0, pos + T)); on a CPU, on huge pages
        # where the OS gives them (each decode step reads the whole cache)
        if torch.device(device).type == "cpu":
            self.k, self.v = empty_on_huge_pages(size, dtype), empty_on_huge_pages(size, dtype)
        else:
            self.k = torch.empty(size, device=device, dtype=dtype)
            self.v = torch.empty(size, device=device, dtype=dtype)
        self.max_len = max_len


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.n_head = shape.n_head
        self.c_attn = nn.Linear(shape.n_embd, 3 * shape.n_embd)
        self.c_proj = nn.Linear(shape.n_embd, shape.n_embd)

    def forward(self, x, attn_mask, layer_cache=None, pos: int = 0):
        B, T, C = x.shape
        H = self.n_head
        qkv = _linear(x, self.c_attn.weight, self.c_attn.bias)
        if layer_cache is not None and T == 1:
            y = _attend_new(qkv[:, 0], *layer_cache, pos, attn_mask, H).view(B, 1, C)
            return _linear(y, self.c_proj.weight, self.c_proj.bias)
        q, k, v = (t.view(B, T, H, C // H) for t in qkv.split(C, dim=2))  # (B, T, H, D)
        if layer_cache is not None:
            cache_k, cache_v = layer_cache  # (B, H, T_max, D)
            cache_k[:, :, pos : pos + T] = k.transpose(1, 2)
            cache_v[:, :, pos : pos + T] = v.transpose(1, 2)
            k, v = cache_k[:, :, : pos + T], cache_v[:, :, : pos + T]
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        # (B, H, T, D) for the attention kernel
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=attn_mask)
        return _linear(y.transpose(1, 2).reshape(B, T, C), self.c_proj.weight, self.c_proj.bias)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, on the weight's pre-packed copy inside `kernels.packed_weights` (the
    sampler's decode steps)."""
    out = kernels.linear(x, weight, bias)
    return F.linear(x, weight, bias) if out is None else out


def _attend_new(qkv, cache_k, cache_v, pos: int, attn_mask, n_head: int) -> torch.Tensor:
    """One new token per row: its key and value go into the caches at `pos`, then its query attends over
    positions [0, pos].

    qkv (B, 3C): each row's query, key and value side by side (c_attn's output); cache_k, cache_v
    (B, H, T_max, D); attn_mask bool broadcastable to (B, 1, 1, pos + 1) or None. Returns (B, C).
    On a CPU, in float32 or bfloat16 without autograd, one call of a C kernel (`distpg.kernels`) writes the new
    key and value and reads the cached keys and values once each; elsewhere (a GPU, `rollout.cpu_kernels=false`,
    or where the kernel cannot be built), PyTorch ops, as `SDPA_DECODE` says.
    """
    B, C = qkv.shape[0], qkv.shape[1] // 3
    k, v = cache_k[:, :, : pos + 1], cache_v[:, :, : pos + 1]  # (B, H, S, D)
    k_t, v_t = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)  # (S, B, H, D) views
    out = kernels.decode_attention_new(qkv, k_t, v_t, attn_mask)
    if out is None:
        q, cache_k[:, :, pos], cache_v[:, :, pos] = (t.view(B, n_head, C // n_head) for t in qkv.split(C, dim=1))
        use_sdpa = qkv.device.type != "cpu" if SDPA_DECODE is None else SDPA_DECODE
        if use_sdpa:
            out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=attn_mask)  # (B, H, 1, D)
        else:
            out = _decode_attention_torch(q, k_t, v_t, attn_mask)
    return out.reshape(B, C)


# The one-query attention's PyTorch path (where the C kernel does not run): `F.scaled_dot_product_attention`
# on the batch-major cache, which is its (B, H, S, D) layout, or the elementwise ops of `_decode_attention_torch`.
# None picks by device. On a GPU, SDPA: a fused kernel that reads the cache once, where the elementwise ops write
# and read back (S, B, H, D) products (not yet measured on a GPU: `distpg bench sampler --device cuda` times
# both). On a CPU, the elementwise ops: SDPA is 1.3-1.9x faster alone at the sampler bench's sizes, but 1-6%
# slower in the whole 4x256 decode loop (profiled, the matrix products around it take longer).
SDPA_DECODE: bool | None = None


def _decode_attention_torch(q, k, v, attn_mask):
    """Attention of one query per row over the cache, written out in PyTorch ops (any device, dtype and
    autograd): q (B, H, D), k, v (S, B, H, D) of any strides, attn_mask bool broadcastable to (B, 1, 1, S) or
    None -> (B, H, D). The reference the C kernel is checked against (in float64): the scores are one
    elementwise product and sum over the keys, the softmax runs in float32 over positions, and the output is
    the probability-weighted sum of the values.
    """
    scores = (k * q).sum(-1).float().mul_(q.shape[-1] ** -0.5)  # (S, B, H)
    if attn_mask is not None:
        scores.masked_fill_(~attn_mask[:, 0, 0].t()[..., None], float("-inf"))
    return (v * scores.softmax(0).to(v.dtype)[..., None]).sum(0)


class MLP(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.c_fc = nn.Linear(shape.n_embd, 4 * shape.n_embd)
        self.c_proj = nn.Linear(4 * shape.n_embd, shape.n_embd)

    def forward(self, x):
        return _mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)


def _mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
    # GPT-2's "gelu_new" is the tanh approximation; without autograd on a CPU, fused into the product on a
    # pre-packed weight, else in place in C (distpg.kernels)
    h = kernels.linear(x, fc_weight, fc_bias, gelu=True)
    if h is None:
        h = F.linear(x, fc_weight, fc_bias)
        if not kernels.gelu_tanh_(h):
            h = F.gelu(h, approximate="tanh")
    return _linear(h, proj_weight, proj_bias)


class Block(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.n_embd, eps=shape.layer_norm_epsilon)
        self.attn = CausalSelfAttention(shape)
        self.ln_2 = nn.LayerNorm(shape.n_embd, eps=shape.layer_norm_epsilon)
        self.mlp = MLP(shape)

    def forward(self, x, attn_mask, layer_cache=None, pos: int = 0):
        x = x + self.attn(self.ln_1(x), attn_mask, layer_cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: `forward(idx) -> logits (B, T, V)`."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        self.wte = nn.Embedding(shape.vocab_size, shape.n_embd)
        self.wpe = nn.Embedding(shape.n_positions, shape.n_embd)
        self.h = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.n_embd, eps=shape.layer_norm_epsilon)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.shape.n_layer))
            else:
                nn.init.normal_(p, std=0.02)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.wte.weight
        return KVCache(self.shape, batch_size, max_len, p.device, p.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pos: int = 0,
        return_hidden: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits for every input position (or those of `logits_at`).

        Args:
            idx: token ids (B, T).
            positions: position ids (B, T); default `pos + arange(T)`.
            key_mask: bool (B, pos + T), True where a key is a real token (False for left padding);
                default all True.
            cache: a `KVCache`; the new keys and values are written at [pos, pos + T).
            pos: index of the first new token in the cache.
            return_hidden: also return the final hidden states (B, T, C) after ln_f (for a value head).
            logits_at: bool (B, T): the output layer runs on these positions only, and the logits are (N, V) for
                its N True entries in row-major order (as `logits[logits_at]`; HF's `logits_to_keep`): the
                learner's, which needs no logits at prompt and padding positions. With GPT-2's vocabulary the
                output layer is about a third of a position's work and its logits an update's largest tensors.
        Returns:
            logits (B, T, V) in the parameters' dtype (and the hidden states with return_hidden).
        """
        B, T = idx.shape
        if positions is None:
            positions = torch.arange(pos, pos + T, device=idx.device).expand(B, T)
        if pos + T > self.shape.n_positions:
            raise ValueError(f"sequence of {pos + T} tokens exceeds n_positions={self.shape.n_positions}")
        attn_mask = _attention_mask(T, pos, key_mask, idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for i, block in enumerate(self.h):
            layer_cache = (cache.k[i], cache.v[i]) if cache is not None else None
            x = block(x, attn_mask, layer_cache, pos)
        x = self.ln_f(x)
        logits = output_layer(self, x if logits_at is None else x[logits_at])
        return (logits, x) if return_hidden else logits


def forward_every_row(model: GPT, idx: torch.Tensor, prompt_len: torch.Tensor, return_hidden: bool = False,
                      logits_at: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`forward_shared_prompts` without the sharing: the plain forward of every row, prompt included (the
    reference the shared forward is measured and checked against)."""
    return model(idx, return_hidden=return_hidden, logits_at=logits_at)


def forward_shared_prompts(model: GPT, idx: torch.Tensor, prompt_len: torch.Tensor, return_hidden: bool = False,
                           logits_at: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`model(idx)` (logits (B, T, V), and the hidden states with return_hidden; (N, V) at `logits_at` only, as
    `GPT.forward`) for rows that begin with a prompt many of them share (a group of G samples per prompt), with
    each distinct prompt run through the model once: rows = prompt (prompt_len[i] tokens) + the rest,
    right-padded.

    Two streams per layer: the distinct prompts (U, P) under a causal mask, and every row's own tokens after
    its prompt, whose queries see their prompt's keys and values (gathered from the prompt stream, so the
    gradient reaches it through them) and their own earlier ones. Every position gets the numbers of the
    plain forward up to float rounding (checked in float64 against it, gradients too); with groups of G,
    the prompt tokens cost 1/G of their work. The two streams are padded to the longest prompt and the longest
    rest: where that makes more token positions than the plain forward (no prompt repeats, or prompt lengths
    far apart), the plain forward runs.
    """
    B, T = idx.shape
    if T > model.shape.n_positions:  # as the plain forward says (not an embedding's index error)
        raise ValueError(f"sequence of {T} tokens exceeds n_positions={model.shape.n_positions}")
    device = idx.device
    plen = prompt_len.clamp(1, T)
    P = int(plen.max())
    cols = torch.arange(T, device=device)  # P, Lc <= T
    prompts = torch.where(cols[None, :P] < plen[:, None], idx[:, :P], -1)  # (B, P), -1 past each prompt
    uniq, group = torch.unique(prompts, dim=0, return_inverse=True)  # (U, P), (B,)
    # the longest row's own part; at least 1 (one padding query per row) where every row is all prompt
    Lc = max(T - int(plen.min()), 1)
    if uniq.shape[0] * P + B * Lc >= B * T:  # no saving (nothing repeats, or prompt lengths far apart)
        return model(idx, return_hidden=return_hidden, logits_at=logits_at)
    j = cols[None, :Lc]
    own_pos = (plen[:, None] + j).clamp(max=T - 1)  # (B, Lc) positions of each row's own tokens (then padding)
    own = idx.gather(1, own_pos)
    C, H = model.shape.n_embd, model.shape.n_head
    D = C // H
    xp = model.wte(uniq.clamp(min=0)) + model.wpe(cols[:P])  # (U, P, C): a prompt's padding comes after it
    xc = model.wte(own) + model.wpe(own_pos)  # (B, Lc, C)
    # a row's query j sees its prompt's keys [0, plen) and its own keys [0, j]
    keys = torch.cat([(cols[None, :P] < plen[:, None])[:, None, :].expand(B, Lc, P),
                      (cols[:Lc][None, :] <= cols[:Lc][:, None])[None].expand(B, Lc, Lc)], dim=2)[:, None]
    causal = _attention_mask(P, 0, None, device)  # the prompts' own
    for block in model.h:
        a = block.attn
        qkv_p = F.linear(block.ln_1(xp), a.c_attn.weight, a.c_attn.bias)
        qkv_c = F.linear(block.ln_1(xc), a.c_attn.weight, a.c_attn.bias)
        qp, kp, vp = (t.view(-1, P, H, D).transpose(1, 2) for t in qkv_p.split(C, dim=2))  # (U, H, P, D)
        qc, kc, vc = (t.view(B, Lc, H, D).transpose(1, 2) for t in qkv_c.split(C, dim=2))  # (B, H, Lc, D)
        yp = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=causal)
        yc = F.scaled_dot_product_attention(qc, torch.cat([kp[group], kc], 2), torch.cat([vp[group], vc], 2),
                                            attn_mask=keys)
        xp = xp + F.linear(yp.transpose(1, 2).reshape(-1, P, C), a.c_proj.weight, a.c_proj.bias)
        xc = xc + F.linear(yc.transpose(1, 2).reshape(B, Lc, C), a.c_proj.weight, a.c_proj.bias)
        xp = xp + block.mlp(block.ln_2(xp))
        xc = xc + block.mlp(block.ln_2(xc))
    # position t of row i: its prompt's stream below plen[i], its own stream from there
    in_prompt = cols[None, :T] < plen[:, None]  # (B, T)
    hp = xp[group].gather(1, cols[:T].clamp(max=P - 1)[None, :, None].expand(B, T, C))
    hc = xc.gather(1, (cols[None, :T] - plen[:, None]).clamp(0, Lc - 1)[..., None].expand(B, T, C))
    x = model.ln_f(torch.where(in_prompt[..., None], hp, hc))
    logits = output_layer(model, x if logits_at is None else x[logits_at])
    return (logits, x) if return_hidden else logits


def output_layer(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states: the output layer, tied to the token embedding."""
    return _linear(x, model.wte.weight)


def decode_layers(model: GPT) -> list[tuple[torch.Tensor, ...]]:
    """Each block's parameters in the order `decode_step` takes them, looked up once per generation."""
    return [(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
             b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
             b.mlp.c_proj.weight, b.mlp.c_proj.bias) for b in model.h]


def _attend_static(qkv, cache_k, cache_v, pos: torch.Tensor, attn_mask, n_head: int) -> torch.Tensor:
    """`_attend_new` in shapes that stay the same from token to token, so that a CUDA graph can replay it: the
    new key and value go into the caches at `pos`, a (1,) int64 tensor on their device, and the query attends
    over the whole cache (B, H, T_max, D), `attn_mask` (B, 1, 1, T_max) hiding the slots after `pos` and the
    padding. The caches must start zero-filled: a hidden slot still enters the weighted sum, times 0."""
    B, C = qkv.shape[0], qkv.shape[1] // 3
    q, k, v = (t.view(B, n_head, 1, C // n_head) for t in qkv.split(C, dim=1))
    cache_k.index_copy_(2, pos, k)
    cache_v.index_copy_(2, pos, v)
    return F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=attn_mask).reshape(B, C)


def decode_step(model: GPT, layers, tok, positions, attn_mask, cache_k, cache_v, pos,
                attend=_attend_new) -> torch.Tensor:
    """Logits (b, V) for one new token per row: `model(tok[:, None], positions=positions[:, None], ...)[:, -1]`
    on the cache tensors, in fewer operations.

    The sampler calls this once per new token, so its fixed cost counts: functional calls on the parameters
    looked up once (`decode_layers(model)`) instead of module calls, and the new key and value written into
    the cache by the attention kernel (`_attend_new`). The same operations as the modules' one-token path,
    hence the same logits.

    Args:
        tok, positions: (b,) token and position ids.
        attn_mask: bool broadcastable to (b, 1, 1, pos + 1), or None when every cached slot is a real token.
        cache_k, cache_v: (n_layer, b, H, T_max, D).
        pos: the cache position of the new token.
        attend: `_attend_new` (pos an int), or `_attend_static` (pos a (1,) tensor; attn_mask covers the whole
            cache): the fixed-shape step a CUDA graph captures.
    """
    C, H, eps = model.shape.n_embd, model.shape.n_head, model.shape.layer_norm_epsilon
    x = F.embedding(tok, model.wte.weight) + F.embedding(positions, model.wpe.weight)
    for i, (ln1_w, ln1_b, qkv_w, qkv_b, out_w, out_b, ln2_w, ln2_b, fc_w, fc_b, proj_w, proj_b) in enumerate(layers):
        qkv = _linear(F.layer_norm(x, (C,), ln1_w, ln1_b, eps), qkv_w, qkv_b)
        x = x + _linear(attend(qkv, cache_k[i], cache_v[i], pos, attn_mask, H), out_w, out_b)
        x = x + _mlp(F.layer_norm(x, (C,), ln2_w, ln2_b, eps), fc_w, fc_b, proj_w, proj_b)
    return output_layer(model, F.layer_norm(x, (C,), model.ln_f.weight, model.ln_f.bias, eps))


def decode_stepper(model: GPT, rows: int) -> Callable[..., torch.Tensor]:
    """`decode_step` for this model with its parameters looked up once: called as
    `step(tok, positions, attn_mask, cache_k, cache_v, pos)`. Float32 on a CPU inside `kernels.packed_weights`
    with the transposed layout, the step up to the final layer norm is one call of the C library
    (`kernels.DecodeStep`, the same operations); elsewhere `decode_step` itself."""
    layers = decode_layers(model)
    in_c = kernels.decode_step_in_c(model.wte.weight, model.wpe.weight, layers, (model.ln_f.weight, model.ln_f.bias),
                                    model.shape.layer_norm_epsilon, model.shape.n_head, rows)
    return functools.partial(decode_step, model, layers) if in_c is None else _StepInC(model, in_c)


class _StepInC:
    """`decode_stepper`'s step where it runs in C (`in_c` tells the sampler, which then also prefills short
    prompts through it)."""

    in_c = True

    def __init__(self, model: GPT, step: kernels.DecodeStep) -> None:
        self.model, self.step = model, step

    def __call__(self, *args) -> torch.Tensor:
        return output_layer(self.model, self.step(*args))


def decode_weights(model: GPT) -> list[torch.Tensor]:
    """The weight matrices a decode step multiplies by: every linear layer's and the tied output layer's."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)] + [model.wte.weight]


def _attention_mask(T: int, pos: int, key_mask: torch.Tensor | None, device) -> torch.Tensor:
    """Bool (B or 1, 1, T, pos + T): query t sees key s when s <= pos + t and s is a real token.

    A query always sees itself, so a padding query never has an empty row (which would give NaN);
    its output is ignored.
    """
    S = pos + T
    q = torch.arange(pos, S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    mask = (k <= q)[None, None]  # (1, 1, T, S)
    if key_mask is not None:
        mask = (mask & key_mask[:, None, None, :S]) | (k == q)[None, None]
    return mask


def policy_shape(model_cfg, vocab_size: int) -> ModelShape:
    """The shape of the policy a `ModelConfig` describes (`policy_from_config`), without building it: that of the
    GPT-2 folder `model_cfg.init_from` (its config.json), else of the fields with the tokenizer's `vocab_size`."""
    if model_cfg.init_from:
        from distpg.hf import read_shape

        return read_shape(model_cfg.init_from)
    return ModelShape(vocab_size=vocab_size, n_layer=model_cfg.n_layer, n_head=model_cfg.n_head,
                      n_embd=model_cfg.n_embd, n_positions=model_cfg.n_positions)


def tensor_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """The name and shape of each tensor of a policy's state dict (a checkpoint's model.safetensors), allocating
    nothing."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(shape).state_dict().items()}


def build_model(shape: ModelShape, seed: int) -> GPT:
    """A freshly initialised policy; the same seed gives the same parameters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(shape)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets]: (B, T, V), (B, T) -> (B, T), computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def policy_from_config(model_cfg, vocab_size: int, seed: int, device: str = "cpu") -> GPT:
    """The policy described by a `ModelConfig`, on `device`: the weights of the GPT-2 folder
    `model_cfg.init_from` when set (then `seed` is unused and `vocab_size`, the tokenizer's, must fit the
    model's), else a fresh model initialised from `seed`."""
    if model_cfg.init_from:
        from distpg.hf import is_snapshot, load_gpt2, read_shape

        if is_snapshot(model_cfg.init_from):  # a run's copy without the weights: its checkpoint's go in
            return build_model(read_shape(model_cfg.init_from), seed).to(device)
        model = load_gpt2(model_cfg.init_from)
        if vocab_size > model.shape.vocab_size:
            raise ValueError(f"model.init_from={model_cfg.init_from!r}: the tokenizer has {vocab_size} tokens, "
                             f"the model only {model.shape.vocab_size}")
        return model.to(device)
    return build_model(policy_shape(model_cfg, vocab_size), seed).to(device)
