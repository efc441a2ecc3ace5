"""The sampler in `distpg.generate`: seeding, top-k/top-p filters (by hand and end to end), behaviour
log-probabilities against a full no-cache forward, stop tokens, sampling frequencies, greedy decoding and
`Generation.rows()`.

Every reference here is recomputed independently: a plain full forward of prompt + completion, one
prompt at a time, without KV cache or padding, and the filters re-derived in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from distpg.generate import Generation, SamplingParams, generate, sample_token, sampling_logprobs
from distpg.model import GPT, ModelShape, build_model
from tests.conftest import randomize_parameters

SHAPE = ModelShape(vocab_size=16, n_layer=2, n_head=2, n_embd=32, n_positions=64)
NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def model() -> GPT:
    m = build_model(SHAPE, seed=0)
    randomize_parameters(m, seed=1, scale=0.15)
    return m.eval()


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(SHAPE.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _completion_logits(model: GPT, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Full forward (no cache, no padding) of prompt + completion: the logits that predicted each
    completion token, (len(completion), V)."""
    seq = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(seq)[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)]


def _first_token_probs(model: GPT, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([prompt]))[0, -1].double(), -1)


# ---------------------------------------------------------------- seeding


def test_same_seed_same_samples_different_seed_different(model):
    prompts = _prompts([3, 5, 1, 4], seed=0) * 4  # 16 rows
    params = SamplingParams(max_new_tokens=12)
    p0 = _first_token_probs(model, prompts[0])
    assert p0.max() < 0.5  # enough randomness that two seeds cannot agree by chance

    def run(seed: int, global_seed: int) -> Generation:
        torch.manual_seed(global_seed)  # the global RNG must play no part
        return generate(model, prompts, params, torch.Generator().manual_seed(seed))

    a, b, c = run(seed=1, global_seed=0), run(seed=1, global_seed=99), run(seed=2, global_seed=0)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    # rows with the same prompt draw independently
    assert not torch.equal(a.tokens[0], a.tokens[4])


# ---------------------------------------------------------------- filters, by hand


def test_sampling_logprobs_top_k_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0], [0.0, -2.0, 5.0, 4.0, 4.5]])
    got = sampling_logprobs(logits, SamplingParams(max_new_tokens=1, top_k=2))
    # row 0 keeps logits 3 and 2: log p = -log(1 + e^-1) and -1 - log(1 + e^-1)
    # row 1 keeps logits 5 and 4.5: log p = -log(1 + e^-0.5) and -0.5 - log(1 + e^-0.5)
    a, b = math.log1p(math.exp(-1)), math.log1p(math.exp(-0.5))
    expected = torch.tensor([[NEG_INF, -a, -1 - a, NEG_INF, NEG_INF], [NEG_INF, NEG_INF, -b, NEG_INF, -0.5 - b]])
    torch.testing.assert_close(got, expected)
    assert got.dtype == torch.float32


P5 = [0.15, 0.5, 0.05, 0.2, 0.1]  # a shuffled distribution: sorted 0.5, 0.2, 0.15, 0.1, 0.05


@pytest.mark.parametrize(
    "top_p,temperature,expected_p",
    [
        # mass before each token in sorted order: 0, 0.5, 0.7, 0.85, 0.95; keep while it is < top_p
        (0.45, 1.0, [0, 1, 0, 0, 0]),  # only the first token (always kept)
        (0.6, 1.0, [0, 5 / 7, 0, 2 / 7, 0]),  # 0.5 + 0.2
        (0.75, 1.0, [0.15 / 0.85, 0.5 / 0.85, 0, 0.2 / 0.85, 0]),  # 0.5 + 0.2 + 0.15
        (0.99, 1.0, P5),  # the last token's preceding mass 0.95 < 0.99: all kept
        # temperature first: T = 0.5 squares the probabilities -> .25, .04, .0225, .01, .0025 (sum .325),
        # i.e. .769, .123, .069, ...; with top_p 0.8 the mass before the third is .892, so two are kept
        # (at T = 1 the same top_p would keep three)
        (0.8, 0.5, [0, 0.25 / 0.29, 0, 0.04 / 0.29, 0]),
    ],
)
def test_sampling_logprobs_top_p_by_hand(top_p, temperature, expected_p):
    logits = torch.tensor([P5]).log() + 3.0  # a shift changes nothing
    got = sampling_logprobs(logits, SamplingParams(max_new_tokens=1, temperature=temperature, top_p=top_p))
    expected = torch.tensor([expected_p]).log()
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got.exp(), expected.exp())


