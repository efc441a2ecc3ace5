"""The C kernels of the CPU decode step (`distpg.kernels`, `distpg/csrc/decode.c`).

The attention is checked against the PyTorch formula evaluated in float64 (itself checked against
`F.scaled_dot_product_attention` in test_model), the GELU against `F.gelu(approximate="tanh")` in float64,
over the layouts the sampler hands them (cache slices, a strided q, padding masks, rows dropped from the
batch) and head sizes with and without a vector remainder. The build is exercised for real in subprocesses:
a fresh cache, the cache reused, no compiler, and a miscompiled library that the self-check must refuse.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distpg import kernels
from distpg.generate import SamplingParams, generate
from distpg.model import ModelShape, _decode_attention_torch, build_model, decode_weights
from tests.conftest import randomize_parameters

ROOT = Path(__file__).resolve().parents[1]
# on a machine without a C compiler the rest of the suite runs on the fallback (PyTorch's ops) instead
pytestmark = [pytest.mark.skipif(kernels.compiler() is None, reason="no C compiler on this machine"),
              pytest.mark.usefixtures("_kernels_on", "pack_every_weight")]
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}
DEFAULT_PACK_MIN_FLOAT32 = kernels.PACK_MIN_FLOAT32  # before the `pack_every_weight` fixture sets it to 0


@pytest.fixture
def _kernels_on():
    """Every machine with a C compiler must build them (CI's has gcc)."""
    if kernels.load() is None:
        pytest.fail(f"the kernels should build on this machine: {kernels.status()}")
    kernels.enabled = True
    yield
    kernels.enabled = True


def _case(B, H, D, S, dtype, *, t_max=None, padded=False, seed=0, layout="batch"):
    """q as the sampler makes it (a strided slice of the fused q|k|v projection), k and v as the first S
    positions of a cache, as (S, B, H, D) views: of a batch-major (B, H, t_max, D) one as the model's, or of a
    time-major (t_max, B, H, D) one; and a padding mask with at least one real slot per row."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, 3 * H * D, generator=g)
    q = qkv[..., : H * D].view(B, 1, H, D)[:, 0]
    t_max = t_max or S + 3
    cache_k, cache_v = torch.randn(2, t_max, B, H, D, generator=g).unbind(0)
    if layout == "batch":  # the same values, stored batch-major
        cache_k, cache_v = (c.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3) for c in (cache_k, cache_v))
    mask = None
    if padded:
        keys = torch.rand(B, t_max, generator=g) > 0.4
        keys[:, S - 1] = True
        mask = keys[:, None, None, :S]
    return q.to(dtype), cache_k.to(dtype)[:S], cache_v.to(dtype)[:S], mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,D,S", [(64, 4, 64, 40), (5, 3, 16, 1), (4, 2, 24, 9), (3, 2, 8, 17), (2, 1, 128, 70),
                                     (3, 12, 64, 33), (1, 1, 16, 70)])  # the last: one pair, a group of 16
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("layout", ["batch", "time"])
def test_decode_attention_matches_float64(dtype, B, H, D, S, padded, layout):
    """Head sizes 16, 32, 64 and 128 take the kernel's grouped path (a group of pairs in registers), 24 and 8
    the generic one; both on either cache layout."""
    q, k, v, mask = _case(B, H, D, S, dtype, padded=padded, layout=layout)
    got = kernels.decode_attention(q, k, v, mask)
    assert got is not None and got.dtype == dtype and got.shape == (B, H, D)
    ref = _decode_attention_torch(q.double(), k.double(), v.double(), mask)
    torch.testing.assert_close(got.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    if padded:  # a padding slot has no weight: changing its values (in place: the same layout) changes nothing
        v[~mask[:, 0, 0].t()] = 1e4
        assert torch.equal(kernels.decode_attention(q, k, v, mask), got)


@pytest.mark.parametrize("D", [64, 24])  # the grouped path and the generic one
def test_peaked_attention_matches_float64(D):
    """Scores spanning hundreds of nats (a head that attends to one position): the probabilities far below the
    peak are 0 to float32, and the kernel leaves them 0 rather than computing with denormal numbers."""
    q, k, v, mask = _case(8, 2, D, 40, torch.float32, padded=True)
    q = q * 64
    got = kernels.decode_attention(q, k, v, mask)
    ref = _decode_attention_torch(q.double(), k.double(), v.double(), mask)
    scores = torch.einsum("bhd,sbhd->bhs", q.double(), k.double()) / D**0.5
    assert (scores.amax(-1) - scores.amin(-1)).min() > 150  # nats: probabilities down to e^-150 and below
    # float32 scores of a few hundred are rounded by up to 3e-5 (their spacing), and so are their exponentials
    tol = 2 * torch.finfo(torch.float32).eps * scores.abs().max().item()
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


def test_decode_attention_on_rows_dropped_from_the_batch():
    """After rows stop, the sampler keeps the others: the cache becomes cache[:, :, keep] and the mask
    keys[keep]."""
    q, k, v, mask = _case(16, 4, 64, 12, torch.float32, padded=True)
    keep = torch.tensor([0, 3, 4, 9, 15])
    got = kernels.decode_attention(q[keep], k[:, keep], v[:, keep], mask[keep])
    torch.testing.assert_close(got, kernels.decode_attention(q, k, v, mask)[keep], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,D,S", [(64, 4, 64, 40), (4, 2, 24, 1), (3, 12, 64, 9)])
def test_decode_attention_new_writes_the_new_key_and_value_then_attends(dtype, B, H, D, S):
    """The decode step's one call: the new token's key and value, from its row of c_attn's output, into the
    cache's last position (the other positions untouched), then the attention against float64."""
    q, k, v, mask = _case(B, H, D, S, dtype, padded=True)
    qkv = torch.randn(B, 3 * H * D, generator=torch.Generator().manual_seed(9)).to(dtype)
    new_q, new_k, new_v = (t.view(B, H, D) for t in qkv.split(H * D, dim=1))
    before_k, before_v = k.clone(), v.clone()
    got = kernels.decode_attention_new(qkv, k, v, mask)
    assert torch.equal(k[-1], new_k) and torch.equal(v[-1], new_v)
    assert torch.equal(k[:-1], before_k[:-1]) and torch.equal(v[:-1], before_v[:-1])
    assert got is not None and got.dtype == dtype and got.shape == (B, H, D)
    ref = _decode_attention_torch(new_q.double(), k.double(), v.double(), mask)
    torch.testing.assert_close(got.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    # where the kernel does not apply, nothing is written
    k[-1], v[-1] = before_k[-1], before_v[-1]
    for bad in (qkv.double(), qkv[:, : 2 * H * D], qkv.t().contiguous().t(), qkv.clone().requires_grad_()):
        assert kernels.decode_attention_new(bad, k, v, mask) is None
        assert torch.equal(k, before_k) and torch.equal(v, before_v)


def test_small_float32_weights_stay_on_f_linear(monkeypatch):
    """By default float32 weights under PACK_MIN_FLOAT32 elements are not laid out for oneDNN (its fixed cost per
    call exceeds what packing saves), larger ones are, and bfloat16 ones at any size; the transposed layout takes
    float32 weights of every size."""
    monkeypatch.setattr(kernels, "PACK_MIN_FLOAT32", DEFAULT_PACK_MIN_FLOAT32)
    if kernels.packing_unavailable(torch.float32):
        pytest.skip(kernels.packing_unavailable(torch.float32))
    g = torch.Generator().manual_seed(0)
    small, big = torch.randn(192, 64, generator=g), torch.randn(DEFAULT_PACK_MIN_FLOAT32 // 64, 64, generator=g)
    x = torch.randn(4, 64, generator=g)
    owner = torch.nn.Module()
    with torch.inference_mode():
        monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", "onednn")
        with kernels.packed_weights(owner, [small, big], "v0", rows=4):
            assert kernels.linear(x, small) is None and kernels.linear(x, big) is not None
        assert len(kernels._packs[owner].packed) == 1  # only the big one's copy is kept
        with kernels.packed_weights(owner, [small], None, rows=4):  # nothing worth packing
            assert kernels.linear(x, small) is None
        monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", "transposed")
        with kernels.packed_weights(owner, [small, big], "v0", rows=4):
            assert kernels.linear(x, small) is not None and kernels.linear(x, big) is not None
        assert len(kernels._packs[owner].packed) == 2
        half = small.bfloat16()
        if not kernels.packing_unavailable(torch.bfloat16):
            with kernels.packed_weights(owner, [half], None, rows=4):
                assert kernels.linear(x.bfloat16(), half) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_matches_float64(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-30, 30, 20001), torch.randn(5000, generator=g) * 3,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    x = x.to(dtype)
    xd = x.double()
    # x (1 + tanh u) / 2 = x sigmoid(2u): the same function, without 1 + tanh u cancelling to 0 in the left tail
    ref = xd * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3))
    torch.testing.assert_close(ref, torch.nn.functional.gelu(xd, approximate="tanh"), atol=1e-12, rtol=1e-12)
    y = x.clone()
    assert kernels.gelu_tanh_(y)
    # atol 1e-35: far in the left tail the kernel's exp saturates at e^88, leaving x / e^88 instead of 0
    if dtype == torch.float32:  # in the left tail u's rounding is amplified by e^2u: 1.2e-5 relative at x = -9
        torch.testing.assert_close(y.double(), ref, atol=1e-35, rtol=2e-5)
        # (PyTorch's own float32 tanh GELU is off by up to 2e6 ulps at x = -4: 1 + tanh u cancels)
        mid = x.abs() <= 1  # within 2 float32 ulps where nothing is amplified
        assert ((y.double() - ref).abs()[mid] <= 2 * 2**-23 * ref.abs()[mid] + 1e-38).all()
    else:  # within one bfloat16 rounding of the exact value
        assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-35).all()


