"""distpg learns: real training runs on a local Ray runtime reach their reward and generalise to the
held-out prompts, which training never sees (greedy decoding)."""

import json
import subprocess
import sys

import pytest

from distpg.evaluate import evaluate, load_policy
from distpg.orchestrator import train
from distpg.policy import initial_policy
from tests.conftest import small_config

pytestmark = pytest.mark.ray


def test_reversing_4_characters_is_learned_and_generalises(ray_session, tmp_path):
    # colocated (worker 0 in the learner's actor): the numbers of separate actors (test_colocate), one actor fewer
    cfg = small_config("run.steps=300", "run.stop_reward=0.9", "run.checkpoint_every=1000", "log.print_every=50",
                       "rollout.prompts_per_step=16", "rollout.group_size=8", "task.num_eval=64",
                       "model.preset=tiny", "learner.lr=0.001", "rollout.colocate=true")
    before = evaluate(cfg, initial_policy(cfg)[1].eval())
    summary = train(cfg, tmp_path / "r")
    assert summary["steps"] < 300, "run.stop_reward=0.9 was not reached"
    cfg_run, model = load_policy(tmp_path / "r")
    after = evaluate(cfg_run, model)
    assert before.exact_match < 0.1 and after.exact_match >= 0.8, (before.exact_match, after.exact_match)
    assert after.reward_mean > before.reward_mean + 0.5


def distpg(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distpg", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, check=True)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["rollout.dtype=float32", "rollout.dtype=bfloat16", "learner.dtype=bfloat16"])
def test_the_quickstart_run_learns_the_default_task(tmp_path, setting):
    """The README's main job, `distpg train` with the embedded default (its own local Ray), in each
    sampling precision and with the learner in mixed precision: it stops at run.stop_reward before run.steps,
    and greedy decoding reverses the held-out prompts."""
    out = distpg("train", "--run-dir", "r", "--set", setting, cwd=tmp_path).stdout
    if setting.startswith("learner"):
        assert "the learner trains in bfloat16 mixed precision" in out
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) < 400 and sum(r["rollout/reward_mean"] for r in records[-5:]) / 5 >= 0.97
    out = distpg("eval", "r", cwd=tmp_path).stdout
    exact = float(out.split("exact_match")[1].split()[0])
    assert exact >= 0.95, out