def test_sampling_logprobs_top_k_then_top_p_by_hand():
    # top_k 3 keeps .5, .2, .15 -> renormalised .588, .235, .176; top_p 0.8: mass before the third is
    # .824 >= .8, so it is dropped: .5 and .2 remain
    logits = torch.tensor([P5]).log()
    got = sampling_logprobs(logits, SamplingParams(max_new_tokens=1, top_k=3, top_p=0.8))
    torch.testing.assert_close(got.exp(), torch.tensor([[0, 5 / 7, 0, 2 / 7, 0]]))


def test_sampling_logprobs_temperature_zero_is_one_hot_on_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 2.0, 2.5]])
    got = sampling_logprobs(logits, SamplingParams(max_new_tokens=1, temperature=0.0))
    expected = torch.tensor([[NEG_INF, 0.0, NEG_INF], [0.0, NEG_INF, NEG_INF]])
    assert torch.equal(got, expected)


def test_sample_token_never_picks_excluded_tokens():
    logp = torch.tensor([[NEG_INF, -0.1, NEG_INF, -2.4], [0.0, NEG_INF, NEG_INF, NEG_INF]]).expand(5000, 2, 4)
    tok = sample_token(logp.reshape(10000, 4), torch.Generator().manual_seed(0)).view(5000, 2)
    assert set(tok[:, 0].tolist()) == {1, 3}
    assert set(tok[:, 1].tolist()) == {0}


# ---------------------------------------------------------------- filters, end to end


