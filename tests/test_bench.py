"""`distpg bench`: it runs end to end at a tiny setting and writes JSON with a ratio for every figure; the
sampler comparison really uses the same weights on both sides. No wall-clock thresholds: machines are noisy."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distpg import kernels
from distpg.bench import SAMPLER_CASES, decode_bytes, decode_flops, figure, hf_pair

ROOT = Path(__file__).resolve().parent.parent


def test_figure_ratio_and_goal():
    f = figure("x", ours=300.0, reference=100.0, unit="tokens/s", better="higher", goal=2.0)
    assert f["ratio"] == 3.0 and f["goal_met"] is True
    g = figure("y", ours=13.0, reference=10.0, unit="ms", better="lower", goal=1.2)
    assert math.isclose(g["ratio"], 1.3) and g["goal_met"] is False
    assert figure("z", 1.0, 2.0, "ms", "lower", None)["goal_met"] is None


def test_hf_pair_has_identical_weights():
    hf, ours = hf_pair(SAMPLER_CASES["quick"], "cpu")
    x = torch.randint(SAMPLER_CASES["quick"].vocab, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_sampler_bounds_count_what_generate_does():
    from torch.utils.flop_counter import FlopCounterMode

    from distpg.generate import SamplingParams, generate

    case = SAMPLER_CASES["quick"]
    _, model = hf_pair(case, "cpu")
    prompts = torch.randint(case.vocab, (case.batch, case.prompt_len)).tolist()
    # counts the matrix products torch runs as aten ops: with the CPU kernels off (oneDNN's products on
    # pre-packed weights are the same products, but opaque to the counter)
    kernels.enabled = False
    try:
        with FlopCounterMode(display=False) as counter:
            generate(model, prompts, SamplingParams(max_new_tokens=case.new_tokens), torch.Generator().manual_seed(0))
    finally:
        kernels.enabled = True
    assert decode_flops(case, attention=False) == counter.get_total_flops()
    assert decode_flops(case) > counter.get_total_flops()  # plus the cached attention, not a matrix product
    # one forward reads every parameter once; each decode step adds the cache written so far
    n_params = sum(p.numel() for p in model.parameters())
    cache = model.new_cache(case.batch, case.prompt_len + case.new_tokens)
    kv = sum(2 * cache.k[..., : case.prompt_len + t + 1, :].numel() for t in range(case.new_tokens - 1))
    assert decode_bytes(case, elem=2) == 2 * (n_params * case.new_tokens + kv)


@pytest.mark.ray
@pytest.mark.slow  # ~28 s: `distpg bench all --quick` as a process of its own; the default run has the next test
def test_bench_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "distpg", "bench", "all", "--quick", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    # sampler; weights to 1 and 2 workers, a call each and handed with the sample call; step with worker and
    # learner apart and colocated, sync share; learner
    _check_quick_bench(json.loads(out.read_text()), p.stdout, {"sampler", "weights", "step", "learner"}, 9)


@pytest.mark.ray
def test_bench_quick_of_the_ray_parts_on_the_tests_runtime(ray_session, tmp_path, capsys):
    """`distpg bench weights step learner --quick` by cli.main on the shared runtime (the sampler's CLI runs in
    the test below)."""
    from distpg.cli import main

    out = tmp_path / "bench.json"
    capsys.readouterr()
    assert main(["bench", "weights", "step", "learner", "--quick", "--json", str(out)]) == 0
    assert ray_session.is_initialized()  # a runtime the bench did not start is left running
    _check_quick_bench(json.loads(out.read_text()), capsys.readouterr().out, {"weights", "step", "learner"}, 8)


def _check_quick_bench(data: dict, stdout: str, parts: set, count: int) -> None:
    assert data["machine"]["cores"] >= 1 and data["quick"] is True
    assert set(data["results"]) == parts
    figures = [f for group in data["results"].values() for f in group]
    assert len(figures) == count
    for f in figures:
        assert f["better"] in ("higher", "lower")
        assert f["ours"] > 0 and f["reference"] > 0 and math.isclose(f["ratio"], f["ours"] / f["reference"])
        assert f["name"] in stdout
    apart, together = data["results"]["step"][:2]
    assert "rollout.colocate" in together["name"] and "rollout.colocate" not in apart["name"]
    for step in (apart, together):  # Ray and the single-process loop computed the same steps
        assert step["same_numbers"] is True
        assert step["ray_floor_ms"] > 0 and "Ray's floor" in step["note"]
        assert step["ray_floor_data_ms"] >= step["ray_floor_ms"] and "carrying the step's data" in step["note"]
    assert "2 empty calls" in apart["note"] and "1 empty call " in together["note"]


WITHOUT_RAY = """
import json, sys
class Missing:  # as on a GPU machine that has torch and transformers but neither Ray nor pyarrow
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "pyarrow", "tensorboard"):
            raise ImportError("No module named " + repr(name))
