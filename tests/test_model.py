"""The GPT-2 policy in `distpg.model`: logits against Hugging Face transformers, KV-cache decoding, left
padding, the tied output layer, presets and seeding, and the n_positions limit.

Weights are drawn larger than GPT-2's N(0, 0.02) init (`randomize_parameters` in conftest) so that attention is far from
uniform and logits spread over several units: with the stock init every logit is near 0 and a broken mask
or a wrong transpose could hide under the tolerance.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from distpg.generate import SamplingParams, generate
from distpg.hf import CONV1D, from_hf_state
from distpg.model import GPT, PRESETS, ModelShape, build_model, token_logprobs
from tests.conftest import randomize_parameters

SHAPE = ModelShape(vocab_size=50, n_layer=2, n_head=4, n_embd=64, n_positions=32)


def _hf_config(shape: ModelShape, **kw) -> GPT2Config:
    return GPT2Config(
        vocab_size=shape.vocab_size,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        n_embd=shape.n_embd,
        n_positions=shape.n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        **kw,
    )


def _from_hf(hf: GPT2LMHeadModel, shape: ModelShape) -> GPT:
    """distpg's GPT with the weights of a HF GPT2LMHeadModel (name for name, Conv1D transposed; the tied
    lm_head checked equal to wte): `distpg.hf.from_hf_state`, which `model.init_from` uses too."""
    state = {k: v.clone() for k, v in from_hf_state(hf.state_dict()).items()}
    model = GPT(shape)
    model.load_state_dict(state, strict=True)  # strict: every distpg parameter came from HF
    return model.eval()


@pytest.fixture(scope="module")
def hf_pair() -> tuple[GPT2LMHeadModel, GPT]:
    # eager attention: HF's own softmax(QK^T)V, independent of the SDPA kernel distpg uses
    hf = GPT2LMHeadModel(_hf_config(SHAPE, attn_implementation="eager"))
    randomize_parameters(hf, seed=0, scale=0.2)
    hf.eval()
    return hf, _from_hf(hf, SHAPE)


@pytest.fixture(scope="module")
def model() -> GPT:
    m = build_model(SHAPE, seed=0)
    randomize_parameters(m, seed=1, scale=0.2)
    return m.eval()


# ---------------------------------------------------------------- Hugging Face reference


@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (2, 32)])  # 32 = n_positions: every position embedding
def test_logits_match_transformers(hf_pair, B, T):
    hf, ours = hf_pair
    idx = torch.randint(SHAPE.vocab_size, (B, T), generator=torch.Generator().manual_seed(B * 100 + T))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert got.shape == (B, T, SHAPE.vocab_size)
    assert got.dtype == torch.float32
    assert expected.std() > 1.0  # logits spread out, so the 1e-4 tolerance is tight
    assert (got - expected).abs().max().item() < 1e-4


def test_greedy_continuation_matches_transformers(hf_pair):
    hf, ours = hf_pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(SHAPE.vocab_size, (n,), generator=g).tolist() for n in (1, 4, 9)]
    n_new = 8
    params = SamplingParams(max_new_tokens=n_new, temperature=0.0)
    # distpg decodes the prompts as one left-padded batch on the KV cache; HF decodes each prompt alone
    got = generate(ours, prompts, params, torch.Generator().manual_seed(0)).rows()
    for prompt, row in zip(prompts, got):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            # an explicit attention mask: without one HF masks every token equal to pad_token_id
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new)
        assert row == out[0, len(prompt) :].tolist()


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize(
    "prefill,chunks",
    [
        (5, [1] * 15),  # one token at a time
        (5, [3, 3, 3, 3, 3]),  # equal chunks
        (1, [4, 1, 7, 2, 6]),  # ragged chunks after a one-token prefill
    ],
)
@pytest.mark.parametrize("attention", ["kernel", "sdpa", "elementwise"])
def test_kv_cache_decoding_matches_full_forward(model, prefill, chunks, attention, monkeypatch):
    """Chunked decoding on the cache against one full forward; one-token chunks take each path of the one-query
    attention: the C kernel, and with it off SDPA (the GPU's path) and the elementwise ops (the CPU's)."""
    from distpg import kernels
    from distpg import model as model_module

    monkeypatch.setattr(kernels, "enabled", attention == "kernel")
    monkeypatch.setattr(model_module, "SDPA_DECODE", attention == "sdpa")
    T = prefill + sum(chunks)
    B = 3
    idx = torch.randint(SHAPE.vocab_size, (B, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        full = model(idx)
        # the cache is larger than the sequence: slots past pos + T must not be attended to
        cache = model.new_cache(B, SHAPE.n_positions)
        parts = [model(idx[:, :prefill], cache=cache, pos=0)]
        pos = prefill
        for n in chunks:
            parts.append(model(idx[:, pos : pos + n], cache=cache, pos=pos))
            pos += n
    cached = torch.cat(parts, dim=1)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- left padding


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, key_mask and position ids of a left-padded batch, built as `generate` builds them."""
    Tp = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (Tp - len(p)) + p for p in prompts])
    key_mask = torch.tensor([[False] * (Tp - len(p)) + [True] * len(p) for p in prompts])
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    return idx, key_mask, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["kernel", "sdpa", "elementwise"])
def test_decode_step_is_the_models_one_token_forward(model, dtype, attention, monkeypatch, pack_every_weight):
    """`decode_step` (the sampler's lean path) against the model's own forward of one token on the cache,
    left-padded rows and every step of a decode: the same logits and the same cache, bit for bit (the same
    operations), with the CPU kernels on, and off with either PyTorch path of the attention."""
    from distpg import kernels
    from distpg import model as model_module
    from distpg.model import _attention_mask, decode_layers, decode_step, decode_weights

    monkeypatch.setattr(kernels, "enabled", attention == "kernel")
    monkeypatch.setattr(model_module, "SDPA_DECODE", attention == "sdpa")
    m = copy.deepcopy(model).to(dtype)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(SHAPE.vocab_size, (n,), generator=g).tolist() for n in (1, 6, 4)]
    idx, key_mask, positions = _left_padded(prompts, pad_id=7)
    B, Tp = idx.shape
    N = 5
    new = torch.randint(SHAPE.vocab_size, (B, N), generator=g)
    full_mask = torch.cat([key_mask, torch.ones(B, N, dtype=torch.bool)], dim=1)
    new_positions = key_mask.sum(1, keepdim=True) + torch.arange(N)
    caches = [m.new_cache(B, Tp + N) for _ in range(2)]
    with torch.inference_mode(), kernels.packed_weights(m, decode_weights(m), None, B):
        for c in caches:
            m(idx, positions=positions, key_mask=full_mask, cache=c, pos=0)
        layers = decode_layers(m)
        for t in range(N):
            pos = Tp + t
            ref = m(new[:, t : t + 1], positions=new_positions[:, t : t + 1], key_mask=full_mask, cache=caches[0],
                    pos=pos)[:, -1]
            mask = _attention_mask(1, pos, full_mask, "cpu")
            got = decode_step(m, layers, new[:, t], new_positions[:, t], mask, caches[1].k, caches[1].v, pos)
            assert ref.abs().max() > 1 and torch.equal(got, ref), t
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