def _allowed(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Bool (..., V): the tokens a top-k/top-p sampler may pick, recomputed in float64.

    In descending order of probability: the first top_k tokens, renormalised; of those, each token whose
    higher-ranked tokens hold less than top_p of that mass.
    """
    probs = torch.softmax(logits.double() / temperature, -1)
    p, order = probs.sort(-1, descending=True)
    if top_k:
        p[..., top_k:] = 0.0
        p = p / p.sum(-1, keepdim=True)
    mass_before = torch.cat([torch.zeros_like(p[..., :1]), p.cumsum(-1)[..., :-1]], -1)
    keep = (p > 0) & (mass_before < top_p)
    return torch.zeros_like(keep).scatter(-1, order, keep)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 3, 1.0), (1.0, 0, 0.6), (0.7, 5, 0.8)],
)
def test_samples_stay_inside_top_k_and_top_p(model, temperature, top_k, top_p):
    prompts = _prompts([2, 6], seed=1)
    R, N = 500, 4  # rows per prompt
    params = SamplingParams(max_new_tokens=N, temperature=temperature, top_k=top_k, top_p=top_p)
    # both prompts in one batch: the short one is left-padded
    gen = generate(model, [p for p in prompts for _ in range(R)], params, torch.Generator().manual_seed(0))
    assert gen.mask.all()

    for j, prompt in enumerate(prompts):
        completions = gen.tokens[j * R : (j + 1) * R]  # (R, N)
        with torch.no_grad():  # full forward, no cache, no padding
            logits = model(torch.cat([torch.tensor([prompt]).expand(R, -1), completions], 1))
        allowed = _allowed(logits[:, len(prompt) - 1 : -1], temperature, top_k, top_p)  # (R, N, V)
        assert allowed.gather(-1, completions[..., None]).all()
        # the filter matters: without it the first token would fall outside the allowed set often
        probs = torch.softmax(logits[0, len(prompt) - 1].double() / temperature, -1)
        assert probs[~allowed[0, 0]].sum() > 0.1
        assert len({tuple(r) for r in completions.tolist()}) >= 10  # many distinct completions checked


# ---------------------------------------------------------------- behaviour log-probabilities


@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.6)])
def test_logprobs_match_full_forward(model, temperature, top_k, top_p, cuda_graph):
    """Both log-probabilities of every sampled token against a full forward of the completion: log μ under
    the filtered distribution sampled from, log π under softmax(logits / T) (the tensor log μ itself when
    nothing filters), in both decode loops (the fixed-shape one runs step by step on a CPU)."""
    prompts = _prompts([1, 4, 7, 2, 5, 3], seed=2) * 3
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, stop_token=3)
    gen = generate(model, prompts, params, torch.Generator().manual_seed(4), cuda_graph=cuda_graph)
    assert not gen.mask.all() and gen.mask.any(1).all()  # some rows stopped early
    assert (gen.policy_logprobs is gen.logprobs) == (top_k == 0 and top_p == 1.0)

    for i, (prompt, row) in enumerate(zip(prompts, gen.rows())):
        logits = _completion_logits(model, prompt, row) / temperature
        tokens = torch.tensor(row)[:, None]
        policy = torch.log_softmax(logits, -1).gather(-1, tokens).squeeze(-1)
        allowed = _allowed(logits, 1.0, top_k, top_p)  # (n, V) the tokens the filter keeps
        expected = torch.log_softmax(logits.masked_fill(~allowed, NEG_INF), -1).gather(-1, tokens).squeeze(-1)
        n = len(row)
        torch.testing.assert_close(gen.logprobs[i, :n], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(gen.policy_logprobs[i, :n], policy, atol=1e-5, rtol=0)
        assert (gen.logprobs[i, n:] == 0).all() and (gen.policy_logprobs[i, n:] == 0).all()
        if top_k or top_p < 1.0:  # π = μ·Z on a kept token: Z < 1 wherever the filter dropped a token
            kept_mass = torch.softmax(logits, -1).masked_fill(~allowed, 0.0).sum(-1)
            torch.testing.assert_close(gen.policy_logprobs[i, :n] - gen.logprobs[i, :n], kept_mass.log(),
                                       atol=1e-5, rtol=0)
    assert gen.logprobs.dtype == gen.policy_logprobs.dtype == torch.float32


# ---------------------------------------------------------------- stop token


@pytest.mark.parametrize("stop", [5, (5, 9)])  # one stop token, or several (each ends a row)
def test_rows_stop_at_stop_token(model, stop):
    prompts = _prompts([3, 1, 6, 2], seed=3) * 8
    N, pad = 8, 13
    stops = {stop} if isinstance(stop, int) else set(stop)
    params = SamplingParams(max_new_tokens=N, stop_token=stop)
    gen = generate(model, prompts, params, torch.Generator().manual_seed(1), pad)
    assert gen.tokens.shape == gen.mask.shape == gen.logprobs.shape == (len(prompts), N)

    stopped, ended_by = 0, set()
    for i in range(len(prompts)):
        toks = gen.tokens[i].tolist()
        if stops & set(toks):
            s = min(toks.index(x) for x in stops if x in toks)
            stopped += 1
            ended_by.add(toks[s])
            assert gen.mask[i, : s + 1].all() and not gen.mask[i, s + 1 :].any()
            assert all(t == pad for t in toks[s + 1 :])
            assert not gen.truncated[i]
        else:
            assert gen.mask[i].all()
            assert gen.truncated[i]
    # both kinds of rows occur, and some stop before the last column; with two stop tokens, at each
    assert 0 < stopped < len(prompts) and ended_by == stops
    assert (gen.mask.sum(1) < N - 1).any()

    # the stop token only ends rows: the same seed without it samples the same tokens up to the stop
    free = generate(model, prompts, SamplingParams(max_new_tokens=N), torch.Generator().manual_seed(1), pad)
    assert torch.equal(free.tokens[gen.mask], gen.tokens[gen.mask])
    assert free.mask.all() and free.truncated.all()  # without a stop token every row is truncated


def test_all_rows_stopping_early_still_returns_full_width(model):
    prompts = _prompts([3, 5], seed=4)
    greedy = SamplingParams(max_new_tokens=1, temperature=0.0)
    # the stop token is each prompt's greedy first token, so every row stops at column 0
    for prompt in prompts:
        first = generate(model, [prompt], greedy, torch.Generator()).rows()[0][0]
        params = SamplingParams(max_new_tokens=9, temperature=0.0, stop_token=first)
        gen = generate(model, [prompt] * 3, params, torch.Generator(), pad_id=15, check_every=2)
        assert gen.tokens.shape == (3, 9)
        assert gen.mask[:, 0].all() and not gen.mask[:, 1:].any()
        assert (gen.tokens[:, 0] == first).all() and (gen.tokens[:, 1:] == 15).all()
        assert not gen.truncated.any()


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("stop_token", [None, 5])
def test_rows_a_stop_check_ends_are_decoded_no_further(model, monkeypatch, decoded_rows, shards, stop_token):
    """`stop_when` (stop strings, checked every `check_every` tokens): a row it says has ended is decoded no
    further and dropped with the stopped ones, so a generation decodes fewer rows; up to its end every row
    holds the full generation's tokens and log-probabilities, and a row is cut no earlier than that end."""
    import distpg.generate as G

    monkeypatch.setattr(G, "SHARDS", shards)
    prompts, N, every = _prompts([3, 5, 2, 4], seed=3) * 6, 24, 2
    params = SamplingParams(max_new_tokens=N, stop_token=stop_token)
    seen = []

    def ended(rows):  # the "stop string": token 3 (as a decoded text holding one)
        seen.extend(len(r) for r in rows)
        return [3 in r for r in rows]

    decoded = decoded_rows
    got = generate(model, prompts, params, torch.Generator().manual_seed(2), check_every=every, stop_when=ended)
    rows_decoded, decoded[:] = sum(decoded), []
    full = generate(model, prompts, params, torch.Generator().manual_seed(2), check_every=every)
    assert rows_decoded < sum(decoded) and set(seen) <= set(range(every, N, every))  # checked every 2 tokens
    ends = 0
    for i, (g, f) in enumerate(zip(got.rows(), full.rows())):
        end = f.index(3) + 1 if 3 in f else len(f)  # where a stop string would cut the full row
        checked = -(-end // every) * every  # the first check after it: the row ends there, if before the last token
        ended = 3 in f and checked < N
        assert g == (f[:checked] if ended else f)
        torch.testing.assert_close(got.logprobs[i, : len(g)], full.logprobs[i, : len(g)], atol=1e-5, rtol=0)
        assert not got.mask[i, len(g):].any()
        assert bool(got.truncated[i]) == (bool(full.truncated[i]) and not ended)  # the caller's cut does the rest
        ends += ended and len(g) < len(f)
    assert ends > 0


def test_stop_checks_thin_out_on_long_rows():
    """A stop check decodes every live row whole: every 4 tokens up to 32, then about 8 per doubling of the length,
    so that the decoding grows linearly with the rows' length, each row checked at most ~n/8 tokens late."""
    from distpg.generate import stop_check_due

    due = [n for n in range(1, 1025) if stop_check_due(n, 4)]
    assert due[:8] == list(range(4, 33, 4)) and all(n % 4 == 0 for n in due)
    assert all(b - a <= max(4, a // 8 + 4) for a, b in zip(due, due[1:]))  # never more than ~n/8 late
    assert len(due) < 70 and sum(due) < 20 * 1024  # every 4 tokens: 256 checks, decoding 131,584 tokens a row


# ---------------------------------------------------------------- sampling frequencies


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_token_frequencies_match_softmax(model, temperature):
    prompt = _prompts([4], seed=5)[0]
    n = 20_000
    params = SamplingParams(max_new_tokens=1, temperature=temperature)
    gen = generate(model, [prompt] * n, params, torch.Generator().manual_seed(7))
    counts = torch.bincount(gen.tokens[:, 0], minlength=SHAPE.vocab_size).double()
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1].double()
    expected = n * torch.softmax(logits / temperature, -1)
    assert expected.min() >= 5  # every cell is large enough for the chi-square approximation
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # 15 degrees of freedom: mean 15, P(chi2 > 60) < 1e-6 (Wilson-Hilferty). Seeds are fixed, so this is
    # deterministic; the bound only says the fixed draw is not a lucky one.
    assert chi2 < 60, (chi2, counts.tolist(), expected.tolist())
    # the same counts are far from the distribution at another temperature: the test can tell them apart
    other = n * torch.softmax(logits / (temperature * 1.3), -1)
    assert ((counts - other) ** 2 / other).sum().item() > 200


# ---------------------------------------------------------------- greedy


def test_temperature_zero_is_greedy(model):
    prompts = _prompts([1, 5, 8, 3], seed=6)
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    gen = generate(model, prompts, greedy, torch.Generator().manual_seed(0))
    for prompt, row in zip(prompts, gen.rows()):
        assert len(row) == 10
        assert _completion_logits(model, prompt, row).argmax(-1).tolist() == row
    assert (gen.logprobs == 0).all()  # all mass on the argmax
    # a different generator changes nothing
    again = generate(model, prompts, greedy, torch.Generator().manual_seed(9))
    assert torch.equal(again.tokens, gen.tokens)


@pytest.mark.parametrize("vocab_size", [16, 1000])  # one-level and two-level inverse-CDF search
@pytest.mark.parametrize("params, cuda_graph", [
    (SamplingParams(max_new_tokens=6, stop_token=1), False),
    (SamplingParams(max_new_tokens=6, temperature=0.0), False),
    (SamplingParams(max_new_tokens=6, top_k=3, top_p=0.9), False),
    (SamplingParams(max_new_tokens=6, stop_token=1), True),
])
def test_a_diverged_policy_is_named_not_an_index_error(vocab_size, params, cuda_graph):
    # weights that give NaN logits (as a learning rate far too high leaves them): NaN probabilities made the
    # inverse-CDF search return index V, and the run died on "index V is out of bounds for dimension 1"
    m = build_model(ModelShape(vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16, n_positions=32), seed=0)
    with torch.no_grad():
        m.ln_f.weight.fill_(float("inf"))  # inf * 0 and inf - inf in the logits
    with pytest.raises(FloatingPointError, match=r"next-token probabilities are not finite .* learner.lr"):
        generate(m, [[2, 3], [4]], params, torch.Generator().manual_seed(0), cuda_graph=cuda_graph)


# ---------------------------------------------------------------- Generation.rows and inputs


def test_rows_by_hand():
    gen = Generation(
        tokens=torch.tensor([[5, 2, 0, 0], [1, 1, 1, 1], [2, 0, 0, 0]]),
        logprobs=torch.zeros(3, 4),
        mask=torch.tensor([[True, True, False, False], [True] * 4, [True, False, False, False]]),
        truncated=torch.tensor([False, True, False]),
    )
    assert gen.rows() == [[5, 2], [1, 1, 1, 1], [2]]


def test_rows_end_at_the_stop_token(model):
    prompts = _prompts([2, 4, 3], seed=7) * 6
    stop = 5
    gen = generate(model, prompts, SamplingParams(max_new_tokens=8, stop_token=stop), torch.Generator().manual_seed(2))
    rows = gen.rows()
    assert any(r[-1] == stop for r in rows) and any(stop not in r for r in rows)
    for row, toks, truncated in zip(rows, gen.tokens.tolist(), gen.truncated.tolist()):
        if truncated:
            assert row == toks and stop not in row
        else:
            assert row == toks[: toks.index(stop) + 1]


def test_generate_rejects_empty_prompt(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], SamplingParams(max_new_tokens=2), torch.Generator())


# ---------------------------------------------------------------- fixed-shape decode (CUDA graphs)


@pytest.mark.parametrize("cpu_kernels", [True, False])
@pytest.mark.parametrize("stop_token", [None, 3, (3, 8)])
def test_fixed_shape_decode_samples_what_the_default_loop_samples(model, cpu_kernels, stop_token, monkeypatch):
    """`generate(..., cuda_graph=True)`: every step in the same shapes (attention over the whole zero-filled
    cache under a mask, the token index in a tensor the step advances, no rows dropped), the step a GPU
    captures once and replays. On the CPU the same steps run one by one: the same tokens, masks and
    truncation as the default loop, log-probabilities equal up to float rounding, with left-padded prompts
    and rows stopping at different steps (the default loop drops them; this one does not)."""
    from distpg import kernels

    monkeypatch.setattr(kernels, "enabled", cpu_kernels)
    new_cache = GPT.new_cache

    def nan_cache(self, *args):  # slots not yet written hold NaN: neither loop may let them through
        cache = new_cache(self, *args)
        cache.k.fill_(float("nan")), cache.v.fill_(float("nan"))
        return cache

    monkeypatch.setattr(GPT, "new_cache", nan_cache)
    prompts = _prompts([1, 4, 7, 2, 5, 3], seed=5) * 4
    params = SamplingParams(max_new_tokens=12, temperature=0.9, stop_token=stop_token)
    ref = generate(model, prompts, params, torch.Generator().manual_seed(6), pad_id=13, check_every=2)
    got = generate(model, prompts, params, torch.Generator().manual_seed(6), pad_id=13, check_every=2,
                   cuda_graph=True)
    if stop_token is not None:  # rows stop at different steps, some early enough that rows were dropped
        lengths = ref.mask.sum(1)
        assert lengths.min() < 6 and lengths.max() == 12 and len(set(lengths.tolist())) > 3
    assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.mask, ref.mask)
    assert torch.equal(got.truncated, ref.truncated)
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    assert (got.logprobs[~got.mask] == 0).all()


def test_fixed_shape_decode_stops_early_when_every_row_has_stopped(model):
    prompt = _prompts([3], seed=4)[0]
    first = generate(model, [prompt], SamplingParams(max_new_tokens=1, temperature=0.0), torch.Generator()).rows()[0][0]
    params = SamplingParams(max_new_tokens=9, temperature=0.0, stop_token=first)
    gen = generate(model, [prompt] * 3, params, torch.Generator(), pad_id=15, check_every=2, cuda_graph=True)
    assert gen.tokens.shape == (3, 9) and (gen.tokens[:, 0] == first).all() and (gen.tokens[:, 1:] == 15).all()
    assert gen.mask[:, 0].all() and not gen.mask[:, 1:].any() and not gen.truncated.any()


# ---------------------------------------------------------------- prompts repeated in a group


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_a_repeated_prompt_is_prefilled_once_and_samples_as_before(model, monkeypatch, cuda_graph):
    """Groups repeat each prompt G times: its prompt tokens run through the model once, and the keys, values
    and first logits go to every row that repeats it. The same tokens, masks and truncation as prefilling
    every row, log-probabilities equal up to float rounding (another batch size), with left padding, in both
    decode loops. Prompts are told apart by their tokens, not their padded rows: [pad, 5] and [5] are two."""
    import distpg.generate as gen_mod

    pad = 13
    distinct = _prompts([1, 4, 7, 2, 5], seed=11) + [[pad, 5], [5]]
    prompts = [p for p in distinct for _ in range(3)][::-1] + distinct[:2]  # 23 rows, out of order
    params = SamplingParams(max_new_tokens=10, temperature=0.9, stop_token=3)
    rows = []
    prefill = gen_mod._prefill

    def counting(model, idx, *args):
        rows.append(idx.shape[0])
        return prefill(model, idx, *args)

    monkeypatch.setattr(gen_mod, "_prefill", counting)
    monkeypatch.setattr(gen_mod, "SHARDS", 1)
    got = generate(model, prompts, params, torch.Generator().manual_seed(2), pad_id=pad, cuda_graph=cuda_graph)
    assert rows == [len(distinct)]
    monkeypatch.setattr(gen_mod, "_distinct", lambda prompts: None)  # every row prefilled, as before
    ref = generate(model, prompts, params, torch.Generator().manual_seed(2), pad_id=pad, cuda_graph=cuda_graph)
    assert rows == [len(distinct), len(prompts)]
    assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.mask, ref.mask)
    assert torch.equal(got.truncated, ref.truncated)
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    assert len({tuple(r) for r in got.rows()}) > len(distinct)  # a group's rows still sample apart


