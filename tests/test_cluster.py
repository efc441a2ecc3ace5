"""A real multi-node Ray cluster on this machine: a head and 2 worker nodes started by
cluster/local-cluster.sh (`ray start` each), jobs submitted by cluster/submit.sh (`ray job submit`),
`distpg doctor` and `distpg scale` against it, and `stop` leaving no process behind.

One cluster serves the whole module (starting one takes ~20 s on 2 cores); the tests share it read-only, but
for the last ones, which kill its worker nodes. The test that kills a head's GCS starts clusters of its own.
"""

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import distpg_commands

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent


def sh(*args, env, timeout=240, cwd=ROOT):
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


def cluster_pids(cluster_dir: Path, gcs_port: str) -> set[int]:
    """Processes whose command line names the cluster (its dir or GCS port), and their descendants."""
    out = subprocess.run(["pgrep", "-f", f"{cluster_dir}/|LOCALHOST:{gcs_port}( |$)"], capture_output=True,
                         text=True).stdout
    pids, todo = set(), [int(p) for p in out.split()]
    while todo:
        pid = todo.pop()
        if pid in pids or pid == os.getpid():
            continue
        pids.add(pid)
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        todo += [int(c) for c in children.split()]
    return {p for p in pids if _state(p) not in ("Z", None)}


def _state(pid: int) -> str | None:
    try:
        return next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("State:"))
    except (OSError, StopIteration):
        return None


def listening_addresses(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every TCP socket in LISTEN state held by `pids` (from /proc)."""
    inode_pid = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inode_pid[link[8:-1]] = pid
        except OSError:
            continue
    found = []
    for name, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in open(name).read().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inode_pid:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(f[1].split(":")[0])
            raw = raw[::-1] if family == socket.AF_INET else b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
            found.append((inode_pid[f[9]], socket.inet_ntop(family, raw)))
    return found


@pytest.fixture(scope="module")
def cluster():
    """A head + 2 worker nodes, 2 CPUs each, token authentication on. Stopped at the end, and checked gone."""
    with running_cluster(2) as started:
        yield started


@contextmanager
def running_cluster(workers: int, name: str = "test"):
    """cluster/local-cluster.sh with a head and `workers` worker nodes of 2 CPUs each: (env, its dir, GCS port).
    Stopped at the end, and checked gone. A short `name`: Ray's socket paths under the dir must stay within
    the 107 bytes of a Unix socket's (with "head-loss" the head's dashboard failed to start)."""
    cluster_dir = Path(f"/tmp/distpg-{name}-{os.getpid()}-{int(time.time())}")
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "DISTPG_CLUSTER_DIR": str(cluster_dir), "DISTPG_CLUSTER_CPUS": "2",
           "PATH": bindir + os.pathsep + os.environ["PATH"], "PYTHON": sys.executable}
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    started = sh("cluster/local-cluster.sh", "start", str(workers), env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    gcs_port = (cluster_dir / "gcs_port").read_text().strip()
    try:
        yield env, cluster_dir, gcs_port
    finally:
        stopped = sh("cluster/local-cluster.sh", "stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        left = cluster_pids(cluster_dir, gcs_port)
        for _ in range(10):
            if not left:
                break
            time.sleep(0.5)
            left = cluster_pids(cluster_dir, gcs_port)
        assert not left, f"processes left behind: {sorted(left)}"
        shutil.rmtree(cluster_dir, ignore_errors=True)  # only once everything is gone (else: kept for the logs)


def client_env(env: dict, cluster_dir: Path) -> dict:
    """What a client of the cluster needs: its address and its token."""
    return {**env, "RAY_ADDRESS": (cluster_dir / "address").read_text().strip(), "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(cluster_dir / "auth_token")}


def train_on(cluster, cmd: list[str]) -> subprocess.Popen:
    """`cmd` (a `distpg train`) started as a client of the cluster, its output collected."""
    env, cluster_dir, _ = cluster
    return subprocess.Popen(cmd, env={**client_env(env, cluster_dir), "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(proc: subprocess.Popen, reached, timeout: float = 180) -> None:
    """Until `reached()` holds, the process ends, or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not reached():
        time.sleep(0.1)