def test_kernels_leave_autograd_and_other_layouts_to_pytorch():
    q, k, v, _ = _case(2, 2, 16, 5, torch.float32)
    assert kernels.decode_attention(q.clone().requires_grad_(), k, v, None) is None
    assert kernels.decode_attention(q.double(), k.double(), v.double(), None) is None
    assert kernels.decode_attention(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, None) is None
    assert kernels.decode_attention(q, k, v[:2], None) is None  # a shorter v with k's strides: not read past
    x = torch.randn(8, 4, requires_grad=True)
    h = x * 2
    assert not kernels.gelu_tanh_(h)
    assert not kernels.gelu_tanh_(torch.randn(8, 4).t())
    # a training forward through the model still backpropagates (the learner's path)
    m = build_model(ModelShape(16, 2, 2, 32, 32), seed=0)
    m(torch.randint(16, (2, 6))).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def _counted(fn, calls: list):
    """`fn`, recording the last positional argument of each call (a decode step's cache position)."""
    def counted(*args, **kwargs):
        calls.append(args[-1])
        return fn(*args, **kwargs)

    return counted


@pytest.mark.parametrize("layout,prefill_in_c,max_width", [("onednn", 32, 512), ("transposed", 32, 512),
                                                            ("transposed", 0, 512), ("transposed", 32, 32)])
