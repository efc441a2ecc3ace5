"""`distpg bench`: each figure printed as a ratio against a reference measured in the same run.

- sampler: tokens/s of `distpg.generate` against Hugging Face `transformers` `generate()` (sampling at
  temperature 1 with no top-k/top-p, KV cache on, exactly `new_tokens` tokens per row) with identical
  weights: a randomly initialised `GPT2LMHeadModel` (nothing is downloaded) copied into distpg's GPT.
- weights: N rollout workers loading one published policy version from the object store, a `set_weights`
  call each (what a run's first broadcast and a restarted worker do), and a new version handed along
  with a call as training does, sync and async (the slowest worker's fetch + load, timed on the workers:
  what `perf/sync_s` times), both against one plain `ray.put` + `ray.get` of the same bytes; the notes
  add Ray's own cost of a call per worker carrying the reference, and the whole publication (the
  learner packs its flat buffer and puts it, then the N workers load it).
- step: one synchronous training step (1 rollout worker, the real `Trainer` on Ray) against a
  single-process loop without Ray doing the same work with the same classes: the cost of distribution.
  Also the share of step time spent on weight sync with the default config.
- learner: tokens/s of `Learner.update` against a plain supervised step (forward, masked cross-entropy,
  backward, AdamW step) on the same padded batch.

Machines are noisy (other processes share the cores), so each pair of measurements is interleaved
(reference, ours, reference, ours, ...) and each side is scored by its best repetition; every
repetition is kept in the JSON. Ratios are "higher is better" for speeds and "lower is better" for
overheads; each figure names which, and the goal of the performance issue it answers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from distpg import kernels
from distpg import model as distpg_model
from distpg.checkpoint import write_atomic
from distpg.cliargs import number, whole_numbers
from distpg.config import ConfigError, load_config
from distpg.stopping import how_stopped

GPT2_VOCAB = 50257
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BENCHES = ("sampler", "weights", "step", "learner")
EXTRA_BENCHES = ("async", "variance")  # longer; run only when named


# ------------------------------------------------------------------------------------------ helpers


def best_of(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds of each function, `repeats` times, interleaved so load spikes hit all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def figure(name: str, ours: float, reference: float, unit: str, better: str, goal: float | None, **extra) -> dict:
    """One result: ours and the reference in `unit`, their ratio, and whether the goal is met."""
    ratio = ours / reference
    met = None if goal is None else (ratio >= goal if better == "higher" else ratio <= goal)
    return {"name": name, "ours": ours, "reference": reference, "unit": unit, "ratio": ratio,
            "better": better, "goal": goal, "goal_met": met, "load_avg_1m": os.getloadavg()[0], **extra}


def _num(v: float) -> str:
    """1,234,567 / 123.4 / 0.1234: thousands separated, four significant digits below 1000, no exponents."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def print_figure(f: dict) -> None:
    note = f"; {f['note']}" if f.get("note") else ""
    if f["unit"] == "fraction":  # a share, not a ratio against a reference
        goal = "" if f["goal"] is None else f"  goal < {f['goal']:.0%}: {'met' if f['goal_met'] else 'NOT met'}"
        print(f"  {f['name']:<44} {f['ours']:.2%}{goal}{note}", flush=True)
        return
    goal = "" if f["goal"] is None else (
        f"  goal {'>=' if f['better'] == 'higher' else '<='} {f['goal']:g}x: {'met' if f['goal_met'] else 'NOT met'}")
    print(f"  {f['name']:<44} ours {_num(f['ours']):>10}  ref {_num(f['reference']):>10} {f['unit']:<9}"
          f" ratio {f['ratio']:6.3f}x ({f['better']} is better){goal}{note}", flush=True)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


# ------------------------------------------------------------------------------------------ sampler


@dataclass(frozen=True)
class SamplerCase:
    n_layer: int
    n_head: int
    n_embd: int
    vocab: int
    batch: int
    new_tokens: int
    prompt_len: int = 8
    dtype: str = "float32"  # both sides sample in this precision (rollout.dtype)


SAMPLER_CASES = {
    "tiny": SamplerCase(2, 4, 64, GPT2_VOCAB, 64, 64),
    "small": SamplerCase(4, 4, 256, GPT2_VOCAB, 64, 64),
    # the 4x256 model with a character vocabulary, the kind of policy `distpg train` trains
    "small-charvocab": SamplerCase(4, 4, 256, 16, 64, 64),
    # the same two in bfloat16 (rollout.dtype=bfloat16), against transformers in bfloat16 and in float32
    "small-bf16": SamplerCase(4, 4, 256, GPT2_VOCAB, 64, 64, dtype="bfloat16"),
    "small-charvocab-bf16": SamplerCase(4, 4, 256, 16, 64, 64, dtype="bfloat16"),
    # 16 new tokens keep GPT-2 124M at batch 64 to about a minute on 2 CPU cores
    "gpt2": SamplerCase(12, 12, 768, GPT2_VOCAB, 64, 16),
    # the GPU goal's sizes (opt-in: minutes per repetition on a CPU): GPT-2 124M, 64 new tokens, batch 64 / 256,
    # in float32 and in bfloat16
    "gpt2-b64": SamplerCase(12, 12, 768, GPT2_VOCAB, 64, 64),
    "gpt2-b256": SamplerCase(12, 12, 768, GPT2_VOCAB, 256, 64),
    "gpt2-b64-bf16": SamplerCase(12, 12, 768, GPT2_VOCAB, 64, 64, dtype="bfloat16"),
    "gpt2-b256-bf16": SamplerCase(12, 12, 768, GPT2_VOCAB, 256, 64, dtype="bfloat16"),
    "quick": SamplerCase(2, 2, 32, 64, 8, 8),  # for tests
}


