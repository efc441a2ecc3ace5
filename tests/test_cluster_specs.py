"""The cluster specs that cannot run here (no cloud account, no Kubernetes) are at least well-formed: the
launcher spec against Ray's own schema, the KubeRay RayJob by its key fields; and the scripts parse."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from distpg.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"


def test_runtime_env_uploads_the_code_but_not_the_environment():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= {"excludes", "env_vars", "pip", "working_dir"}
    assert {".git", ".venv", "runs"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray rejects non-string env values


def test_launcher_spec_is_valid_for_rays_launcher():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    spec = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(spec, schema)
    assert spec["provider"]["type"] == "aws" and spec["head_node_type"] in spec["available_node_types"]
    workers = {k: v for k, v in spec["available_node_types"].items() if k != spec["head_node_type"]}
    assert any(v["node_config"]["InstanceType"].startswith(("g", "p")) for v in workers.values())  # GPU types
    head_start = " ".join(spec["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(spec["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in spec["file_mounts"]


def test_kuberay_rayjob_runs_distpg_train_on_gpu_workers_with_token_auth():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "distpg train" in job["spec"]["entrypoint"]
    config = job["spec"]["entrypoint"].split("distpg train ")[1].split()[0]
    load_config(ROOT / config)  # the config the entrypoint names exists and is valid
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "working_dir" in runtime_env and all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert json.loads(yaml.safe_load(group["rayStartParams"]["resources"])) == {"distpg_gpu_worker": 1}


def test_cluster_config_is_valid():
    cfg = load_config(ROOT / "configs" / "cluster.yaml")
    assert cfg.ray.placement_strategy == "SPREAD" and cfg.rollout.num_workers >= 2


@pytest.mark.parametrize("script", ["local-cluster.sh", "submit.sh"])
def test_scripts_parse_and_print_usage(script):
    assert subprocess.run(["bash", "-n", str(CLUSTER / script)]).returncode == 0
    p = subprocess.run([str(CLUSTER / script)], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "DISTPG_CLUSTER_DIR": "/nonexistent"})
    assert p.returncode == 2 and "cluster/" in p.stdout


def test_local_cluster_rejects_a_bad_node_count():
    p = subprocess.run([str(CLUSTER / "local-cluster.sh"), "start", "two"], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "DISTPG_CLUSTER_DIR": "/tmp/distpg-never-started"})
    assert p.returncode == 2 and "'two'" in p.stderr


def test_local_cluster_refuses_a_dir_too_long_for_rays_sockets_before_starting_anything():
    """A long DISTPG_CLUSTER_DIR made the head's Unix socket paths (node_0/session_..._PID/sockets/dash_MetricsHead)
    exceed 107 bytes, and the head failed with "Module MetricsHead failed to start". The script now says so up
    front; a dir of the length it allows gets past the check, to the folder made and the first port asked of a
    PYTHON that fails at once (no Ray is started)."""
    env = {**os.environ, "RAY": "false", "PYTHON": "false", "DISTPG_CLUSTER_AUTH": "off"}
    long = Path("/tmp/distpg-" + "x" * 60)
    p = subprocess.run([str(CLUSTER / "local-cluster.sh"), "start", "1"], capture_output=True, text=True, timeout=30,
                       env={**env, "DISTPG_CLUSTER_DIR": str(long)})
    assert p.returncode == 2 and f"DISTPG_CLUSTER_DIR={long} is too long" in p.stderr, p.stderr
    assert "at most 107" in p.stderr and not long.exists()
    most = int(re.search(r"a DISTPG_CLUSTER_DIR of at most (\d+) bytes", p.stderr).group(1))
    top_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    # the head's longest socket with the longest pid this kernel hands out, at exactly 107 bytes
    assert most + len(f"/node_0/session_2026-11-30_19-12-30_123456_{top_pid}/sockets/dash_MetricsHead") == 107
    for extra, refused in ((0, False), (1, True)):  # "/tmp/distpg-" is 12 bytes
        d = Path("/tmp/distpg-" + "y" * (most - 12 + extra))
        try:
            p = subprocess.run([str(CLUSTER / "local-cluster.sh"), "start", "1"], capture_output=True, text=True,
                               timeout=30, env={**env, "DISTPG_CLUSTER_DIR": str(d)})
            assert p.returncode == (2 if refused else 1) and ("is too long" in p.stderr) == refused, p.stderr
            assert d.exists() != refused
        finally:
            shutil.rmtree(d, ignore_errors=True)