def test_generate_with_and_without_kernels(layout, prefill_in_c, max_width, monkeypatch):
    """The same samples either way in float32, with either layout of the weights; with the transposed one, the
    decode step in C, and the (left-padded, repeated) prompts prefilled through it or, when longer than
    PREFILL_IN_C_MAX or the model (64 wide) is wider than PREFILL_IN_C_MAX_WIDTH, by the batched forward."""
    import distpg.generate as G

    monkeypatch.setattr(G, "PREFILL_IN_C_MAX", prefill_in_c)
    monkeypatch.setattr(G, "PREFILL_IN_C_MAX_WIDTH", max_width)
    monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", layout)
    m = build_model(ModelShape(16, 2, 4, 64, 64), seed=0)
    randomize_parameters(m, seed=1, scale=0.15)
    m = m.eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 16, (n,), generator=g).tolist() for n in (3, 7, 5, 7, 2, 6)] * 4
    params = SamplingParams(max_new_tokens=20, stop_token=0)
    out, in_c = {}, []
    monkeypatch.setattr(kernels.DecodeStep, "__call__", _counted(kernels.DecodeStep.__call__, in_c))
    for on in (True, False):
        kernels.enabled = on
        out[on] = generate(m, prompts, params, torch.Generator().manual_seed(0))
    # the transposed layout's steps: one C call each, and one per prompt position (7) of its prefill when in C
    assert (layout == "transposed") == any(pos >= 7 for pos in in_c)
    prefilled_in_c = layout == "transposed" and prefill_in_c and max_width >= 64
    assert sorted(pos for pos in in_c if pos < 7) == (list(range(7)) if prefilled_in_c else [])
    assert torch.equal(out[True].tokens, out[False].tokens)
    torch.testing.assert_close(out[True].logprobs, out[False].logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,tol,layout", [(torch.float32, 1e-5, "onednn"), (torch.float32, 1e-5, "transposed"),
                                              (torch.bfloat16, 0.15, None)])
