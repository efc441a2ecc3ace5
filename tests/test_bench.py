"""`distpg bench`: it runs end to end at a tiny setting and writes JSON with a ratio for every figure; the
sampler comparison really uses the same weights on both sides. No wall-clock thresholds: machines are noisy."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distpg.bench import SAMPLER_CASES, figure, hf_pair

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


@pytest.mark.ray
def test_bench_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "distpg", "bench", "all", "--quick", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1 and data["quick"] is True
    assert set(data["results"]) == {"sampler", "weights", "step", "learner"}
    figures = [f for group in data["results"].values() for f in group]
    assert len(figures) == 6  # sampler, weights to 1 and 2 workers, step, sync share, learner
    for f in figures:
        assert f["better"] in ("higher", "lower")
        assert f["ours"] > 0 and f["reference"] > 0 and math.isclose(f["ratio"], f["ours"] / f["reference"])
        assert f["name"] in p.stdout
    step = data["results"]["step"][0]
    assert step["same_numbers"] is True  # Ray and the single-process loop computed the same step


def test_bench_rejects_unknown_names(tmp_path):
    from distpg.cli import main

    assert main(["bench", "nonsense", "--json", str(tmp_path / "x.json")]) == 2
    assert main(["bench", "sampler", "--sampler-sizes", "huge", "--json", str(tmp_path / "x.json")]) == 2
