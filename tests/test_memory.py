"""distpg.memory: the learner and the rollout workers keep freed heap memory instead of faulting fresh
pages in every step (measured in real subprocesses: minor page faults are counted by the kernel)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from distpg.memory import retain_freed_memory

ROOT = Path(__file__).resolve().parent.parent
STEPS = r"""
import json, resource, sys
from distpg.config import load_config
from distpg.learner import Learner
from distpg.orchestrator import sample_seed, step_prompts
from distpg.rollout import RolloutWorker

import distpg.learner, distpg.model
# every row's plain forward in the learner: a step whose temporaries cross glibc's trim and mmap thresholds
# each time; the default shared-prompt forward allocates less and sits near them (88 to 1,201 faults a step
# with glibc's defaults in three runs), too close to tell the settings apart reliably
distpg.learner.forward_shared_prompts = distpg.model.forward_every_row
cfg = load_config(None, ["rollout.num_workers=1"])
worker, learner = RolloutWorker(cfg, 0, 1), Learner(cfg, 1)
weights = learner.get_weights()

def step(s):
    global weights
    prompts, ids = step_prompts(worker.task, cfg, s)
    metrics, weights = learner.update(worker.sample(prompts, ids, sample_seed(0, s, 0), weights))

for s in range(1, 4):  # warm-up
    step(s)
faults = []
for s in range(4, 14):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(s)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults}))
"""


def faults_per_step(env: dict) -> float:
    """The median step's minor page faults. A step that first reaches a new high-water mark (a longer batch
    than any before) faults its new pages in once, with or without the settings: the median leaves those
    out and counts what recurs every step."""
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True)
    return statistics.median(json.loads(out.stdout.strip().splitlines()[-1])["faults"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_default_steps_stop_faulting_pages_in():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    tuned = faults_per_step(env)
    # a MALLOC_* variable in the environment is the user's own tuning: the settings are left alone
    untuned = faults_per_step({**env, "MALLOC_ARENA_MAX": "8"})
    assert untuned > 500, untuned  # glibc's defaults give back and re-fault thousands of pages a step
    assert tuned < untuned / 10, (tuned, untuned)


def test_the_users_malloc_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert retain_freed_memory() is False


def _anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text.split("[")[1].split("]")[0]


def test_empty_on_huge_pages_gives_a_writable_tensor_of_the_asked_shape():
    import torch

    from distpg.memory import HUGE_PAGE, empty_on_huge_pages

    for size, dtype in (((3, 5), torch.float32), ((4, 72, 64, 4, 64), torch.float32),
                        ((2, 9, 8, 4, 64), torch.bfloat16), ((2, 2 * 1024 * 1024 + 3), torch.bfloat16)):
        t = empty_on_huge_pages(size, dtype)
        assert t.shape == size and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
        values = torch.arange(t.numel()).reshape(size).to(dtype)
        t.copy_(values)
        assert torch.equal(t, values)
        if t.numel() * t.element_size() >= 2 * HUGE_PAGE and sys.platform.startswith("linux"):
            assert t.data_ptr() % HUGE_PAGE == 0  # whole huge pages fit


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() == "never",
                    reason="transparent huge pages are off here")
def test_the_kv_cache_is_on_huge_pages_and_given_back_when_freed():
    from distpg.model import ModelShape, build_model

    model = build_model(ModelShape(16, 4, 4, 256, 72), seed=0)
    before = _anon_huge_kib()
    cache = model.new_cache(64, 72)  # 2 x 18 MiB
    cache.k.fill_(1.0)
    cache.v.fill_(2.0)
    assert _anon_huge_kib() - before >= 4 * 1024  # on 2 MiB pages (all 36 MiB where the OS has them free)
    assert float(cache.k.sum() + cache.v.sum()) == 3.0 * cache.k.numel()
    del cache
    assert _anon_huge_kib() - before < 4 * 1024  # unmapped with the last tensor