def test_decode_logits_with_and_without_kernels(dtype, tol, layout, monkeypatch):
    """Every decode step's logits through the model's KV cache, the same tokens fed both ways (left-padded
    prompts, so the mask is used): the kernels change them by float rounding only."""
    monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", layout)
    m = build_model(ModelShape(16, 2, 4, 64, 64), seed=0)
    randomize_parameters(m, seed=1, scale=0.15)
    m = m.eval().to(dtype)
    g = torch.Generator().manual_seed(4)
    B, Tp, N = 6, 5, 12
    idx = torch.randint(1, 16, (B, Tp + N), generator=g)
    key_mask = torch.ones(B, Tp + N, dtype=torch.bool)
    key_mask[::2, :2] = False  # rows 0, 2, 4 left-padded by two
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    logits = {}
    with torch.inference_mode():
        for on in (True, False):
            kernels.enabled = on
            cache = m.new_cache(B, Tp + N)
            with kernels.packed_weights(m, decode_weights(m), None, B):  # as generate() does: laid-out products
                steps = [m(idx[:, :Tp], positions=positions[:, :Tp], key_mask=key_mask[:, :Tp], cache=cache)[:, -1]]
                for t in range(Tp, Tp + N - 1):
                    steps.append(m(idx[:, t : t + 1], positions=positions[:, t : t + 1],
                                   key_mask=key_mask[:, : t + 1], cache=cache, pos=t)[:, -1])
            logits[on] = torch.stack(steps).float()
    assert logits[True].abs().max() > 1  # logits with something to get wrong
    torch.testing.assert_close(logits[True], logits[False], atol=tol, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_in_c_matches_float64(padded, monkeypatch):
    """The float32 decode step in one C call (`kernels.DecodeStep`): every step's logits, and the key and value
    each layer writes into the cache, as the same step on a float64 copy of the model (PyTorch's ops), over
    left-padded rows and, after rows are dropped from the batch as the sampler drops stopped ones, on the
    rest (a smaller batch in the same work space)."""
    import copy

    from distpg.model import decode_layers, decode_step, output_layer

    monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", "transposed")
    m = build_model(ModelShape(16, 2, 4, 64, 64), seed=0)
    randomize_parameters(m, seed=1, scale=0.15)
    m = m.eval()
    m64 = copy.deepcopy(m).double()
    g = torch.Generator().manual_seed(4)
    B, Tp, N = 6, 5, 10
    idx = torch.randint(1, 16, (B, Tp + N), generator=g)
    key_mask = torch.ones(B, Tp + N, dtype=torch.bool)
    if padded:
        key_mask[::2, :2] = False
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    caches = {}
    with torch.inference_mode():
        for model in (m, m64):
            caches[model] = cache = model.new_cache(B, Tp + N)
            model(idx[:, :Tp], positions=positions[:, :Tp], key_mask=key_mask[:, :Tp], cache=cache)
        with kernels.packed_weights(m, decode_weights(m), None, B):
            in_c = kernels.decode_step_in_c(m.wte.weight, m.wpe.weight, decode_layers(m), (m.ln_f.weight, m.ln_f.bias),
                                            m.shape.layer_norm_epsilon, m.shape.n_head, B)
            assert in_c is not None
            rows = torch.arange(B)
            k32, v32, k64, v64 = caches[m].k, caches[m].v, caches[m64].k, caches[m64].v
            for t in range(Tp, Tp + N):
                if t == Tp + N // 2:  # drop rows 1 and 4, as the sampler does: the caches' rows gathered
                    keep = torch.tensor([0, 2, 3, 5])
                    rows, k32, v32, k64, v64 = rows[keep], k32[:, keep], v32[:, keep], k64[:, keep], v64[:, keep]
                mask = key_mask[rows, None, None, : t + 1] if padded else None
                args = (idx[rows, t], positions[rows, t], mask)
                got = output_layer(m, in_c(*args, k32, v32, t))
                ref = decode_step(m64, decode_layers(m64), *args, k64, v64, t)
                assert got.abs().max() > 1  # logits with something to get wrong
                torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(k32[..., t, :].double(), k64[..., t, :], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(v32[..., t, :].double(), v64[..., t, :], atol=1e-5, rtol=1e-5)


def test_decode_step_in_c_refuses_what_it_would_read_out_of_bounds(monkeypatch):
    """The C step trusts its shapes and ids: more rows than its work space, or a cache of another shape, is a
    ValueError; a prompt id outside the vocabulary is PyTorch's IndexError (the prefill in C is skipped)."""
    from distpg.model import decode_layers

    monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", "transposed")
    m = build_model(ModelShape(16, 2, 4, 64, 64), seed=0).eval()
    with torch.inference_mode(), kernels.packed_weights(m, decode_weights(m), None, 3):
        in_c = kernels.decode_step_in_c(m.wte.weight, m.wpe.weight, decode_layers(m), (m.ln_f.weight, m.ln_f.bias),
                                        1e-5, 4, 3)
        cache = m.new_cache(4, 8)
        tok = torch.zeros(4, dtype=torch.long)
        with pytest.raises(ValueError, match=r"DecodeStep: 4 rows \(at most 3\)"):
            in_c(tok, tok, None, cache.k, cache.v, 2)
        with pytest.raises(ValueError, match=r"wanted \(2, 3, 4, >= 9, 16\)"):
            in_c(tok[:3], tok[:3], None, cache.k[:, :3], cache.v[:, :3], 8)
    with pytest.raises(IndexError):
        generate(m, [[1, 2, 16]], SamplingParams(max_new_tokens=2), torch.Generator().manual_seed(0))


def test_decode_step_stays_in_pytorch_without_an_sgemm(monkeypatch):
    """Where PyTorch exports no usable sgemm, or the layout is oneDNN's, the sampler keeps `decode_step`'s ops."""
    from distpg.model import decode_layers

    m = build_model(ModelShape(16, 2, 4, 64, 64), seed=0).eval()
    args = (m.wte.weight, m.wpe.weight, decode_layers(m), (m.ln_f.weight, m.ln_f.bias), 1e-5, 4, 3)
    for layout, sgemm in (("transposed", None), ("onednn", kernels.torch_sgemm())):
        monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", layout)
        monkeypatch.setattr(kernels, "_sgemm", [sgemm])
        with torch.inference_mode(), kernels.packed_weights(m, decode_weights(m), None, 3):
            assert kernels.decode_step_in_c(*args) is None
    if platform.machine() in ("x86_64", "AMD64"):
        assert kernels.torch_sgemm() is not None  # PyTorch's x86 wheels export MKL's


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "onednn"), (torch.float32, "transposed"),
                                          (torch.bfloat16, None)])