def test_every_port_of_every_node_is_on_loopback(cluster):
    env, cluster_dir, gcs_port = cluster
    pids = cluster_pids(cluster_dir, gcs_port)
    listening = listening_addresses(pids)
    assert len(listening) >= 15, listening  # GCS, 3 raylets x 2, dashboard, agents, metrics ...
    exposed = [(pid, addr) for pid, addr in listening if not (addr.startswith("127.") or addr == "::ffff:127.0.0.1"
                                                               or addr == "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"



def test_env_exports_what_a_client_shell_needs(cluster):
    """`eval "$(cluster/local-cluster.sh env)"` (start prints that line) sets the address, the job API server's
    address and the token, which `start` printed as lines to retype (a helper's trial)."""
    env, cluster_dir, _ = cluster
    p = sh("bash", "-c", 'eval "$(cluster/local-cluster.sh env)" && env', env=env)
    assert p.returncode == 0, p.stderr
    exported = dict(line.split("=", 1) for line in p.stdout.splitlines() if line.startswith("RAY_"))
    want = {k: v for k, v in client_env(env, cluster_dir).items() if k.startswith("RAY_")}
    assert exported == {**want, "RAY_API_SERVER_ADDRESS": (cluster_dir / "dashboard").read_text().strip()}

@pytest.mark.slow  # ~8 s: a job of its own; test_cli's Ray-copy test covers the check in this process
def test_a_raw_job_without_an_absolute_run_dir_is_refused(cluster):
    """`ray job submit ... -- distpg train` without --run-dir: the job would write into Ray's temporary copy of
    its working dir; it fails at once, saying so (detected from the job's own environment and folder)."""
    env, cluster_dir, _ = cluster
    dashboard = (cluster_dir / "dashboard").read_text().strip()
    p = sh("ray", "job", "submit", "--address", dashboard, "--working-dir", ".", "--runtime-env",
           "cluster/runtime_env.yaml", "--", "python", "-m", "distpg", "train", "--set", "run.steps=1",
           env=client_env(env, cluster_dir))
    out = p.stdout + p.stderr
    assert "this job runs in Ray's temporary copy of its working dir" in out and "working_dir_files" in out, out[-3000:]
    assert "failed" in out.lower() and p.returncode != 0, out[-2000:]


SMALL_RUN = ["--set", "task.length=4", "--set", "rollout.prompts_per_step=8", "--set", "rollout.group_size=4",
             "--set", "run.stop_reward=null", "--set", "log.print_every=1"]


def test_job_from_another_folder_spreads_workers_over_nodes(cluster, tmp_path):
    """submit.sh with CONFIG relative to the caller's folder -> SUCCEEDED, the job's log tailed; the run folder on
    the head has metrics showing workers on 2 nodes or more (configs/cluster.yaml: SPREAD)."""
    env, cluster_dir, _ = cluster
    run_dir = tmp_path / "run"
    p = sh(str(ROOT / "cluster" / "submit.sh"), "cluster.yaml", *SMALL_RUN, "--set", "run.steps=2",
           "--set", "run.checkpoint_every=1", "--run-dir", str(run_dir), env=env, cwd=ROOT / "configs")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "submitting configs/cluster.yaml" in p.stdout and "job id:  distpg-" in p.stdout
    assert "ray job logs --address" in p.stdout
    assert "SUCCEEDED" in p.stdout and "distpg: done after 2 steps" in p.stdout  # the job's own log, tailed
    assert "SPREAD" in (run_dir / "config.yaml").read_text()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy/version"] for r in records] == [1, 2]
    # configs/cluster.yaml: 4 workers x 1 CPU + a 1-CPU learner under SPREAD on three 2-CPU nodes
    assert all(r["workers/alive"] == 4 for r in records)
    assert min(r["workers/nodes"] for r in records) >= 2, [r["workers/nodes"] for r in records]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"


@pytest.mark.slow  # ~15 s (30 s on a 2-core AMD EPYC): two jobs; the test above submits one in the default run
def test_a_submitted_run_resumes_with_commands_for_a_fresh_shell(cluster, tmp_path):
    """An ended job's run trains on once run.steps is raised in its config.yaml (as `nothing to resume` says):
    `submit.sh --resume RUN_DIR` continues it; the printed follow/status commands carry the token settings
    submit.sh picked up, so they work in a fresh shell."""
    env, cluster_dir, _ = cluster
    run_dir = tmp_path / "resumed"
    p = sh(str(ROOT / "cluster" / "submit.sh"), "configs/cluster.yaml", *SMALL_RUN, "--set", "run.steps=1",
           "--set", "run.checkpoint_every=1", "--run-dir", str(run_dir), env=env)
    assert p.returncode == 0 and "distpg: done after 1 steps" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    config = run_dir / "config.yaml"
    text, n = re.subn(r"(?m)^(\s+steps:) 1$", r"\1 2", config.read_text())
    assert n == 1, config.read_text()
    config.write_text(text)
    p = sh(str(ROOT / "cluster" / "submit.sh"), "--no-wait", "--resume", str(run_dir), env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = dict(map(str.strip, line.split(":", 1)) for line in p.stdout.splitlines() if ":  " in line)
    prefix = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster_dir / 'auth_token'} "
    assert all(lines[k].startswith(prefix + "ray job ") for k in ("follow", "status", "stop")), p.stdout
    fresh = {k: v for k, v in env.items() if not k.startswith(("RAY_", "DISTPG_"))}  # no token, no cluster dir
    follow = sh("bash", "-c", lines["follow"], env=fresh, timeout=300)
    assert follow.returncode == 0 and "distpg: done after 2 steps" in follow.stdout, follow.stdout + follow.stderr
    status = sh("bash", "-c", lines["status"], env=fresh, timeout=60)
    assert status.returncode == 0 and "succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy/version"] for r in records] == [1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"


def submit_refused(*args, tmp_path, cwd=ROOT):
    """cluster/submit.sh ARGS with a stub `ray` that records any submission: (result, what was submitted)."""
    stub = tmp_path / "ray"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "submitted"}\n')
    stub.chmod(0o755)
    env = {**os.environ, "RAY": str(stub), "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1",
           "DISTPG_CLUSTER_DIR": str(tmp_path / "nothing")}
    p = sh(str(ROOT / "cluster" / "submit.sh"), "--no-wait", *args, env=env, timeout=30, cwd=cwd)
    submitted = tmp_path / "submitted"
    return p, submitted.read_text() if submitted.exists() else ""


