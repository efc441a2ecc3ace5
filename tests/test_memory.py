"""distpg.memory: the learner and the rollout workers keep freed heap memory instead of faulting fresh
pages in every step (measured in real subprocesses: minor page faults are counted by the kernel)."""

import json
import os
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

cfg = load_config(None, ["rollout.num_workers=1"])
worker, learner = RolloutWorker(cfg, 0, 1), Learner(cfg, 1)
weights = learner.get_weights()

def step(s):
    global weights
    prompts, ids = step_prompts(worker.task, cfg, s)
    metrics, weights = learner.update(worker.sample(prompts, ids, sample_seed(0, s, 0), weights))

for s in range(1, 4):  # warm-up
    step(s)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for s in range(4, 9):
    step(s)
print(json.dumps({"faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5}))
"""


def faults_per_step(env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["faults_per_step"]


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