def hf_pair(case: SamplerCase, device: str, seed: int = 0):
    """A random-init Hugging Face GPT2LMHeadModel and distpg's GPT with the same weights."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("the sampler benchmark compares against Hugging Face transformers, which is not "
                          "installed: pip install transformers (or pip install -e '.[dev]'); the other benchmarks "
                          "run without it: distpg bench weights step learner") from None
    from transformers import GPT2Config, GPT2LMHeadModel

    from distpg.model import GPT, ModelShape

    transformers.logging.set_verbosity_error()
    n_pos = case.prompt_len + case.new_tokens
    cfg = GPT2Config(vocab_size=case.vocab, n_layer=case.n_layer, n_head=case.n_head, n_embd=case.n_embd,
                     n_positions=n_pos, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(cfg).eval().to(device)
    shape = ModelShape(vocab_size=case.vocab, n_layer=case.n_layer, n_head=case.n_head, n_embd=case.n_embd,
                       n_positions=n_pos)
    state = {}
    for name, w in hf.state_dict().items():
        if name == "lm_head.weight":  # tied to wte
            continue
        name = name.removeprefix("transformer.")
        # HF's Conv1D stores (in, out), the transpose of nn.Linear
        state[name] = w.t().contiguous() if name.endswith(CONV1D) else w.clone()
    ours = GPT(shape).to(device)
    ours.load_state_dict(state, strict=True)
    ours.eval()
    with torch.inference_mode():  # same weights, same logits
        x = torch.randint(case.vocab, (2, case.prompt_len), device=device)
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff < 1e-3, f"distpg and transformers disagree by {diff} on the same weights"
    return hf, ours


def bench_sampler(case_name: str, repeats: int, threads: int, device: str) -> dict:
    from distpg.generate import GRAPH_WARMUP, SamplingParams, generate

    torch.set_num_threads(threads)
    case = SAMPLER_CASES[case_name]
    hf, ours = hf_pair(case, device)
    g = torch.Generator(device=device).manual_seed(0)
    prompts = torch.randint(case.vocab, (case.batch, case.prompt_len), generator=torch.Generator().manual_seed(1))
    ids = prompts.to(device)

    def run_hf(n: int = case.new_tokens, model=None):
        with torch.inference_mode():
            out = (model or hf).generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                         top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                                         pad_token_id=0)
        assert out.shape[1] == case.prompt_len + n
        _sync(device)

    def run_ours(n: int = case.new_tokens, cuda_graph: bool = False):
        # a new weights key each time, as a rollout worker's new policy version: the weights are laid out
        # again (timed), into the memory of the previous layout (as on a worker)
        out = generate(ours, prompts.tolist(), SamplingParams(max_new_tokens=n), g, cuda_graph=cuda_graph,
                       weights_key=object())
        assert bool(out.mask.all())
        _sync(device)

    fns = {"hf": run_hf, "ours": run_ours}
    kernel_status = kernels.status() if device == "cpu" else "not used (not a CPU)"
    if kernel_status.startswith("C"):  # the same sampler on PyTorch's ops, as rollout.cpu_kernels=false does
        fns["ours_torch_ops"] = _with_setting(run_ours, kernels, "enabled", False)
    elif device != "cpu":  # the decode attention's other PyTorch path, side by side (see model.SDPA_DECODE)
        fns["ours_elementwise_attention"] = _with_setting(run_ours, distpg_model, "SDPA_DECODE", False)
    if case.dtype != "float32":  # the reference in the same precision; float32 transformers as a second one
        import copy

        hf32, hf = hf, copy.deepcopy(hf).to(getattr(torch, case.dtype))
        ours.to(getattr(torch, case.dtype))
        fns["hf_float32"] = lambda n=case.new_tokens: run_hf(n, hf32)
    for f in fns.values():  # warm-up: a short run each is enough to allocate and load everything
        f(2)
    graph_error = None
    if device != "cpu":  # the same sampler replaying each token's step as a CUDA graph (not yet measured)
        try:
            run_ours(2 * GRAPH_WARMUP + 2, cuda_graph=True)  # warm-up steps, then a capture and replays
            fns["ours_cuda_graph"] = lambda n=case.new_tokens: run_ours(n, cuda_graph=True)
        except Exception as e:  # noqa: BLE001 - reported in the figure; the other timings still count
            graph_error = f"{type(e).__name__}: {e}"
    times = best_of(fns, repeats, warmup=0)
    n_tok = case.batch * case.new_tokens
    # two bounds: the bytes that must be read over the measured read bandwidth, and the matrix-product
    # operations over the measured matrix-product rate
    dt = getattr(torch, case.dtype)
    bandwidth, flops = read_bandwidth(device), matmul_flops(device, dt)
    bound = n_tok / (decode_bytes(case, torch.finfo(dt).bits // 8) / bandwidth)
    compute_bound = n_tok / (decode_flops(case) / flops)
    ours_tps = n_tok / min(times["ours"])
    extra = {"bandwidth_GBps": bandwidth / 1e9, "bound_tokens_per_s": bound, "of_bound": ours_tps / bound,
             "matmul_GFLOPs": flops / 1e9, "compute_bound_tokens_per_s": compute_bound,
             "of_compute_bound": ours_tps / compute_bound}
    note = (f"{ours_tps / bound:.0%} of the bandwidth bound {bound:,.0f} tok/s ({bandwidth / 1e9:.1f} GB/s), "
            f"{ours_tps / compute_bound:.0%} of the compute bound {compute_bound:,.0f} ({flops / 1e9:.0f} GFLOP/s)")
    if "hf_float32" in times:
        vs32 = min(times["hf_float32"]) / min(times["ours"])
        extra |= {"ratio_vs_hf_float32": vs32, "hf_float32_tokens_per_s": n_tok / min(times["hf_float32"])}
        note += f"; against float32 transformers {vs32:.2f}x"
    extra["cpu_kernels"] = kernel_status
    if "ours_torch_ops" in times:
        gain = min(times["ours_torch_ops"]) / min(times["ours"])
        extra |= {"cpu_kernels_speedup": gain, "ours_torch_ops_tokens_per_s": n_tok / min(times["ours_torch_ops"])}
        note += f"; CPU kernels (C + pre-laid-out weights) {gain:.2f}x over PyTorch ops"
    elif device == "cpu":
        note += f"; C kernels {kernel_status}"
    if "ours_cuda_graph" in times:
        gain = min(times["ours"]) / min(times["ours_cuda_graph"])
        extra |= {"cuda_graph_speedup": gain, "ours_cuda_graph_tokens_per_s": n_tok / min(times["ours_cuda_graph"]),
                  "ratio_cuda_graph": min(times["hf"]) / min(times["ours_cuda_graph"])}
        note += (f"; with a CUDA graph per generation {n_tok / min(times['ours_cuda_graph']):,.0f} tok/s, "
                 f"{gain:.2f}x the eager decode, {extra['ratio_cuda_graph']:.2f}x transformers")
    elif graph_error is not None:
        extra["cuda_graph_error"] = graph_error
        note += f"; the CUDA graph decode failed: {graph_error[:200]}"
    if "ours_elementwise_attention" in times:
        gain = min(times["ours_elementwise_attention"]) / min(times["ours"])
        extra |= {"sdpa_decode_speedup": gain,
                  "ours_elementwise_attention_tokens_per_s": n_tok / min(times["ours_elementwise_attention"])}
        note += f"; SDPA decode attention {gain:.2f}x over elementwise ops"
    dtype = "" if case.dtype == "float32" else f", {case.dtype}"
    return figure(f"sampler {case_name} ({case.n_layer}x{case.n_embd}, V={case.vocab}, B={case.batch}, "
                  f"{case.new_tokens} new{dtype})", ours_tps, n_tok / min(times["hf"]), "tokens/s",
                  "higher", _sampler_goal(case_name, device), case=asdict(case), times_s=times,
                  note=note, **extra)


def _with_setting(fn: Callable, owner: object, name: str, value: object) -> Callable:
    """`fn` run with `owner.name` set to `value` (restored after)."""

    def run(*args, **kwargs):
        saved = getattr(owner, name)
        setattr(owner, name, value)
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(owner, name, saved)

    return run


def _sampler_goal(case_name: str, device: str) -> float | None:
    """The issue's goals: 2x transformers at 4x256 on the CPU, 3x at GPT-2 124M on a GPU."""
    if device == "cpu" and case_name.startswith("small"):
        return 2.0
    if device != "cpu" and case_name.startswith("gpt2"):
        return 3.0
    return None