def test_submit_builds_the_resume_and_new_run_entrypoints(tmp_path):
    p, submitted = submit_refused("--resume", "/data/runs/r1", tmp_path=tmp_path)
    assert p.returncode == 0 and "submitting --resume /data/runs/r1" in p.stdout, p.stdout + p.stderr
    assert submitted.endswith("-- python -m distpg train --resume /data/runs/r1\n"), submitted
    (tmp_path / "submitted").unlink()
    config = os.path.relpath(ROOT / "configs" / "default.yaml", tmp_path)  # from the caller's folder
    p, submitted = submit_refused(config, "--set", "run.steps=3", "--run-dir", "/data/runs/r2", tmp_path=tmp_path,
                                  cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert submitted.endswith("train configs/default.yaml --set run.steps=3 --run-dir /data/runs/r2\n"), submitted


@pytest.mark.parametrize("args, says", [
    (["--resume", "runs/r1"], "give the run folder's absolute path"),
    (["configs/default.yaml", "--resume", "/data/runs/r1"], "drop CONFIG and --set"),
    (["--resume", "/data/runs/r1", "--set", "run.steps=9"], "drop CONFIG and --set"),
    (["configs/default.yaml"], "give --run-dir /ABSOLUTE/PATH on the head"),
    (["configs/default.yaml", "--run-dir", "runs/r1"], "--run-dir 'runs/r1' is relative"),
])
def test_submit_refuses_run_folders_that_would_land_in_rays_copy(tmp_path, args, says):
    p, submitted = submit_refused(*args, tmp_path=tmp_path)
    assert p.returncode == 2 and says in p.stderr and not submitted, p.stdout + p.stderr
    if "--run-dir" not in args and "--resume" not in args:
        assert "Ray's temporary folder on the head" in p.stderr


def test_submit_refuses_a_config_the_job_could_not_read(tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text((ROOT / "configs" / "default.yaml").read_text())
    p, submitted = submit_refused(str(outside), "--run-dir", "/data/runs/r1", tmp_path=tmp_path)
    assert p.returncode == 2 and "is outside" in p.stderr and "copy it into the repository" in p.stderr, p.stderr
    assert not submitted
    p, submitted = submit_refused("default.yaml", "--run-dir", "/data/runs/r1", tmp_path=tmp_path)
    assert p.returncode == 2 and f"'default.yaml' not found (from {ROOT})" in p.stderr and not submitted, p.stderr


def test_submission_without_the_token_is_refused(cluster, tmp_path):
    env, cluster_dir, _ = cluster
    dashboard = (cluster_dir / "dashboard").read_text().strip()
    # the state dir is hidden so submit.sh cannot pick the token up by itself
    bare = {**env, "RAY_API_SERVER_ADDRESS": dashboard, "DISTPG_CLUSTER_DIR": str(tmp_path / "nothing")}
    run_dir = str(tmp_path / "never")
    p = sh("cluster/submit.sh", "--no-wait", "configs/default.yaml", "--run-dir", run_dir,
           env={**bare, "RAY_AUTH_MODE": "disabled"}, timeout=60)
    assert p.returncode == 1 and "did not accept the job" in p.stderr and "Unauthorized" in p.stderr, p.stderr
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    p = sh("cluster/submit.sh", "--no-wait", "configs/default.yaml", "--run-dir", run_dir, env={
        **bare, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)}, timeout=60)
    assert p.returncode == 1 and "Forbidden" in p.stderr, p.stderr
    with pytest.raises(urllib.error.HTTPError) as e:  # the HTTP API itself, with no client in between
        urllib.request.urlopen(dashboard + "/api/jobs/", timeout=10)
    assert e.value.code == 401
    # the same request with the token is answered (the job submission with it: the test above)
    token = (cluster_dir / "auth_token").read_text().strip()
    req = urllib.request.Request(dashboard + "/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def test_train_without_the_token_says_how_to_set_it(cluster, tmp_path):
    """Both refused trains by cli.main one after the other in one process (one interpreter and torch import)."""
    env, cluster_dir, _ = cluster
    address = (cluster_dir / "address").read_text().strip()
    # a token, but not the cluster's: the message asks about the token instead
    (tmp_path / "token").write_text("not-the-clusters-token\n")
    wrong = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
    train = ["train", "--address", address, "--set", "run.steps=1", "--run-dir", str(tmp_path / "r")]
    p, with_wrong = distpg_commands((train, {}), (train, wrong), env=env, timeout=360)
    assert p.returncode != 0 and f"cannot connect to the Ray cluster at {address!r}" in p.stderr, p.stderr[-2000:]
    assert "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH" in p.stderr, p.stderr[-2000:]
    assert "it refused this client (RPC error: InvalidAuthToken" in p.stderr, p.stderr[-2000:]  # at once, no retries
    p = with_wrong
    assert p.returncode != 0 and "it refused this client" in p.stderr, p.stderr[-2000:]
    assert "is RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) the cluster's token?" in p.stderr, p.stderr[-2000:]


def test_doctor_names_the_address_ray_would_rewrite_and_finds_the_three_nodes(cluster):
    """Two `distpg doctor` runs, by cli.main one after the other in one process (one interpreter and torch
    import). 127.0.0.1:PORT answers, but Ray's client dials the routable address instead: say so, fast. The
    cluster's address (as a client has it): its three nodes and what they hold."""
    env, cluster_dir, gcs_port = cluster
    p, found = distpg_commands((["doctor", "--address", f"127.0.0.1:{gcs_port}", "--timeout", "120"], {}),
                               (["doctor", "configs/cluster.yaml", "--json"], {}),
                               env=client_env(env, cluster_dir), timeout=360)
    assert p.returncode == 1
    assert f"connect with LOCALHOST:{gcs_port}" in p.stdout, p.stdout + p.stderr  # the TCP probe's finding
    assert "default port 6379" not in p.stdout  # the cluster is up and this is its port: no hint otherwise
    # well before the 120 s connect timeout a failed ray.init would wait out (the margin: a loaded CI machine)
    assert p.seconds < 60

    p = found
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(p.stdout)
    nodes = report["nodes"]
    assert len(nodes) == 3 and all(n["alive"] for n in nodes)
    assert sorted(k for n in nodes for k in n["custom"]) == ["distpg_node_0", "distpg_node_1", "distpg_node_2"]
    assert [n["cpus"] for n in nodes] == [2, 2, 2] and sum(n["head"] for n in nodes) == 1
    assert all(n["object_store_bytes"] == 256 * 2**20 for n in nodes)
    assert all(n["torch"] and n["ray"] and n["python"] for n in nodes)
    text = " | ".join(t for _, t in report["findings"])
    assert "token authentication is on" in text and "listens on 127.0.0.1" in text and "fits" in text
    assert "the GCS (port" in text and "listens on ::ffff:127.0.0.1 only" in text
    assert not report["failed"]


def test_scale_on_the_cluster_sweeps_nodes(cluster, tmp_path):
    env, cluster_dir, _ = cluster
    out = tmp_path / "scale"
    # 6 workers fit on neither 1 nor 2 of the 2-CPU nodes: skipped, and said so in the files, not only on the console
    p = sh(sys.executable, "-m", "distpg", "scale", "--workers", "2,6", "--nodes", "1,2", "--steps", "3", "--warmup",
           "1", "--prompts-per-worker", "4", "--set", "task.length=4", "--out", str(out),
           env=client_env(env, cluster_dir), timeout=200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((out / "scaling.json").read_text())
    points = {(pt["nodes"], pt["workers"]): pt for pt in data["points"]}
    assert list(points) == [(1, 2), (1, 6), (2, 2), (2, 6)]  # as asked
    measured = [points[1, 2], points[2, 2]]
    assert points[1, 2]["nodes_used"] == 1 and points[2, 2]["nodes_used"] == 2  # pinned by node resources
    assert all(pt["rollout_tokens_per_s"] > 0 and pt["measured_steps"] == 2 and pt["skipped"] is None
               for pt in measured)
    for k in (1, 2):
        assert points[k, 6]["skipped"].startswith("does not fit the cluster: ") and "skipped, does not fit" in p.stdout
        assert points[k, 6]["rollout_tokens_per_s"] is None and points[k, 6]["efficiency"] is None
    assert points[1, 2]["efficiency"] == 1.0
    rows = list(csv.DictReader(open(out / "scaling.csv")))
    assert [(r["nodes"], r["workers"], bool(r["skipped"])) for r in rows] == [
        ("1", "2", False), ("1", "6", True), ("2", "2", False), ("2", "6", True)]
    assert (out / "scaling.png").stat().st_size > 10_000
    assert "3 node(s)" in data["where"]
    # what the table's throughput columns count, which differs by mode (a helper read async's as sync's)
    assert "tokens/s, traj/s: per second of the rollout phase; train traj/s: per second of the run" in p.stdout


def test_strict_spread_puts_each_actor_on_a_node_of_its_own_or_is_refused_up_front(cluster, tmp_path):
    """Both trains by cli.main one after the other in one process (one interpreter and torch import)."""
    env, cluster_dir, _ = cluster
    base = ["train", "--set", "ray.placement_strategy=STRICT_SPREAD", "--set", "run.steps=2", "--set",
            "task.length=4", "--set", "log.print_every=1"]
    run = tmp_path / "yes"
    # a learner and 3 workers on three nodes: Ray would wait for a fourth node; refused before any actor starts;
    # then half-CPU workers, which would share the learner's 2-CPU node under PACK, each get a node of their own
    p, yes = distpg_commands(([*base, "--set", "rollout.num_workers=3", "--run-dir", str(tmp_path / "no")], {}),
                             ([*base, "--run-dir", str(run)], {}), env=client_env(env, cluster_dir), timeout=320)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "ray.placement_strategy=STRICT_SPREAD" in p.stderr and "rollout.num_workers <= 2" in p.stderr
    assert "Traceback" not in p.stderr
    p = yes
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["workers/nodes"] for r in records] == [2, 2]


@pytest.mark.slow  # ~30 s of a multi-node chaos scenario; the default run kills workers in test_faults (chaos)
def test_training_survives_losing_a_worker_node(cluster, tmp_path):
    """Last in this module: it kills worker node 2 of the shared cluster mid-run. In the slow run only, as are
    the other node losses below (the one whose node joins again also ends with every sample consumed once)."""
    env, cluster_dir, _ = cluster
    run = tmp_path / "node-loss"
    cmd = [sys.executable, "-m", "distpg", "train", "--run-dir", str(run),
           "--set", "run.steps=40", "--set", "run.stop_reward=null", "--set", "ray.placement_strategy=SPREAD",
           "--set", "learner.node_resource=distpg_node_0", "--set", "rollout.num_workers=2",
           "--set", "rollout.num_cpus_per_worker=1", "--set", "log.ledger=true", "--set", "log.print_every=1",
           "--set", "rollout.timeout_s=60"]
    proc = train_on(cluster, cmd)
    metrics = run / "metrics.jsonl"
    wait_until(proc, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5)
    killed = sh("cluster/local-cluster.sh", "stop-node", "2", env=env)
    assert killed.returncode == 0, killed.stderr
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 41))
    assert recs[-1]["workers/restarts"] >= 1, "a worker ran on the lost node and was replaced"
    assert recs[-1]["workers/alive"] == 2
    ledger = pq.read_table(run / "ledger.parquet")
    keys = list(zip(ledger.column("prompt_id").to_pylist(), ledger.column("sample_idx").to_pylist()))
    assert len(keys) == len(set(keys)) == 40 * 32 * 8  # every sample consumed once across the node loss