def test_packed_linear_matches_float64(dtype, layout, monkeypatch):
    """The product on a pre-packed weight (oneDNN's layout, or float32's transposed copy for the BLAS) against
    float64, within float rounding of the inputs' sum of |products|: a decode step's rows, a prefill's (more
    rows than the layout was chosen for), a strided row slice (the output layer's input), no bias (the tied
    output layer), and the GELU (fused into oneDNN's product, after the BLAS's)."""
    if kernels.packing_unavailable(dtype):
        pytest.skip(kernels.packing_unavailable(dtype))
    monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", layout)
    laid_out = kernels._pack_all([torch.zeros(4, 3, dtype=dtype)], 8)[0][0]
    assert laid_out.is_mkldnn == (layout != "transposed") and laid_out.dtype == dtype
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(96, 40, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    head = torch.randn(50, 40, generator=g).to(dtype)
    eps = 2**-23 if dtype == torch.float32 else 2**-8  # the output's rounding
    with torch.inference_mode(), kernels.packed_weights(torch.nn.Module(), [w, head], None, rows=8):
        for x in (torch.randn(8, 1, 40, generator=g), torch.randn(3, 11, 40, generator=g),
                  torch.randn(5, 4, 40, generator=g)[:, -1]):
            x = x.to(dtype)
            for weight, bias in ((w, b), (head, None)):
                ref = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
                size = x.double().abs() @ weight.double().abs().t() + (0 if bias is None else bias.double().abs())
                bound = 1e-6 * size + eps * ref.abs()  # float32 accumulation, then the output's rounding
                got = kernels.linear(x, weight, bias)
                assert got.dtype == dtype and got.shape == ref.shape
                assert ((got.double() - ref).abs() <= bound).all()
            got = kernels.linear(x, w, b, gelu=True)
            pre = torch.nn.functional.linear(x.double(), w.double(), b.double())
            size = x.double().abs() @ w.double().abs().t() + b.double().abs()
            ref = torch.nn.functional.gelu(pre, approximate="tanh")
            # GELU's slope is at most 1.13: the product's rounding carried through, plus the GELU's own
            assert ((got.double() - ref).abs() <= 1.13 * 1e-6 * size + eps * 4 * ref.abs() + 1e-6).all()
        # only the weights it packed, only in their dtype, never under autograd
        assert kernels.linear(x, torch.randn(96, 40).to(dtype), b) is None
        assert kernels.linear(x.double(), w, b) is None
    assert kernels.linear(x, w, b) is None  # outside the block
    with kernels.packed_weights(torch.nn.Module(), [w], None, rows=8):
        assert kernels.linear(torch.randn(2, 40).to(dtype).requires_grad_(), w, b) is None
    # a block entered without autograd, then a product with it on, where the weight needs a gradient
    wp = torch.nn.Parameter(w.clone())
    x = torch.randn(2, 40).to(dtype)
    with torch.no_grad(), kernels.packed_weights(torch.nn.Module(), [wp], None, rows=8):
        assert kernels.linear(x, wp, b) is not None
        with torch.enable_grad():
            assert kernels.linear(x, wp, b) is None


@pytest.mark.parametrize("built", [True, False])
def test_transposed_copies_are_exact_and_aligned(built, monkeypatch):
    """The transposed layout's copies, by the C library's tiled transpose and by PyTorch's copy where it is not
    built: each exactly its weight transposed (shapes off the 32-wide tiles), each on its own 64-byte line in
    one shared buffer, the bfloat16 one left to oneDNN; a spare buffer is written into when it is large enough."""
    monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", "transposed")
    if not built:
        monkeypatch.setattr(kernels, "load", lambda: None)
    elif kernels.load() is None:
        pytest.skip(kernels.status())
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(r, c, generator=g) for r, c in ((1, 1), (33, 65), (100, 37), (2304, 768), (5, 3))]
    ws.append(torch.randn(6, 4, generator=g).to(torch.bfloat16))
    ws[-2] = ws[-2].t()  # a non-contiguous weight is read as its values
    if kernels.packing_unavailable(torch.bfloat16):
        ws.pop()
    packed, buffer = kernels._pack_all(ws, 8)
    for w, p in zip(ws, packed):
        if w.dtype == torch.bfloat16:
            assert p.is_mkldnn
            continue
        assert p.is_contiguous() and torch.equal(p, w.t()) and p.data_ptr() % 64 == 0
    assert {p.untyped_storage().data_ptr() for p in packed if not p.is_mkldnn} == {buffer.data_ptr()}  # one buffer
    again, reused = kernels._pack_all(ws, 8, spare=buffer)  # into a spare buffer that is large enough
    assert reused is buffer and all(torch.equal(a, p) for a, p in zip(again, packed) if not p.is_mkldnn)
    assert kernels._pack_all(ws, 8, spare=buffer[:100])[1] is not buffer  # a smaller one is not written past


