"""`distpg train` as the entrypoint of `ray job submit`, against a real head started with `ray start`."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent


def sh(*args, env, timeout=240):
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def ray_processes(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.fixture
def head(tmp_path):
    cluster_dir = Path(f"/tmp/distpg-test-{os.getpid()}-{int(time.time())}")
    bindir = str(Path(os.sys.executable).parent)
    env = {**os.environ, "DISTPG_CLUSTER_DIR": str(cluster_dir), "DISTPG_CLUSTER_CPUS": "2",
           "PATH": bindir + os.pathsep + os.environ["PATH"], "PYTHON": os.sys.executable}
    env.pop("RAY_ADDRESS", None)
    started = sh("cluster/local-cluster.sh", "start", "0", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield env, cluster_dir
    finally:
        stopped = sh("cluster/local-cluster.sh", "stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        time.sleep(1)
        left = [p for p in ray_processes(str(cluster_dir)) if "<defunct>" not in p]
        assert not left, f"processes left behind: {left}"


def test_ray_job_submit_runs_distpg_train(head, tmp_path):
    env, cluster_dir = head
    run_dir = tmp_path / "job-run"
    p = sh("cluster/submit.sh", "configs/default.yaml", "--set", "run.steps=4", "--set", "log.print_every=1",
           "--set", "run.checkpoint_every=2", "--run-dir", str(run_dir), env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "SUCCEEDED" in p.stdout and "step     4/400" not in p.stdout
    assert "distpg: done after 4 steps" in p.stdout  # the job's own log, tailed
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy/version"] for r in records] == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000004"