@pytest.mark.slow
def test_a_node_loss_that_leaves_no_room_says_so_while_it_waits(cluster, tmp_path):
    """Last in this module, after the test above (which loses node 2; this one also runs alone, `-m slow`, so it
    stops node 2 itself where it is still up): losing node 1 too leaves the head's 2 CPUs for a run that reserves
    3. Ray declares a node dead only after missing its heartbeats for a while, later than the worker's death is
    seen, so the shortage must be said when it shows during the wait for a node, not only when the wait ends."""
    env, cluster_dir, _ = cluster
    sh("cluster/local-cluster.sh", "stop-node", "2", env=env)  # exit 1 where the test above already did
    run = tmp_path / "no-room"
    cmd = [sys.executable, "-m", "distpg", "train", "--run-dir", str(run), "--set", "run.steps=2000",
           "--set", "run.stop_reward=null", "--set", "learner.node_resource=distpg_node_0",
           "--set", "rollout.node_resource=distpg_node_1", "--set", "rollout.num_workers=2",
           "--set", "rollout.num_cpus_per_worker=1", "--set", "run.checkpoint_every=2", "--set", "ray.timeout_s=60"]
    proc = train_on(cluster, cmd)
    wait_until(proc, (run / "checkpoints" / "latest").exists)
    killed = sh("cluster/local-cluster.sh", "stop-node", "1", env=env)
    assert killed.returncode == 0, killed.stderr
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 1, out[-4000:]
    waiting = [line for line in out.splitlines() if "waiting up to ray.timeout_s=60s for a node to join" in line]
    assert waiting and "the run reserves 3 CPUs and the cluster's live nodes have 2" in waiting[0], out[-4000:]
    assert out.index(waiting[0]) < out.index("did not start within ray.timeout_s=60s"), out[-4000:]
    assert f"continue with: distpg train --resume {run}" in out, out[-2000:]