sys.meta_path.insert(0, Missing())
from distpg.cli import main
for args in json.loads(sys.argv[1]):  # one command after another, in this one process
    print("=== distpg", *args, file=sys.stderr, flush=True)
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    print("=== exit", code, flush=True)
"""


def test_the_sampler_bench_needs_neither_ray_nor_pyarrow(tmp_path):
    """Both commands by `cli.main` in one process without Ray, pyarrow and tensorboard (one interpreter and
    torch import, not one a command)."""
    out, env = tmp_path / "s.json", {**os.environ, "PYTHONPATH": str(ROOT)}
    commands = [["bench", "sampler", "--quick", "--json", str(out)], ["train"]]
    p = subprocess.run([sys.executable, "-c", WITHOUT_RAY, json.dumps(commands)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    bench, train = p.stdout.split("=== exit ")[1:]
    assert bench.split()[0] == "0", p.stderr[-2000:]
    assert json.loads(out.read_text())["results"]["sampler"][0]["ratio"] > 0
    # the training command does need them, and says which is missing
    assert train.split()[0] == "2" and "No module named" in p.stderr.split("=== distpg train")[1]


@pytest.mark.slow
def test_the_prepared_gpu_script_fetches_its_wheels_and_runs_the_sampler_bench(tmp_path):
    """cluster/gpu-bench.sh as on a GPU machine, here on the CPU with this machine's Python: prepare downloads
    transformers' wheels (not torch), run installs them into a folder of its own and writes the figures."""
    env = {**os.environ, "BENCH_DIR": str(tmp_path / "bench"), "PYVER": f"{sys.version_info[0]}.{sys.version_info[1]}",
           "PYTHON": sys.executable, "DEVICE": "cpu", "SIZES": "quick", "REPEATS": "1", "OUT": str(tmp_path)}
    p = subprocess.run(["bash", "cluster/gpu-bench.sh", "prepare"], capture_output=True, text=True, env=env,
                       timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    wheels = [w.name for w in (tmp_path / "bench" / "wheels").iterdir()]
    assert any(w.startswith("transformers-") for w in wheels) and not any(w.startswith("torch-") for w in wheels)
    p = subprocess.run(["bash", "cluster/gpu-bench.sh", "run"], capture_output=True, text=True, env=env,
                       timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "gpu-sampler.json").read_text())["results"]["sampler"][0]["ratio"] > 0


def test_the_step_floors_echoes_return_what_was_kept_after_fetching_the_handed_version():
    from distpg.bench import _echo, _keep

    class Actor:
        pass

    actor, batch, metrics = Actor(), object(), {"learner/loss": 1.0}
    _keep(actor, batch=batch, metrics=metrics)
    assert _echo(actor, ()) is None
    assert _echo(actor, ("batch",), ["prompt"], [1], 7) is batch
    assert _echo(actor, ("batch", "metrics")) == (batch, metrics)