def _best_seconds(fn: Callable[[], object], device: str, repeats: int = 5) -> float:
    """The shortest of `repeats` timed calls of `fn`, the device synchronised around each."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Bytes per second one reduction over a `nbytes` float32 buffer reads (best of 5): the memory bandwidth
    the sampler can use (on a CPU, with the threads torch is set to)."""
    buf = torch.ones(nbytes // 4, device=device)
    return nbytes / _best_seconds(buf.sum, device)


def matmul_flops(device: str, dtype: torch.dtype, n: int = 1024) -> float:
    """Floating-point operations per second of an n x n x n matrix product (best of 5)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / _best_seconds(lambda: a @ b, device)


def _cached_positions(case: SamplerCase) -> int:
    """Cache positions the decode steps attend to, summed over the steps (each new token but the last)."""
    return sum(case.prompt_len + t + 1 for t in range(case.new_tokens - 1))


def decode_flops(case: SamplerCase, attention: bool = True) -> int:
    """Floating-point operations of a generation's matrix products: the linear layers of every token of
    the batch (the output layer on the last prompt position and each new token only) and, with
    `attention`, the decode steps' products of queries with cached keys and of weights with values."""
    C, L, B = case.n_embd, case.n_layer, case.batch
    linear = 2 * 12 * C * C * L * B * (case.prompt_len + case.new_tokens - 1)
    head = 2 * C * case.vocab * B * case.new_tokens
    attn = 2 * 2 * L * B * C * _cached_positions(case)
    return linear + head + (attn if attention else 0)


def decode_bytes(case: SamplerCase, elem: int) -> int:
    """Bytes a generation must read at least: every parameter once per forward (the prefill and each new
    token but the last), plus the keys and values of every cached position at each decode step."""
    C, L = case.n_embd, case.n_layer
    params = case.vocab * C + (case.prompt_len + case.new_tokens) * C + L * (12 * C * C + 13 * C) + 2 * C
    kv = 2 * L * case.batch * C * _cached_positions(case)
    return elem * (params * case.new_tokens + kv)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ weights


class _Publisher:
    """Stands in for the learner: a model behind FlatParams, publishing `pack(version)`."""

    def __init__(self, shape, threads: int) -> None:
        from distpg.model import build_model
        from distpg.weights import FlatParams

        torch.set_num_threads(threads)
        self.flat = FlatParams(build_model(shape, seed=0))
        self.version = 0

    def get_weights(self):
        self.version += 1
        return self.flat.pack(self.version)


class _Subscriber:
    """Stands in for a rollout worker: `set_weights` exactly as RolloutWorker does it."""

    def __init__(self, shape, threads: int) -> None:
        from distpg.model import build_model
        from distpg.weights import FlatParams

        torch.set_num_threads(threads)
        self.flat = FlatParams(build_model(shape, seed=1))

    def set_weights(self, msg) -> int:
        self.flat.load_published(msg)
        return msg.version

    def take(self, handed: list) -> float:
        """Seconds to fetch `[ref]` and load it, as RolloutWorker.sample does with weights handed along."""
        from distpg.weights import receive

        t0 = time.perf_counter()
        self.set_weights(receive(handed, 600))
        return time.perf_counter() - t0

    def ping(self, msg=None) -> int:
        return 0


WEIGHT_SIZES = {  # name -> model.preset and vocabulary (the default task's is 9 characters)
    "default": ("tiny", 9),
    "small-gpt2vocab": ("small", GPT2_VOCAB),
    "gpt2": ("gpt2", GPT2_VOCAB),
    "quick": ("tiny", 9),
}


def bench_weights(size: str, workers: list[int], repeats: int) -> list[dict]:
    import ray

    from distpg.model import PRESETS, ModelShape

    preset, vocab = WEIGHT_SIZES[size]
    shape = ModelShape(vocab_size=vocab, n_positions=64, **PRESETS[preset])
    pub = ray.remote(_Publisher).options(num_cpus=0).remote(shape, 1)
    subs = [ray.remote(_Subscriber).options(num_cpus=0).remote(shape, 1) for _ in range(max(workers))]
    ray.get([s.ping.remote() for s in subs] + [pub.get_weights.remote()], timeout=600)
    nbytes = 4 * sum(int(np.prod(s)) for s in _param_shapes(shape))
    buf = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)

    def plain():
        ray.get(ray.put(buf), timeout=600)

    published = pub.get_weights.remote()
    all_times, handed_s = {}, {}
    for n in workers:
        def publish(n=n):  # the learner packs and puts a new version, n workers load it
            ref = pub.get_weights.remote()
            ray.get([s.set_weights.remote(ref) for s in subs[:n]], timeout=600)

        def deliver(n=n):  # n workers load a version already in the object store, a set_weights call each
            ray.get([s.set_weights.remote(published) for s in subs[:n]], timeout=600)

        def floor(n=n):  # Ray's own cost of those calls: the same reference to n workers, nothing loaded
            ray.get([s.ping.remote(published) for s in subs[:n]], timeout=600)

        handed_s[n] = []

        def hand(n=n):  # a new version handed along with a call (sync training): the slowest fetch + load
            ref = pub.get_weights.remote()
            ray.wait([ref], timeout=600, fetch_local=False)  # published (not what this figure times)
            handed_s[n].append(max(ray.get([s.take.remote([ref]) for s in subs[:n]], timeout=600)))

        all_times[n] = best_of({"plain": plain, "publish": publish, "deliver": deliver, "floor": floor,
                                "hand": hand}, repeats)
        handed_s[n] = handed_s[n][-repeats:]  # the warm-up left out
    # the reference is the same for every N: score it by its best repetition over all of them
    plain_ms = min(t for times in all_times.values() for t in times["plain"]) * 1e3
    results = []
    mib = f"{nbytes / 2**20:.1f} MiB"
    for n, times in all_times.items():
        publish_ms, floor_ms = min(times["publish"]) * 1e3, min(times["floor"]) * 1e3
        note = (f"an empty call per worker with the same reference {floor_ms:.3g} ms ({floor_ms / plain_ms:.2f}x); "
                f"with the learner's pack and put {publish_ms:.3g} ms ({publish_ms / plain_ms:.2f}x)")
        results.append(figure(f"weights {size} ({mib}) to {n} worker(s), a call each",
                              min(times["deliver"]) * 1e3, plain_ms, "ms", "lower", 1.2, bytes=nbytes, workers=n,
                              publish_ms=publish_ms, publish_ratio=publish_ms / plain_ms, floor_ms=floor_ms,
                              times_s=times, note=note))
    for n, seconds in handed_s.items():
        results.append(figure(f"weights {size} ({mib}) handed with the sample call, {n} worker(s)",
                              min(seconds) * 1e3, plain_ms, "ms", "lower", 1.2, bytes=nbytes, workers=n,
                              worker_s=seconds, note="the slowest worker's fetch + load (what perf/sync_s times)"))
    for a in [pub, *subs]:
        ray.kill(a)
    return results