@pytest.mark.slow
def test_a_run_that_lost_its_workers_node_goes_on_once_the_node_joins_again(cluster, tmp_path):
    """`local-cluster.sh start-node` brings a lost worker node back (it also runs alone, `-m slow`, so it restarts
    node 1 first, whatever the tests before left): a run whose workers are pinned to node 1 loses them with the
    node, waits for room to replace them, and goes on once the node has joined again, to its last step, every
    sample consumed once."""
    env, cluster_dir, _ = cluster
    sh("cluster/local-cluster.sh", "stop-node", "1", env=env)  # exit 1 where it is down already
    joined = sh("cluster/local-cluster.sh", "start-node", "1", env=env)
    assert joined.returncode == 0 and "node 1 joined" in joined.stdout, joined.stdout + joined.stderr
    again = sh("cluster/local-cluster.sh", "start-node", "1", env=env)
    assert again.returncode == 1 and "node 1 is running already" in again.stderr
    run = tmp_path / "rejoin"
    cmd = [sys.executable, "-m", "distpg", "train", "--run-dir", str(run), "--set", "run.steps=30",
           "--set", "run.stop_reward=null", "--set", "learner.node_resource=distpg_node_0",
           "--set", "rollout.node_resource=distpg_node_1", "--set", "rollout.num_workers=2",
           "--set", "rollout.num_cpus_per_worker=1", "--set", "ray.timeout_s=120", "--set", "log.ledger=true",
           "--set", "log.print_every=1", "--set", "rollout.timeout_s=60"]
    proc = train_on(cluster, cmd)
    metrics = run / "metrics.jsonl"
    wait_until(proc, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5)
    killed = sh("cluster/local-cluster.sh", "stop-node", "1", env=env)
    assert killed.returncode == 0, killed.stderr
    time.sleep(2)
    joined = sh("cluster/local-cluster.sh", "start-node", "1", env=env)
    assert joined.returncode == 0, joined.stdout + joined.stderr
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 31))
    assert recs[-1]["workers/restarts"] >= 2 and recs[-1]["workers/alive"] == 2, out[-4000:]  # both replaced
    ledger = pq.read_table(run / "ledger.parquet")
    keys = list(zip(ledger.column("prompt_id").to_pylist(), ledger.column("sample_idx").to_pylist()))
    assert len(keys) == len(set(keys)) == 30 * 32 * 8