def test_bench_rejects_unknown_names_and_a_json_path_it_could_not_write_before_it_starts(tmp_path, capsys):
    """A folder as --json, or no size, were found out after the benchmarks had run (the figures lost, a temporary
    file left beside the folder), or not at all (a bench that ran nothing, printed "done" and replaced
    bench.json): each is refused up front, and a weights size is checked with a sampler bench too."""
    from distpg.cli import main

    json_path = ["--json", str(tmp_path / "x.json")]
    assert main(["bench", "nonsense", *json_path]) == 2
    assert main(["bench", "sampler", "--sampler-sizes", "huge", *json_path]) == 2
    assert "distpg bench: --sampler-sizes 'huge': unknown size 'huge'; allowed: tiny, " in capsys.readouterr().err
    assert main(["bench", "sampler", "--sampler-sizes", " , ", *json_path]) == 2
    assert "distpg bench: --sampler-sizes ' , ': no size; allowed: " in capsys.readouterr().err
    assert main(["bench", "sampler", "--weight-sizes", "gpt3", *json_path]) == 2
    assert "distpg bench: --weight-sizes 'gpt3': unknown size 'gpt3'" in capsys.readouterr().err
    assert main(["bench", "sampler", "--sampler-sizes", "quick", "--json", str(tmp_path)]) == 2
    assert f"--json {str(tmp_path)!r} is a folder; give a file name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_options_that_no_chosen_bench_uses_are_said():
    from distpg.bench import add_arguments, unused_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert unused_options(parser.parse_args(["sampler"]), {"sampler"}) == []  # the defaults: nothing said
    args = parser.parse_args(["sampler", "--max-staleness", "5", "--policy", "runs/x", "--workers", "1,2",
                              "--threads", "1000"])
    assert unused_options(args, {"sampler"}) == [
        "--max-staleness has no effect here: it is for async, which this run does not include",
        "--policy has no effect here: it is for variance, which this run does not include",
        "--workers has no effect here: it is for weights, which this run does not include",
        f"--threads 1000 is more than this machine's {os.cpu_count()} cores: the threads share them"]
    assert unused_options(args, {"sampler", "async", "variance", "weights"}) == [unused_options(args, {"sampler"})[-1]]


def test_write_atomic_leaves_nothing_beside_a_path_it_could_not_write(tmp_path):
    from distpg.checkpoint import write_atomic

    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomic(tmp_path / "taken", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


# ---------------------------------------------------------------- the fast paths the benchmarks measure
# (kept here with the benchmarks: each checks that an optimisation changed no result)


def _stopping_model():
    from distpg.model import ModelShape, build_model
    from tests.conftest import randomize_parameters

    m = build_model(ModelShape(vocab_size=16, n_layer=2, n_head=2, n_embd=32, n_positions=64), seed=0)
    randomize_parameters(m, seed=1, scale=0.15)
    return m.eval()


@pytest.mark.parametrize("lengths", [[1, 4, 7, 2, 5, 3], [4] * 6])  # left-padded, and no padding at all
def test_dropping_stopped_rows_changes_no_sample(monkeypatch, decoded_rows, lengths):
    import distpg.generate as G

    monkeypatch.setattr(G, "SHARDS", 1)  # one batch, decoded by one thread (row shards: tests/test_generate.py)
    model = _stopping_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(16, (n,), generator=g).tolist() for n in lengths] * 6
    params = G.SamplingParams(max_new_tokens=24, stop_token=4)
    batch_sizes = decoded_rows
    dropping = G.generate(model, prompts, params, torch.Generator().manual_seed(4), check_every=2)
    assert min(batch_sizes) < len(prompts) // 2  # rows were dropped, more than once
    batch_sizes.clear()
    full = G.generate(model, prompts, params, torch.Generator().manual_seed(4), check_every=10**6)
    assert min(batch_sizes) == len(prompts)
    assert torch.equal(dropping.tokens, full.tokens) and torch.equal(dropping.mask, full.mask)
    assert torch.equal(dropping.truncated, full.truncated) and dropping.truncated.any()
    torch.testing.assert_close(dropping.logprobs, full.logprobs, atol=1e-5, rtol=0)
    # and they are the log-probabilities of a plain forward of each prompt + completion
    for i, (prompt, row) in enumerate(zip(prompts, dropping.rows())):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + row]))[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(row)[:, None]).squeeze(-1)
        torch.testing.assert_close(dropping.logprobs[i, : len(row)], expected, atol=1e-5, rtol=0)


def test_inverse_cdf_by_hand():
    from distpg.generate import inverse_cdf

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]] * 5 + [[2.0, 0.0, 0.0, 0.0]])  # unnormalised rows work
    u = torch.tensor([0.0, 0.49, 0.5, 0.999, 1 - 2**-53, 0.7], dtype=torch.float64)
    # row 0-4: cumulative 0, .5, .5, 1 -> u < .5 picks 1, u >= .5 picks 3; never the zero-mass 0 or 2
    assert inverse_cdf(probs, u).tolist() == [1, 1, 3, 3, 3, 0]