def _param_shapes(shape) -> list[tuple[int, ...]]:
    from distpg.model import build_model

    with torch.device("meta"):
        return [tuple(p.shape) for p in build_model(shape, seed=0).parameters()]


# ------------------------------------------------------------------------------------------ step


QUIET = ["log.print_every=1000000", "log.samples=0"]


def bench_step(overrides: list[str], steps: int, warmup: int) -> dict:
    """The real Trainer on Ray (1 rollout worker) against the same classes in one process, interleaved
    step by step. Both see the same prompts and seeds, so they compute the same numbers (checked); neither
    writes TensorBoard or Parquet. With rollout.colocate=true in `overrides` the one process runs the same
    `ColocatedLearner.step` the learner's actor runs."""
    import ray

    from distpg.colocated import ColocatedLearner
    from distpg.config import load_config
    from distpg.learner import Learner
    from distpg.orchestrator import (
        Trainer,
        call_seconds,
        plan_placement,
        rollout_stats,
        sample_seed,
        step_prompts,
        sync_seconds,
    )
    from distpg.rollout import RolloutWorker

    cfg = load_config(None, ["rollout.num_workers=1", "log.tensorboard=false", "log.rollouts=false", *QUIET,
                             *overrides])
    res = ray.cluster_resources()
    placement = plan_placement(cfg, res.get("CPU", 0), 0)
    if cfg.rollout.colocate:
        learner = worker = ColocatedLearner(cfg, max(1, round(cfg.learner.num_cpus)))
    else:
        worker = RolloutWorker(cfg, 0, max(1, round(cfg.rollout.num_cpus_per_worker)))
        learner = Learner(cfg, max(1, round(cfg.learner.num_cpus)))
    weights = learner.get_weights()
    worker.set_weights(weights)

    def local_step(step: int) -> dict:  # as Trainer.sync_step: the weights go along with the sample call
        nonlocal weights, last
        prompts, ids = step_prompts(task, cfg, step)
        seed = sample_seed(cfg.run.seed, step, 0)
        t0 = time.perf_counter()
        if cfg.rollout.colocate:  # as Trainer.single_call_step
            batch, metrics = learner.step(prompts, ids, seed)
            t1 = t0 + call_seconds(batch)
        else:
            batch = worker.sample(prompts, ids, seed, weights)
            t1 = time.perf_counter()
            metrics, weights = learner.update(batch)
        stats = rollout_stats([batch])
        t2 = time.perf_counter()
        last = {"args": (prompts, ids, seed), "batch": batch, "metrics": metrics, "weights": weights}
        return {**stats, **metrics, "perf/rollout_s": t1 - t0, "perf/learn_s": t2 - t1,
                "perf/sync_s": sync_seconds([batch])}

    task = (learner.worker if cfg.rollout.colocate else worker).task
    last: dict = {}
    phases = ("perf/rollout_s", "perf/learn_s", "perf/sync_s", "perf/learner_compute_s")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), placement)
        try:
            trainer.broadcast(trainer.learner.get_weights.remote(), 0)
            trainer.open_outputs(0)
            ray_s, local_s, same = [], [], True
            ray_ph, local_ph = {k: [] for k in phases}, {k: [] for k in phases}
            for step in range(1, warmup + steps + 1):
                t0 = time.perf_counter()
                r = trainer.sync_step(step)
                t1 = time.perf_counter()
                lo = local_step(step)
                t2 = time.perf_counter()
                same &= all(r[k] == lo[k] for k in ("rollout/reward_mean", "learner/loss"))
                if step > warmup:
                    ray_s.append(t1 - t0)
                    local_s.append(t2 - t1)
                    for k in phases:
                        ray_ph[k].append(r[k])
                        local_ph[k].append(lo[k])
            trainer.logger.close()
            # Ray's own cost of a step's calls: the same calls, empty, after the idle gaps they follow in a step
            # (a sample call after the learner's turn, an update after the rollout's)
            gaps = [(trainer.learner, 0.0)] if cfg.rollout.colocate else \
                [(trainer.workers[0], statistics.median(ray_ph["perf/learn_s"])),
                 (trainer.learner, statistics.median(ray_ph["perf/rollout_s"]))]
            empty = [(lambda a=actor: a.get_version.remote(), gap) for actor, gap in gaps]
            floor_s = _floor(empty, steps, cfg.ray.timeout_s)
            # what carrying a step's data adds to those calls: its arguments, a batch back, the batch to the
            # learner, the metrics and a new version back (into the object store), that version fetched by the
            # worker; measured as echoes (`__ray_call__`) with the data against the same echoes without it (a
            # difference of two medians: in a short run noise can make it negative, where the data is counted free)
            echoes = {carry: _echo_calls(trainer, last, gaps, cfg.rollout.colocate, carry) for carry in (False, True)}
            data_s = floor_s + max(0.0, _floor(echoes[True], steps, cfg.ray.timeout_s)
                                   - _floor(echoes[False], steps, cfg.ray.timeout_s))
        finally:
            trainer.close()
    med = {side: {k.split("/")[1][:-2]: statistics.median(v) * 1e3 for k, v in ph.items()}
           for side, ph in (("ray", ray_ph), ("local", local_ph))}
    note = " ".join(f"{k} {med['ray'][k]:.1f}/{med['local'][k]:.1f}" for k in med["ray"]) + " ms (Ray/one process)"
    local_ms = statistics.median(local_s) * 1e3
    note += (f"; Ray's floor, {len(gaps)} empty call{'s' * (len(gaps) > 1)} after the same idle gaps: "
             f"{floor_s * 1e3:.1f} ms ({floor_s * 1e3 / local_ms:.0%} of the one-process step), the same calls "
             f"carrying the step's data and computing nothing: {data_s * 1e3:.1f} ms (at best "
             f"{1 + data_s * 1e3 / local_ms:.3f}x)")
    where = ", in the learner (rollout.colocate)" if cfg.rollout.colocate else ""
    return figure(f"sync step, 1 worker{where}, Ray vs one process ({cfg.model.preset})",
                  statistics.median(ray_s) * 1e3,
                  local_ms, "ms/step", "lower", 1.10, same_numbers=same, steps=steps,
                  ray_s=ray_s, local_s=local_s, phases_ms=med, ray_floor_ms=floor_s * 1e3,
                  ray_floor_data_ms=data_s * 1e3, note=note)