def test_left_padded_batch_matches_each_prompt_alone(model):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(SHAPE.vocab_size, (n,), generator=g).tolist() for n in (1, 6, 11, 3)]
    next_tokens = torch.randint(SHAPE.vocab_size, (len(prompts), 1), generator=g)
    idx, key_mask, positions = _left_padded(prompts, pad_id=7)
    B, Tp = idx.shape
    with torch.no_grad():
        alone = [model(torch.tensor([p]))[0, -1] for p in prompts]
        alone_next = [model(torch.tensor([p + [int(t)]]))[0, -1] for p, t in zip(prompts, next_tokens)]

        # without a cache
        padded = model(idx, positions=positions, key_mask=key_mask)[:, -1]

        # with a cache, then one decode step, as `generate` does it
        cache = model.new_cache(B, Tp + 1)
        full_mask = torch.cat([key_mask, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        prefill = model(idx, positions=positions, key_mask=full_mask, cache=cache, pos=0)[:, -1]
        step = model(next_tokens, positions=key_mask.sum(1, keepdim=True), key_mask=full_mask, cache=cache, pos=Tp)

        # the test has teeth: ignoring the padding changes the short rows' logits
        unmasked = model(idx)[:, -1]
    for i in range(B):
        torch.testing.assert_close(padded[i], alone[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(prefill[i], alone[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(step[i, -1], alone_next[i], atol=1e-5, rtol=0)
    assert (unmasked[0] - alone[0]).abs().max() > 1e-2


# ---------------------------------------------------------------- tied output layer, presets, seeds


def test_output_layer_is_tied_to_token_embedding(model):
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n for n in names)
    assert sum(p.shape == model.wte.weight.shape for p in model.parameters()) == 1  # one (V, C) matrix

    # logits are the final hidden states times wte^T
    hidden = {}
    handle = model.ln_f.register_forward_hook(lambda mod, inp, out: hidden.setdefault("x", out))
    idx = torch.tensor([[1, 2, 3, 4]])
    try:
        logits = model(idx)
    finally:
        handle.remove()
    torch.testing.assert_close(logits, hidden["x"] @ model.wte.weight.t())

    # gradient reaches wte rows of tokens that are not in the input: only through the output layer
    model.zero_grad()
    torch.log_softmax(logits, -1)[0, -1, 40].backward()
    grad = model.wte.weight.grad
    model.zero_grad()
    unused = [v for v in range(SHAPE.vocab_size) if v not in idx.tolist()[0]]
    assert grad[unused].abs().sum(1).min() > 0


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() counts a tied matrix once


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_match_transformers_parameter_count(preset):
    # GPT-2's own vocabulary and context, so the "gpt2" preset is GPT-2 124M; built on the meta device
    # (shapes only, no memory, no init time)
    shape = ModelShape(vocab_size=50257, n_positions=1024, **PRESETS[preset])
    with torch.device("meta"):
        ours = GPT(shape)
        hf = GPT2LMHeadModel(_hf_config(shape))
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = hf_params["transformer." + name]
        assert p.shape == (ref.shape[::-1] if name.endswith(CONV1D) else ref.shape), name
    assert _n_params(ours) == _n_params(hf)
    assert len(ours.h) == shape.n_layer and ours.h[0].attn.n_head == shape.n_head
    if preset == "gpt2":
        assert _n_params(ours) == 124_439_808


def test_same_seed_same_parameters_different_seed_different():
    a, b, c = build_model(SHAPE, seed=7), build_model(SHAPE, seed=7), build_model(SHAPE, seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.std() > 0:  # LayerNorm weights (ones) and biases (zeros) do not depend on the seed
            assert not torch.equal(pa, pc), name


def test_build_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_model(SHAPE, seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_init_is_gpt2():
    m = build_model(ModelShape(vocab_size=1000, n_layer=4, n_head=4, n_embd=128, n_positions=64), seed=0)
    assert abs(m.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(m.h[0].mlp.c_proj.weight.std().item() - 0.02 / (2 * 4) ** 0.5) < 1e-3
    assert torch.equal(m.h[0].ln_1.weight, torch.ones(128)) and torch.equal(m.h[0].attn.c_attn.bias, torch.zeros(384))


# ---------------------------------------------------------------- boundaries


def test_forward_rejects_sequences_longer_than_n_positions(model):
    P = SHAPE.n_positions
    assert model(torch.zeros(1, P, dtype=torch.long)).shape == (1, P, SHAPE.vocab_size)
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, P + 1, dtype=torch.long))
    # also when the overflow comes from the cache offset
    cache = model.new_cache(1, P + 1)
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache, pos=P - 1)


def test_shape_rejects_n_embd_not_divisible_by_n_head():
    with pytest.raises(ValueError, match="divisible"):
        ModelShape(vocab_size=10, n_layer=1, n_head=3, n_embd=64, n_positions=8)


def test_token_logprobs_is_log_softmax_gathered_in_float32():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]], dtype=torch.bfloat16)  # (1, 2, 3)
    targets = torch.tensor([[2, 1]])
    # row 0: 3 - log(e^1 + e^2 + e^3); row 1: uniform over 3 tokens
    expected = torch.tensor([[3 - math.log(math.e + math.e**2 + math.e**3), -math.log(3)]])
    got = token_logprobs(logits, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- prompts shared by a group (the learner)


def test_a_prompt_shared_by_its_group_runs_once_with_the_plain_forwards_numbers(monkeypatch):
    """`forward_shared_prompts` against the plain forward in float64: every position's logits and hidden
    states, and the gradients of every parameter, for groups of rows sharing a prompt (prompts of different
    lengths, one a prefix of another, a row that is all prompt, right padding). Each distinct prompt goes
    through the blocks once; where that saves no work, the plain forward runs."""
    import torch.nn.functional as F

    import distpg.model as model_mod
    from distpg.model import forward_shared_prompts

    m = build_model(ModelShape(vocab_size=11, n_layer=2, n_head=2, n_embd=16, n_positions=32), seed=0).double()
    randomize_parameters(m, seed=1, scale=0.3)
    g = torch.Generator().manual_seed(3)
    prompts = [[4, 7, 2, 9], [4, 7, 2], [4, 7], [8, 3, 3]]  # [4, 7] a prefix of others: a prompt of its own
    rows, plen = [], []
    for p in prompts:
        for n in torch.randint(0, 7, (3,), generator=g).tolist():  # 0: a row that is all prompt
            rows.append(p + torch.randint(1, 11, (n,), generator=g).tolist())
            plen.append(len(p))
    B, T = len(rows), max(map(len, rows))
    idx = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    plen = torch.tensor(plen)
    seen = []  # token positions through the first block's qkv product

    class Counting:
        def __getattr__(self, name):
            return getattr(F, name)

        def linear(self, x, weight, bias=None):
            if weight is m.h[0].attn.c_attn.weight:
                seen.append(x.shape[:-1].numel())
            return F.linear(x, weight, bias)

    monkeypatch.setattr(model_mod, "F", Counting())
    ref, ref_h = m(idx, return_hidden=True)
    assert seen == [B * T]
    seen.clear()
    got, got_h = forward_shared_prompts(m, idx, plen, return_hidden=True)
    assert sum(seen) == 4 * 4 + B * (T - 2) < B * T  # 4 prompts of up to 4 tokens, each row's rest after 2
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(got_h, ref_h, atol=1e-12, rtol=0)
    params = list(m.parameters())
    loss = lambda out: (out.sum() + (out**2).sum())  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(got), params), torch.autograd.grad(loss(ref), params)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # nothing shared: the plain forward itself
    seen.clear()
    alone = forward_shared_prompts(m, idx[::3], plen[::3])
    assert seen == [4 * T] and torch.equal(alone, m(idx[::3]))
    # the output layer at chosen positions only (the learner's: the response tokens), shared or not: the
    # logits of those positions, (N, V) in row-major order, and the same hidden states
    keep = torch.rand(B, T, generator=g) < 0.4
    rows_out = []
    real_output = model_mod.output_layer
    monkeypatch.setattr(model_mod, "output_layer",
                        lambda model, x: rows_out.append(x.shape[0]) or real_output(model, x))
    some, some_h = forward_shared_prompts(m, idx, plen, return_hidden=True, logits_at=keep)
    torch.testing.assert_close(some, ref[keep], atol=1e-12, rtol=0)
    torch.testing.assert_close(some_h, ref_h, atol=1e-12, rtol=0)
    assert torch.equal(m(idx, logits_at=keep), m(idx)[keep])
    assert torch.equal(forward_shared_prompts(m, idx[::3], plen[::3], logits_at=keep[::3]), m(idx[::3])[keep[::3]])
    assert rows_out[0] == rows_out[1] == int(keep.sum()) < B * T


@pytest.mark.parametrize("T", [1, 5])
def test_rows_that_are_all_prompt_share_it_too(T):
    """Every row all prompt (prompt_len >= T: a completion of one token, the last input position dropped;
    T == 1 too): the shared forward gives the plain one's logits, hidden states and gradients instead of an
    index error from an empty stream of the rows' own tokens."""
    from distpg.model import forward_shared_prompts

    m = build_model(ModelShape(vocab_size=11, n_layer=2, n_head=2, n_embd=16, n_positions=8), seed=0).double()
    randomize_parameters(m, seed=1, scale=0.3)
    idx = torch.tensor([[4, 7, 2, 9, 1][:T]] * 3 + [[8, 3, 3, 5, 6][:T]] * 3)
    for plen in (torch.full((6,), T), torch.tensor([T, T + 2, T, T, T, 9])):  # past T: clamped to T
        got, got_h = forward_shared_prompts(m, idx, plen, return_hidden=True)
        ref, ref_h = m(idx, return_hidden=True)
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(got_h, ref_h, atol=1e-12, rtol=0)
        params = list(m.parameters())
        for a, b in zip(torch.autograd.grad(got.sum() + (got_h**2).sum(), params),
                        torch.autograd.grad(ref.sum() + (ref_h**2).sum(), params)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_the_shared_forward_refuses_what_the_plain_one_does():
    """A sequence longer than n_positions: the plain forward's ValueError, not an embedding's IndexError (a
    device-side assert on a GPU)."""
    from distpg.model import forward_shared_prompts

    m = build_model(ModelShape(vocab_size=11, n_layer=1, n_head=2, n_embd=8, n_positions=8), seed=0)
    idx = torch.tensor([[1, 2, 3] + list(range(7))] * 4)
    with pytest.raises(ValueError, match="sequence of 10 tokens exceeds n_positions=8"):
        forward_shared_prompts(m, idx, torch.full((4,), 3))