def test_weights_checksum_of_pack_and_what_it_detects():
    from distpg.weights import CHUNK_BYTES, FlatParams, checksum

    # more than one packing chunk, and a last partial block: the fused pack agrees with checksum()
    model = torch.nn.Linear(700, 800)
    flat = FlatParams(model)
    assert flat.flat.numel() * 4 > 2 * CHUNK_BYTES and flat.flat.numel() * 4 % 512
    msg = flat.pack(1)
    assert msg.checksum == checksum(msg.buffer) and torch.equal(torch.from_numpy(msg.buffer), flat.flat)

    buf = msg.buffer
    words = buf.view(np.uint64)

    def changed(edit) -> bool:
        other = buf.copy()
        edit(other)
        return checksum(other) != msg.checksum

    assert changed(lambda b: b.__setitem__(3, b[3] + 1))  # one value
    assert changed(lambda b: b.__setitem__(len(b) - 1, 0.5))  # in the last partial block
    assert changed(lambda b: b.view(np.uint8).__setitem__(1000, b.view(np.uint8)[1000] ^ 1))  # one bit
    for i, j in [(0, 1), (5, 63), (2, 64), (10, 100_000)]:  # swaps within a block and across blocks
        assert words[i] != words[j]
        assert changed(lambda b, i=i, j=j: b.view(np.uint64).__setitem__([i, j], b.view(np.uint64)[[j, i]]))
    assert not changed(lambda b: None)


def test_two_level_inverse_cdf_agrees_with_one_cumulative_sum():
    from distpg.generate import CDF_BLOCK, _search, inverse_cdf

    g = torch.Generator().manual_seed(0)
    for V in (2 * CDF_BLOCK + 1, 5 * CDF_BLOCK, 50257):  # with and without a last partial block
        probs = torch.softmax(3 * torch.randn(256, V, generator=g), -1)
        probs[:, ::7] = 0.0  # tokens that must never be picked
        probs[:3, CDF_BLOCK : 2 * CDF_BLOCK] = 0.0  # a whole block without mass
        u = torch.rand(256, generator=g, dtype=torch.float64)
        tok = inverse_cdf(probs, u)
        assert torch.equal(tok, _search(probs.cumsum(-1, dtype=torch.float64), u)[0].squeeze(-1))
        assert (probs.gather(1, tok[:, None]) > 0).all()
    # frequencies: mass on tokens in different blocks, the last one in the partial block
    V, cells = 2 * CDF_BLOCK + 10, [3, CDF_BLOCK, 2 * CDF_BLOCK - 1, 2 * CDF_BLOCK + 9]
    probs = torch.zeros(1, V)
    probs[0, cells] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 100_000
    counts = torch.bincount(inverse_cdf(probs.expand(n, V), torch.rand(n, generator=g, dtype=torch.float64)),
                            minlength=V)
    assert counts.sum() == counts[cells].sum() == n
    torch.testing.assert_close(counts[cells] / n, probs[0, cells], atol=0.006, rtol=0)  # > 4 sigma