def _floor(calls: list[tuple[Callable[[], object], float]], steps: int, timeout_s: float) -> float:
    """The median over `steps` rounds of the seconds the `calls` take one after the other, each issued (it
    returns a reference, or references whose first is awaited) after its idle gap."""
    import ray

    def one(call, gap_s):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        ref = call()
        ray.get(ref[0] if isinstance(ref, list) else ref, timeout=timeout_s)
        return time.perf_counter() - t0

    return statistics.median(sum(one(call, gap) for call, gap in calls) for _ in range(steps))


def _keep(actor_self, **values) -> None:
    """Run in an actor by `__ray_call__`: keep `values` there for `_echo`."""
    actor_self._bench_kept = values


def _echo(actor_self, names: tuple[str, ...], *args, handed=None, timeout_s: float = 600.0):
    """Run in an actor by `__ray_call__`: the values `_keep` kept under `names` (None for none), after
    fetching the version `handed` (as a worker's sample call does, `weights.receive`); `args` are carried
    and ignored; no other work."""
    from distpg.weights import receive

    if handed is not None:
        receive(handed, timeout_s)
    kept = [actor_self._bench_kept[n] for n in names]
    return None if not kept else kept[0] if len(kept) == 1 else tuple(kept)


def _echo_calls(trainer, last: dict, gaps: list, colocate: bool, carry: bool) -> list:
    """The step's calls (`gaps`' actors and idle gaps) as echoes that compute nothing, for `_floor`: with
    `carry`, carrying the step's data (`last`: one step's arguments and results from the one-process loop),
    else nothing."""
    import ray

    wait_s = trainer.cfg.ray.timeout_s
    if colocate:
        ray.get(trainer.learner.__ray_call__.remote(_keep, batch=last["batch"], metrics=last["metrics"]),
                timeout=wait_s)
        if not carry:
            return [(lambda: trainer.learner.__ray_call__.remote(_echo, ()), gaps[0][1])]
        step = trainer.learner.__ray_call__.options(num_returns=2)
        return [(lambda: list(step.remote(_echo, ("batch", "metrics"), *last["args"])), gaps[0][1])]
    worker, learner = trainer.workers[0], trainer.learner
    if not carry:
        return [(lambda: worker.__ray_call__.remote(_echo, ()), gaps[0][1]),
                (lambda: learner.__ray_call__.remote(_echo, ()), gaps[1][1])]
    ray.get([worker.__ray_call__.remote(_keep, batch=last["batch"]),
             learner.__ray_call__.remote(_keep, metrics=last["metrics"], weights=last["weights"])], timeout=wait_s)
    handed = [ray.put(last["weights"])]
    batch_ref: list = []

    def sample():
        batch_ref[:] = [worker.__ray_call__.remote(_echo, ("batch",), *last["args"], handed=handed, timeout_s=wait_s)]
        return batch_ref[0]

    def update():
        return list(learner.__ray_call__.options(num_returns=2).remote(_echo, ("metrics", "weights"), *batch_ref))

    return [(sample, gaps[0][1]), (update, gaps[1][1])]