def test_distinct_prompts_by_hand():
    from distpg.generate import _distinct

    assert _distinct([[1, 2], [3], [1, 2], [3], [4]]) == ([0, 1, 4], [0, 1, 0, 1, 2])
    assert _distinct([[1], [2]]) is None  # nothing repeats: the prefill runs on the rows as they are


# ---------------------------------------------------------------- row shards on CPU threads


@pytest.mark.parametrize("stop_token,top_k", [(None, 0), (3, 0), (3, 4)])
def test_row_shards_sample_what_one_batch_samples(model, monkeypatch, stop_token, top_k):
    """A CPU batch split into shards decoded by their own threads (one intra-op thread each): every row gets
    the uniform draws it gets unsharded, so the same tokens, masks and truncation, log-probabilities equal up
    to float rounding (other matrix shapes), with rows stopping and dropped inside each shard; the caller's
    thread count is restored."""
    import distpg.generate as gen_mod

    prompts = _prompts([1, 4, 7, 2, 5, 3, 6], seed=9) * 3  # 21 rows: shards of 7, 7, 7 or 11, 10
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=top_k, stop_token=stop_token)
    monkeypatch.setattr(gen_mod, "SHARDS", 1)
    ref = generate(model, prompts, params, torch.Generator().manual_seed(6), pad_id=13, check_every=2)
    threads = torch.get_num_threads()
    for n in (2, 3):
        monkeypatch.setattr(gen_mod, "SHARDS", n)
        got = generate(model, prompts, params, torch.Generator().manual_seed(6), pad_id=13, check_every=2)
        assert torch.get_num_threads() == threads
        assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.mask, ref.mask)
        assert torch.equal(got.truncated, ref.truncated)
        torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.policy_logprobs, ref.policy_logprobs, atol=1e-5, rtol=0)
        assert (got.policy_logprobs is got.logprobs) == (top_k == 0)
    if stop_token is not None and top_k == 0:  # (the stop token is rarely among the top 4)
        lengths = ref.mask.sum(1)
        assert lengths.min() < 6 and lengths.max() == 12  # rows stopped early, some dropped within a shard


def test_shards_follow_the_intra_op_threads(monkeypatch):
    import distpg.generate as gen_mod

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert gen_mod.shard_count(64) == 2 and gen_mod.shard_count(31) == 1  # 16 rows a shard at least
        torch.set_num_threads(1)
        assert gen_mod.shard_count(64) == 1
        monkeypatch.setattr(gen_mod, "SHARDS", 3)
        assert gen_mod.shard_count(64) == 3 and gen_mod.shard_count(2) == 2
    finally:
        torch.set_num_threads(threads)