@pytest.mark.ray
@pytest.mark.slow  # ~20 s: two training runs and a variance estimate (the quick bench runs by default)
def test_bench_async_and_variance_write_their_figures(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    sets = ["--set", "run.steps=12", "--set", "task.length=4", "--set", "task.alphabet=abcd",
            "--set", "task.num_eval=16", "--set", "rollout.prompts_per_step=8", "--set", "rollout.group_size=4"]
    p = subprocess.run([sys.executable, "-m", "distpg", "bench", "async", "variance", "--batches", "4", *sets,
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    a = res["async"]
    assert a["sync"]["trajectories_per_s"] > 0 and a["async"]["trajectories_per_s"] > 0
    assert a["speedup"] == pytest.approx(a["async"]["steps_per_s"] / a["sync"]["steps_per_s"])
    assert a["ideal_overlap_bound"] >= 1.0 and a["async"]["staleness_mean"] > 0  # async really ran ahead
    v = res["variance"]["baselines"]
    assert set(v) == {"none", "ema", "group", "value"} and v["none"]["ratio_to_none"] == 1.0
    assert all(np.isfinite(x["variance"]) and x["variance"] > 0 for x in v.values())
    assert "ideal overlap bound" in p.stdout and "ratio to none" in p.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_bench_on_cuda():
    from distpg.bench import bench_sampler

    f = bench_sampler("quick", repeats=1, threads=1, device="cuda")
    assert f["ours"] > 0 and f["reference"] > 0
    # the decode attention's two PyTorch paths, side by side (model.SDPA_DECODE)
    assert f["sdpa_decode_speedup"] > 0 and "SDPA decode attention" in f["note"]
    assert f.get("cuda_graph_speedup", 0) > 0, f.get("cuda_graph_error")  # the fixed-shape decode, captured


def test_sampler_bench_without_transformers_says_what_to_install(monkeypatch):
    from distpg.config import ConfigError

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match=r"pip install transformers .*distpg bench weights step learner"):
        hf_pair(SAMPLER_CASES["quick"], "cpu")


def test_variance_on_a_runs_policy_uses_the_runs_task_and_model(tmp_path):
    """`distpg bench variance --policy RUN`: the run's config (another task and width than the default), its
    checkpoint's weights; no Ray."""
    from distpg import checkpoint
    from distpg.bench import add_arguments
    from distpg.bench import run as bench_run
    from distpg.config import dump_run_config
    from distpg.learner import Learner
    from tests.conftest import small_config

    cfg = small_config("task.name=sort", "task.length=5", "model.n_embd=32", "model.n_head=2")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_run_config(cfg))
    learner = Learner(cfg)
    checkpoint.save(run, 3, learner.state(), keep=1)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "v.json"
    args = parser.parse_args(["variance", "--batches", "2", "--policy", str(run), "--json", str(out)])
    res = bench_run(args)["results"]["variance"]
    assert res["task"] == "sort" and res["model"] == "2x32"
    assert set(res["baselines"]) == {"none", "ema", "group", "value"}


def test_the_learner_bench_in_mixed_precision_times_the_float32_learner_beside_it(tmp_path, monkeypatch):
    """`distpg bench learner` also measures the learner in bfloat16 (learner.dtype) against a supervised step in
    the same precision, with the float32 learner timed beside it; a case that --set makes equal to another is
    measured once."""
    from distpg import bench
    from distpg.bench import add_arguments, bench_learner

    quick = ["task.length=4", "task.alphabet=abcd", "rollout.prompts_per_step=4", "rollout.group_size=2"]
    f = bench_learner([*quick, "learner.dtype=bfloat16"], repeats=1)
    assert "bfloat16" in f["name"] and {"learner", "learner_float32", "supervised"} <= set(f["times_s"])
    assert math.isclose(f["speedup_over_float32"], min(f["times_s"]["learner_float32"]) / min(f["times_s"]["learner"]))
    assert "float32 learner" in f["note"]
    measured = []
    monkeypatch.setattr(bench, "bench_learner", lambda sets, repeats: measured.append(sets) or f)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    bench.run(parser.parse_args(["learner", "--set", "model.preset=small", "--json", str(tmp_path / "l.json")]))
    # the default and the small preset are one case here; the bfloat16 one differs
    assert measured == [["model.preset=small"], ["model.preset=small", "model.preset=small", "learner.dtype=bfloat16"]]


def test_variance_differentiates_the_tempered_policy_the_samples_come_from():
    """With rollout.temperature the samples come from softmax(logits / T), the policy the learner trains: the
    variance bench's gradient estimates are of that policy's log-probabilities (they were of softmax(logits),
    whose gradient the samples do not estimate without bias), as the worker recorded them."""
    from distpg.learner import Learner
    from distpg.rollout import RolloutWorker
    from distpg.variance import _batch, _forward
    from tests.conftest import small_config

    cfg = small_config("rollout.temperature=0.5")
    learner, worker = Learner(cfg), RolloutWorker(cfg, 0)
    worker.set_weights(learner.get_weights())
    lb = _batch(worker, cfg, 0)
    with torch.no_grad():
        logp, mask, _ = _forward(learner, lb)
    torch.testing.assert_close(logp[mask], lb.policy_logprobs[:, 1:][mask], rtol=1e-4, atol=1e-5)