def bench_sync_fraction(overrides: list[str], steps: int, warmup: int) -> dict:
    """perf/sync_s as a share of perf/step_s with the default config (2 rollout workers, its logging
    included) on Ray."""
    import ray

    from distpg.config import load_config
    from distpg.orchestrator import Trainer, plan_placement

    cfg = load_config(None, [*QUIET, *overrides])
    res = ray.cluster_resources()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), plan_placement(cfg, res.get("CPU", 0), 0))
        try:
            trainer.broadcast(trainer.learner.get_weights.remote(), 0)
            trainer.open_outputs(0)
            sync, total = [], []
            for step in range(1, warmup + steps + 1):
                r = trainer.sync_step(step)
                if step > warmup:
                    sync.append(r["perf/sync_s"])
                    total.append(r["perf/step_s"])
            trainer.logger.close()
        finally:
            trainer.close()
    frac = sum(sync) / sum(total)
    what = "default config" if not overrides else "default config with " + " ".join(overrides)
    return {"name": f"weight sync share of step time, {what} ({cfg.rollout.num_workers} workers)",
            "ours": frac, "reference": 1.0, "unit": "fraction", "ratio": frac, "better": "lower", "goal": 0.05,
            "goal_met": frac < 0.05, "load_avg_1m": os.getloadavg()[0], "steps": steps, "sync_s": sync,
            "step_s": total}


# ------------------------------------------------------------------------------------------ learner


def bench_learner(overrides: list[str], repeats: int) -> dict:
    import torch.nn.functional as F

    from distpg.batch import to_learner_batch
    from distpg.config import load_config
    from distpg.learner import Learner
    from distpg.model import policy_from_config
    from distpg.orchestrator import sample_seed, step_prompts
    from distpg.rollout import RolloutWorker

    cfg = load_config(None, list(overrides))
    threads = max(1, round(cfg.learner.num_cpus))
    worker = RolloutWorker(cfg, 0, threads)
    learner = Learner(cfg, threads)
    worker.set_weights(learner.get_weights())
    prompts, ids = step_prompts(worker.task, cfg, 1)
    batch = worker.sample(prompts, ids, sample_seed(cfg.run.seed, 1, 0))

    # the reference: a plain supervised step on the same padded tokens, same model and optimizer settings
    b = to_learner_batch([batch], pad_id=0)
    tokens, mask = b.tokens, b.response_mask[:, 1:]
    model = policy_from_config(cfg.model, worker.tokenizer.vocab_size, cfg.run.seed).train()
    lc = cfg.learner
    opt = torch.optim.AdamW(model.parameters(), lr=lc.lr, betas=(lc.beta1, lc.beta2), weight_decay=lc.weight_decay)

    def supervised():  # in the learner's precision (learner.dtype), as a mixed-precision trainer runs it
        opt.zero_grad(set_to_none=True)
        with learner.autocast():
            logits = model(tokens[:, :-1])
        nll = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        (nll * mask.flatten()).sum().div(mask.sum()).backward()
        opt.step()

    torch.set_num_threads(threads)
    import distpg.learner as learner_mod
    from distpg.model import forward_every_row

    # the same learner with the plain forward of every row (each group's prompt G times, as the reference)
    plain = _with_setting(lambda: learner.update(batch), learner_mod, "forward_shared_prompts", forward_every_row)
    fns = {"supervised": supervised, "learner": lambda: learner.update(batch), "learner_plain_forward": plain}
    mixed = cfg.learner.dtype != "float32"
    if mixed:  # the same learner in float32, side by side: what the lower precision gains
        learner32 = Learner(load_config(None, [*overrides, "learner.dtype=float32"]), threads)
        fns["learner_float32"] = lambda: learner32.update(batch)
    times = best_of(fns, repeats)
    n_tok = tokens.numel()
    like = min(times["supervised"]) / min(times["learner_plain_forward"])
    gain = min(times["learner_plain_forward"]) / min(times["learner"])
    note = (f"with the plain forward of every row, as the reference does: {like:.2f}x; running each group's prompt "
            f"once: {gain:.2f}x over that")
    extra = {}
    if mixed:
        extra["speedup_over_float32"] = min(times["learner_float32"]) / min(times["learner"])
        note += (f"; both sides in {cfg.learner.dtype} autocast, {extra['speedup_over_float32']:.2f}x the float32 "
                 "learner")
    dtype = "" if not mixed else f", {cfg.learner.dtype}"
    return figure(f"learner ({cfg.model.preset}{dtype}, {tokens.shape[0]} samples x {tokens.shape[1]} tokens)",
                  n_tok / min(times["learner"]), n_tok / min(times["supervised"]), "tokens/s", "higher", 0.8,
                  times_s=times, ratio_plain_forward=like, shared_prompts_speedup=gain, note=note, **extra)