def test_packed_weights_are_kept_per_key_and_repacked_when_it_changes():
    """The layout is made once per key: reused for the same key and weight memory, made again for another
    key (weights overwritten in place, as a copying load does) or another tensor (zero-copy load); with
    key None it is never kept."""
    m = build_model(ModelShape(16, 2, 2, 32, 32), seed=0).eval()
    ws = decode_weights(m)
    assert len(ws) == 2 * 4 + 1 and ws[-1] is m.wte.weight  # four linear layers per block, the output layer
    prompts, params = [[1, 2, 3]] * 4, SamplingParams(max_new_tokens=6)

    def sample(key):
        return generate(m, prompts, params, torch.Generator().manual_seed(0), weights_key=key).tokens

    first = sample(1)
    kept = kernels._packs[m].packed
    assert torch.equal(sample(1), first) and kernels._packs[m].packed is kept
    with torch.no_grad():  # new values in the same memory, under a new key
        m.wte.weight.mul_(-3.0)
    second = sample(2)
    assert kernels._packs[m].packed is not kept
    kernels.enabled = False
    assert torch.equal(sample(2), second)  # the same as PyTorch's products on the new weights
    kernels.enabled = True
    kept = kernels._packs[m].packed
    m.wte.weight.data = m.wte.weight.data.clone()  # the same key, new memory: laid out again
    assert torch.equal(sample(2), second) and kernels._packs[m].packed is not kept
    sample(None)
    assert m not in kernels._packs


def test_a_new_versions_copies_reuse_the_old_memory_unless_it_is_in_use(monkeypatch):
    """With the transposed layout, the next key's copies go into the previous key's memory (or the memory
    `release(keep_memory=True)` kept), with the new values; never into copies a block is still multiplying by."""
    monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", "transposed")
    m = build_model(ModelShape(16, 2, 2, 32, 32), seed=0).eval().requires_grad_(False)
    ws = decode_weights(m)

    def laid_out(key):
        with kernels.packed_weights(m, ws, key, rows=4):
            packs = kernels.active_packs()
            assert all(torch.equal(packs[id(w)], w.t()) for w in ws)  # the current values
            return kernels._packs[m].buffer

    first = laid_out(1)
    m.wte.weight.mul_(-3.0)
    assert laid_out(2) is first  # reused
    kernels.release(m, keep_memory=True)
    assert kernels._packs[m].packed == [] and laid_out(3) is first
    with kernels.packed_weights(m, ws, 4, rows=4):  # in use: another key's copies go elsewhere
        outer = {k: v.clone() for k, v in kernels.active_packs().items()}
        m.wte.weight.mul_(-1.0)
        assert laid_out(5) is not first
        assert all(torch.equal(outer[k], v) for k, v in kernels.active_packs().items())  # left as they were
    kernels.release(m)
    assert m not in kernels._packs