@pytest.mark.slow
def test_losing_the_head_node_ends_the_run_with_the_resume_hint_before_ray_ends_it(tmp_path):
    """The head's GCS killed mid-run, its raylet left (as for a driver on a node that survives the head): the
    run steps on, and Ray ends the driver from C++ after RAY_gcs_rpc_server_reconnect_timeout_s (60 s by
    default) with exit status 1 and only its own log line. distpg says what was lost and how to go on a few
    seconds before (here with Ray's timeout at 10 s), and the run resumed on a new cluster ends at its last step.
    Its own clusters: the GCS does not come back."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "distpg", "train", "--run-dir", str(run), "--set", "run.steps=60",
           "--set", "run.stop_reward=null", "--set", "task.length=4", "--set", "run.checkpoint_every=2",
           "--set", "learner.node_resource=distpg_node_1", "--set", "rollout.num_workers=1"]
    with running_cluster(1, "hl") as (env, cluster_dir, _):
        proc = subprocess.Popen(cmd, env={**client_env(env, cluster_dir), "PYTHONPATH": str(ROOT),
                                          "RAY_gcs_rpc_server_reconnect_timeout_s": "10"},
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(proc, (run / "checkpoints" / "latest").exists)
        gcs = subprocess.run(["pgrep", "-f", f"gcs_server --log_dir={cluster_dir}/node_0/"], capture_output=True,
                             text=True).stdout.split()
        assert len(gcs) == 1 and proc.poll() is None, gcs
        os.kill(int(gcs[0]), signal.SIGKILL)
        t0 = time.perf_counter()
        out, _ = proc.communicate(timeout=120)
        took = time.perf_counter() - t0
    assert proc.returncode == 1, out[-4000:]
    assert "distpg: training failed: lost the Ray head node: its GCS at LOCALHOST:" in out, out[-4000:]
    assert "Ray ends this driver at 10s (RAY_gcs_rpc_server_reconnect_timeout_s)" in out
    assert f"continue with: distpg train --resume {run}" in out and "Failed to connect to GCS" not in out, out[-3000:]
    assert 4 < took < 10, took  # from 5 s of silence on; Ray's own end would come at 10 s
    with running_cluster(1, "hl2") as (env, cluster_dir, _):
        p = sh(sys.executable, "-m", "distpg", "train", "--resume", str(run),
               env={**client_env(env, cluster_dir), "PYTHONPATH": str(ROOT)}, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "done after 60 steps" in p.stdout


@pytest.mark.slow
def test_losing_the_head_node_during_a_sweep_names_the_point_and_the_runs_done(tmp_path):
    """As above, in a `distpg scale` sweep: its message said `distpg train --resume` the running point's folder,
    which a sweep cannot use. It names the point, its run folder and the runs done before it, and says to run the
    sweep again. The second point (2 workers) loses the head's GCS once it has logged a step."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "distpg", "scale", "--workers", "1,2", "--nodes", "none", "--steps", "40",
           "--warmup", "1", "--out", str(out), "--set", "task.length=4", "--set", "learner.node_resource=distpg_node_1"]
    with running_cluster(1, "hs") as (env, cluster_dir, _):
        proc = subprocess.Popen(cmd, env={**client_env(env, cluster_dir), "PYTHONPATH": str(ROOT),
                                          "RAY_gcs_rpc_server_reconnect_timeout_s": "10"},
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(proc, (out / "runs" / "w2" / "metrics.jsonl").exists, timeout=300)
        gcs = subprocess.run(["pgrep", "-f", f"gcs_server --log_dir={cluster_dir}/node_0/"], capture_output=True,
                             text=True).stdout.split()
        assert len(gcs) == 1 and proc.poll() is None, gcs
        os.kill(int(gcs[0]), signal.SIGKILL)
        out_text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out_text[-4000:]
    assert "distpg: training failed: lost the Ray head node" in out_text, out_text[-4000:]
    runs = out / "runs"
    assert (f"Restart the cluster; the sweep (distpg scale) was measuring 2 worker(s), run folder {runs / 'w2'}; "
            f"the runs done before it (w1) are in {runs}") in out_text, out_text[-3000:]
    assert "--resume" not in out_text and not (out / "scaling.json").exists()