# ------------------------------------------------------------------------------------------ driver


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("benches", nargs="*", metavar="{sampler,weights,step,learner,all,async,variance}", default=[],
                   help="which benchmarks to run (default: all = sampler weights step learner; async and "
                   "variance run only when named)")
    p.add_argument("--max-staleness", type=number(int, 0), default=2, help="async: algo.max_staleness of the async run")
    p.add_argument("--race", action="store_true",
                   help="async: also race sync and async to a reward of 0.9 on the default task (seeds 0-3)")
    p.add_argument("--policy", help="variance: a run folder or checkpoint whose policy to measure on, with its "
                   "task and model (--set applies on top) "
                   "(default: the config's initial policy)")
    p.add_argument("--batches", type=number(int, 2), default=40, help="variance: independent batches per baseline")
    p.add_argument("--sampler-sizes", default="tiny,small,small-charvocab,small-bf16,small-charvocab-bf16,gpt2",
                   help=f"comma-separated sampler cases: {', '.join(SAMPLER_CASES)}")
    p.add_argument("--weight-sizes", default="default,small-gpt2vocab",
                   help=f"comma-separated weight sizes: {', '.join(WEIGHT_SIZES)}")
    p.add_argument("--workers", type=whole_numbers, default="1,2,4", help="weights: numbers of workers to broadcast to")
    p.add_argument("--repeats", type=number(int, 1), default=3,
                   help="timed repetitions per measurement (best one counts)")
    p.add_argument("--steps", type=number(int, 1), default=20,
                   help="step: timed training steps (after 5 warm-up steps)")
    p.add_argument("--threads", type=number(int, 1), default=1,
                   help="sampler: torch threads (default 1, as a rollout worker with the default 0.5 CPU runs)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="sampler: cpu or cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="step/learner: config overrides on top of the default config (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (a smoke test)")
    p.add_argument("--json", default="bench.json", help="where to write the results (default: bench.json)")


# the benchmarks each option serves (its help says so too)
OPTION_USERS = {"max_staleness": ("async",), "race": ("async",), "policy": ("variance",), "batches": ("variance",),
                "sampler_sizes": ("sampler",), "threads": ("sampler",), "device": ("sampler",),
                "weight_sizes": ("weights",), "workers": ("weights",), "steps": ("step",),
                "set": ("step", "learner", "async", "variance")}