def test_without_onednn_the_products_fall_back_with_a_warning(caplog, monkeypatch):
    assert kernels._check_packing(torch.float64) == "torch.float64 is not float32 or bfloat16"
    monkeypatch.setattr(kernels, "_PACK_OK", {})
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    m = build_model(ModelShape(16, 2, 2, 32, 32), seed=0).eval()
    out = generate(m, [[1, 2, 3]] * 4, SamplingParams(max_new_tokens=4), torch.Generator().manual_seed(0))
    assert bool(out.mask.all()) and m not in kernels._packs
    assert "matmuls: PyTorch (this PyTorch has no oneDNN (mkldnn))" in kernels.status()
    assert "pre-packed torch.float32 matrix products unavailable" in caplog.text


def _probe(env: dict, source: Path | None = None) -> dict:
    """kernels.status() and a sample in a fresh interpreter with `env` (and optionally another source)."""
    code = (
        "import json, logging, sys, torch\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from pathlib import Path\n"
        "from distpg import kernels\n"
        + (f"kernels.SOURCE = Path({str(source)!r})\n" if source else "")
        + "from distpg.generate import SamplingParams, generate\n"
        "from distpg.model import ModelShape, build_model\n"
        "m = build_model(ModelShape(16, 2, 2, 32, 32), seed=0).eval()\n"
        "out = generate(m, [[1, 2, 3]] * 4, SamplingParams(max_new_tokens=5), torch.Generator().manual_seed(0))\n"
        "print(json.dumps({'status': kernels.status(), 'tokens': out.tokens.tolist()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"stderr": done.stderr}


def test_no_compiler_falls_back_then_a_fresh_build_is_reused(tmp_path):
    """One cache folder, a fresh interpreter for each probe: with no compiler on PATH sampling falls back to
    PyTorch with a warning and makes no cache; with one, the library is built into the fresh cache (0700) and
    samples the same tokens; a second interpreter reuses it untouched."""
    bindir = tmp_path / "bin"  # a PATH holding only this Python
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = {"DISTPG_CACHE_DIR": str(tmp_path)}
    off = _probe({**env, "CC": "", "PATH": str(bindir)})
    assert off["status"].startswith("off: no C compiler"), off["status"]
    assert "CPU decode kernels unavailable" in off["stderr"]
    assert not (tmp_path / "kernels").exists()

    first = _probe(env)
    built = list((tmp_path / "kernels").glob("decode-*.so"))
    assert first["status"].startswith("C (") and len(built) == 1 and str(built[0]) in first["status"]
    assert first["tokens"] == off["tokens"]
    stamp = built[0].stat().st_mtime_ns
    second = _probe(env)
    assert second["status"] == first["status"] and second["tokens"] == first["tokens"]
    assert sorted((tmp_path / "kernels").glob("*")) == sorted([*built, tmp_path / "kernels" / "build.lock"])
    assert built[0].stat().st_mtime_ns == stamp
    assert (tmp_path / "kernels").stat().st_mode & 0o777 == 0o700


@pytest.mark.slow  # ~6 s (15 s on a 2-core AMD EPYC): three builds; the test above builds one by default
def test_a_truncated_cached_library_is_rebuilt_and_a_build_that_attends_wrongly_refused(tmp_path):
    """A cached library left truncated (as a crash or a full disk could leave it) is rebuilt; a build that
    compiles but attends wrongly is refused by the self-check, and sampling falls back to the same tokens."""
    env = {"DISTPG_CACHE_DIR": str(tmp_path)}
    first = _probe(env)
    built = list((tmp_path / "kernels").glob("decode-*.so"))
    assert first["status"].startswith("C (") and len(built) == 1
    built[0].write_bytes(b"")  # as a crash or a full disk could leave it
    rebuilt = _probe(env)
    assert rebuilt["status"] == first["status"] and built[0].stat().st_size > 0
    assert rebuilt["tokens"] == first["tokens"]

    bad = tmp_path / "decode.c"
    text = kernels.SOURCE.read_text()
    marker = "h * qh + d]) * scale"  # where q is scaled by 1/sqrt(D)
    assert text.count(marker) == 1
    bad.write_text(text.replace(marker, marker + " * 2.0f"))  # compiles, but attends wrongly
    res = _probe(env, source=bad)
    assert res["status"].startswith("off: ") and "disagrees with PyTorch" in res["status"]
    assert "CPU decode kernels unavailable" in res["stderr"]
    assert res["tokens"] == first["tokens"]


def test_rollout_config_switch(tmp_path):
    from distpg.rollout import RolloutWorker
    from tests.conftest import small_config

    RolloutWorker(small_config("rollout.cpu_kernels=false"), 0)
    assert not kernels.enabled and kernels.status().startswith("disabled")
    RolloutWorker(small_config(), 0)
    assert kernels.enabled and kernels.status().startswith("C (")


def test_a_cache_folder_others_can_write_is_not_used(tmp_path):
    shared = tmp_path / "kernels"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    (tmp_path / "tmp").mkdir()
    res = _probe({"DISTPG_CACHE_DIR": str(tmp_path), "TMPDIR": str(tmp_path / "tmp")})
    assert res["status"].startswith(f"C ({tmp_path / 'tmp'}/distpg-kernels-"), res["status"]
    assert not list(shared.glob("*.so"))  # built in the private fallback folder instead


def test_a_compiler_error_is_remembered(tmp_path):
    bad = tmp_path / "decode.c"
    bad.write_text(kernels.SOURCE.read_text() + "\nthis is not C;\n")
    env = {"DISTPG_CACHE_DIR": str(tmp_path)}
    first = _probe(env, source=bad)
    assert first["status"].startswith("off: ") and "error" in first["status"], first["status"]
    failed = list((tmp_path / "kernels").glob("decode-*.failed"))
    assert failed and "this is not C" in failed[0].read_text()
    second = _probe(env, source=bad)  # not compiled again: the marker says why, and how to retry
    assert "failed before, see" in second["status"] and not list((tmp_path / "kernels").glob("*.so"))


def test_workers_starting_together_build_once(tmp_path):
    """Four processes on an empty cache at once, as a node's rollout workers start: one compiles, the others
    wait on the lock and load its file."""
    code = "from distpg import kernels; print(kernels.status())"
    log = tmp_path / "compiles.log"
    cc = tmp_path / "cc"  # the real compiler, counting its compilations
    cc.write_text(f'#!/bin/sh\ncase "$*" in *--version*) ;; *) echo 1 >> {log} ;; esac\n'
                  f'exec {kernels.compiler()} "$@"\n')
    cc.chmod(0o755)
    env = {**os.environ, "DISTPG_CACHE_DIR": str(tmp_path), "CC": str(cc)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    statuses = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    built = list((tmp_path / "kernels").glob("decode-*.so"))
    assert len(built) == 1 and {s.split(";")[0] for s in statuses} == {f"C ({built[0]})"}, statuses
    assert log.read_text().count("1") == 1  # compiled once
    assert not list((tmp_path / "kernels").glob("tmp*"))  # no half-written file left behind


@pytest.mark.parametrize("cpu,layout", [("vendor_id\t: GenuineIntel", "transposed"),
                                        ("vendor_id\t: AuthenticAMD", "onednn"), ("aarch64 ", "onednn")])
def test_float32_weights_are_laid_out_by_the_cpus_vendor_unless_set(cpu, layout, monkeypatch):
    monkeypatch.setattr(kernels, "_cpu_identity", lambda: cpu)
    monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", None)
    kernels._intel.cache_clear()
    try:
        assert kernels.float32_layout() == layout
        assert kernels._pack_all([torch.zeros(4, 3)], 8)[0][0].is_mkldnn == (layout == "onednn")
        if not kernels.packing_unavailable(torch.bfloat16):  # bfloat16: oneDNN always
            assert kernels._pack_all([torch.zeros(4, 3, dtype=torch.bfloat16)], 8)[0][0].is_mkldnn
        if not kernels.packing_unavailable(torch.float32):  # what `distpg doctor` says of the decode step
            assert ("the float32 decode step in one C call" in kernels.status()) == (layout == "transposed")
            monkeypatch.setattr(kernels, "_sgemm", [None])
            assert ("no sgemm found" in kernels.status()) == (layout == "transposed")
        monkeypatch.setattr(kernels, "FLOAT32_LAYOUT", "onednn")
        assert kernels.float32_layout() == "onednn"
    finally:
        kernels._intel.cache_clear()