def unused_options(args: argparse.Namespace, benches: set[str]) -> list[str]:
    """Options given another value than their default that none of the `benches` run uses (e.g. --max-staleness
    with sampler), and --threads past this machine's cores: taken silently, they looked like settings that did
    nothing (a helper's trial)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])  # string defaults converted by their types, as the given values are
    said = []
    for name, users in OPTION_USERS.items():
        if getattr(args, name) != getattr(defaults, name) and not benches & set(users):
            said.append(f"--{name.replace('_', '-')} has no effect here: it is for {' and '.join(users)}, which "
                        "this run does not include")
    cores = os.cpu_count() or 1
    if "sampler" in benches and args.threads > cores:
        said.append(f"--threads {args.threads} is more than this machine's {cores} cores: the threads share them")
    return said


def run(args: argparse.Namespace) -> dict:
    """Run the chosen benchmarks, print each figure as it comes, write the JSON; returns the results."""
    bad = [b for b in args.benches if b not in (*BENCHES, *EXTRA_BENCHES, "all")]
    if bad:
        raise ConfigError(f"distpg bench: unknown benchmark {bad[0]!r}; allowed: "
                          f"{', '.join(BENCHES + EXTRA_BENCHES)}, all")
    # found out now, not after minutes of benchmarks
    if not Path(args.json).resolve().parent.is_dir():
        raise ConfigError(f"distpg bench: --json {args.json!r}: no folder {str(Path(args.json).parent)!r}")
    if Path(args.json).is_dir():
        raise ConfigError(f"distpg bench: --json {args.json!r} is a folder; give a file name (e.g. "
                          f"{Path(args.json) / 'bench.json'})")
    _names(args.sampler_sizes, SAMPLER_CASES, "--sampler-sizes")
    _names(args.weight_sizes, WEIGHT_SIZES, "--weight-sizes")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("distpg bench: --device cuda, but torch sees no CUDA device (torch "
                          f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    if not args.benches or "all" in args.benches:
        chosen = BENCHES
    else:
        chosen = tuple(b for b in BENCHES if b in args.benches)
    for note in unused_options(args, {*chosen, *(b for b in args.benches if b in EXTRA_BENCHES)}):
        print(f"distpg bench: note: {note}", flush=True)
    quick = args.quick
    repeats = 1 if quick else args.repeats
    sets = (["task.length=4", "task.alphabet=abcd", "rollout.prompts_per_step=4", "rollout.group_size=2"]
            if quick else []) + list(args.set)
    out = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick, "results": {}}
    print(f"distpg bench on {out['machine']['cpu']} ({out['machine']['cores']} cores"
          f"{', ' + out['machine']['gpu'] if out['machine']['gpu'] else ''}), torch {torch.__version__}", flush=True)
    if quick:
        print("--quick: toy sizes and one repetition, a smoke test; the goals are for the full sizes", flush=True)
    t_start = time.perf_counter()
    try:
        _run(args, chosen, out, quick, repeats, sets)
    except BaseException as e:  # Ctrl-C, SIGTERM, SIGHUP (`distpg.stopping`) or a failure: what was measured is kept
        out["stopped"] = how_stopped(e) if isinstance(e, KeyboardInterrupt) else f"failed ({type(e).__name__}: {e})"
        raise
    finally:
        out["elapsed_s"] = time.perf_counter() - t_start
        done = sum(len(v) if isinstance(v, list) else 1 for v in out["results"].values())
        if "stopped" not in out:
            write_atomic(Path(args.json), json.dumps(out, indent=1))
            print(f"distpg bench: done in {out['elapsed_s']:.0f}s; results in {args.json}", flush=True)
        elif done:  # a bench.json of an earlier run is not replaced by an empty one
            write_atomic(Path(args.json), json.dumps(out, indent=1))
            print(f"distpg bench: {out['stopped']} after {out['elapsed_s']:.0f}s; the {done} result(s) measured "
                  f"before it are in {args.json}", flush=True)
    return out


def _run(args: argparse.Namespace, chosen: tuple[str, ...], out: dict, quick: bool, repeats: int,
         sets: list[str]) -> None:
    """`run`'s benchmarks, each result into out["results"] as soon as it is measured."""
    extra = tuple(b for b in EXTRA_BENCHES if b in args.benches)
    if "sampler" in chosen:
        print("sampler: distpg generate vs transformers generate(), same weights", flush=True)
        sizes = ["quick"] if quick else _names(args.sampler_sizes, SAMPLER_CASES, "--sampler-sizes")
        res = out["results"]["sampler"] = []
        for s in sizes:
            res.append(bench_sampler(s, repeats, args.threads, args.device))
            print_figure(res[-1])
    if chosen != ("sampler",) and any(b in chosen for b in ("weights", "step")):
        _with_ray(chosen, args, out, quick, repeats, sets)
    if "learner" in chosen:
        print("learner: Learner.update vs a plain supervised step on the same batch", flush=True)
        res = out["results"]["learner"] = []
        done = []  # configs already measured (--set may make two of the cases one)
        cases = [[]] if quick else [[], ["model.preset=small"], ["model.preset=small", "learner.dtype=bfloat16"]]
        for case in cases:  # not `extra`: that name holds the extra benchmarks (async, variance) asked for
            cfg = load_config(None, sets + case)
            if cfg not in done:
                done.append(cfg)
                res.append(bench_learner(sets + case, max(repeats, 3)))
                print_figure(res[-1])
    if "async" in extra:
        from distpg.bench_async import bench_async, learning_race

        print(f"async: the same config in sync and async mode (max_staleness {args.max_staleness})", flush=True)
        out["results"]["async"] = bench_async(list(args.set), max_staleness=args.max_staleness)
        if args.race:
            out["results"]["async_race"] = learning_race(list(args.set), max_staleness=args.max_staleness,
                                                         seeds=(0, 1, 2, 3))
    if "variance" in extra:
        from distpg.config import config_from_dict, load_run_config, merge_overrides
        from distpg.evaluate import resolve_checkpoint
        from distpg.variance import bench_variance

        if args.policy is None:
            cfg = config_from_dict(merge_overrides({}, list(args.set)))
        else:  # the run's own task and model, with --set on top
            cfg = load_run_config(resolve_checkpoint(Path(args.policy))[0] / "config.yaml", list(args.set),
                                  weights=False)
        out["results"]["variance"] = bench_variance(cfg, batches=args.batches, policy=args.policy)


def _with_ray(chosen, args, out, quick: bool, repeats: int, sets: list[str]) -> None:
    import ray

    started = not ray.is_initialized()
    if started:  # "local": a fresh runtime of our own, never someone else's cluster
        from distpg.orchestrator import start_local_ray, stop_local_ray

        start_local_ray(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        if "weights" in chosen:
            print("weights: one version to N workers vs one plain ray.put + ray.get of the same bytes", flush=True)
            res = out["results"]["weights"] = []
            workers = [1, 2] if quick else args.workers
            for size in ["quick"] if quick else _names(args.weight_sizes, WEIGHT_SIZES, "--weight-sizes"):
                for f in bench_weights(size, workers, repeats if quick else max(repeats, 7)):
                    res.append(f)
                    print_figure(f)
        if "step" in chosen:
            print("step: synchronous training step on Ray vs one process without Ray", flush=True)
            res = out["results"]["step"] = []
            steps, warmup = (3, 1) if quick else (args.steps, 5)
            for colocate in ("false", "true"):
                res.append(bench_step([*sets, f"rollout.colocate={colocate}"], steps, warmup))
                print_figure(res[-1])
            res.append(bench_sync_fraction(sets, steps, warmup))
            print_figure(res[-1])
    finally:
        if started:
            stop_local_ray()


def _names(csv: str, known: dict, option: str) -> list[str]:
    names = [s.strip() for s in csv.split(",") if s.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ConfigError(f"distpg bench: {option} {csv!r}: " + (f"unknown size {bad[0]!r}" if bad else "no size")
                          + f"; allowed: {', '.join(known)} (comma-separated)")
    return names
