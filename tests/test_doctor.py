"""`distpg doctor` without a cluster: how it judges what it found, how fast it gives up on a bad address, and a
real run against the local runtime `distpg train` would start. (Against a 3-node cluster: test_cluster.py.)"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distpg import kernels
from distpg.doctor import FAIL, OK, WARN, Report, _listeners, format_report, judge_nodes
from tests.conftest import distpg_commands

ROOT = Path(__file__).resolve().parent.parent


def node(**kw):
    import platform

    import ray
    import torch

    base = {"node_id": "a" * 56, "address": "10.0.0.1:1234", "alive": True, "head": True, "cpus": 8, "gpus": 0,
            "object_store_bytes": 2**30, "memory_bytes": 2**34, "custom": {}, "python": platform.python_version(),
            "ray": ray.__version__, "torch": torch.__version__}
    return {**base, **kw}


def levels(report):
    return [level for level, _ in report.findings]


def test_matching_nodes_are_ok():
    r = Report("test", nodes=[node(), node(node_id="b" * 56, head=False, gpus=1, cuda_devices=1)])
    judge_nodes(r)
    assert levels(r) == [OK] * 4 and "2 alive node(s): 16 CPUs, 1 GPUs, 2.0 GiB object store" in r.findings[0][1]
    assert not r.failed


def test_a_version_mismatch_is_a_warning_and_a_node_without_torch_a_failure():
    r = Report("test", nodes=[node(), node(node_id="b" * 56, python="3.10.1")])
    judge_nodes(r)
    assert levels(r).count(WARN) == 1 and not r.failed
    assert any("python versions differ" in t and "bbbbbbbb=3.10.1" in t for _, t in r.findings)
    r = Report("test", nodes=[node(), node(node_id="b" * 56, torch=None)])
    judge_nodes(r)
    assert r.failed and any("bbbbbbbb" in t and "cannot import torch" in t for lv, t in r.findings if lv == FAIL)
    r = Report("test", nodes=[node(error="a task pinned to this node did not finish within 5s")])
    judge_nodes(r)
    assert r.failed and "cannot run tasks" in format_report(r)


def test_a_node_without_cpu_kernels_is_a_warning():
    r = Report("test", nodes=[node(cpu_kernels="C (/x/decode.so)"),
                              node(node_id="b" * 56, cpu_kernels="off: no C compiler on PATH (set CC)")])
    judge_nodes(r)
    warns = [t for lv, t in r.findings if lv == WARN]
    assert not r.failed and len(warns) == 1 and "bbbbbbbb" in warns[0] and "no C compiler" in warns[0]
    table = format_report(r)
    assert "CPU kernels" in table and " off " in table and " C " in table


def test_no_alive_node_is_a_failure():
    r = Report("test", nodes=[node(alive=False)])
    judge_nodes(r)
    assert r.failed and "no alive nodes" in r.findings[0][1]


def test_listeners_reads_the_bound_address_from_proc():
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert _listeners(s.getsockname()[1]) == ["127.0.0.1"]


def test_a_bad_address_fails_fast_with_a_clear_message(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # ray.init alone would retry for minutes: the 60 s limit of the process would stop it first
    run = tmp_path / "run"
    doctor_, train, malformed = distpg_commands(
        (["doctor", "--address", f"LOCALHOST:{port}"], {}),
        # `distpg train` checks the address the same way before ray.init
        (["train", "--address", f"LOCALHOST:{port}", "--run-dir", str(run)], {}),
        (["doctor", "--address", "headnode"], {}), timeout=60)
    p = doctor_
    assert p.returncode == 1
    assert f"cannot reach the Ray cluster at 'LOCALHOST:{port}' (from --address): Connection refused" in p.stdout, \
        p.stdout + p.stderr
    p = train
    assert p.returncode != 0 and f"cannot reach the Ray cluster at 'LOCALHOST:{port}'" in p.stderr, p.stderr[-2000:]
    assert not run.exists()  # a run that never started leaves no folder behind
    p = malformed
    assert p.returncode == 1 and "--address 'headnode' is not HOST:PORT" in p.stdout


def test_the_addresses_ray_init_takes_besides_host_port_are_tried_as_distpg_train_tries_them(monkeypatch):
    """RAY_ADDRESS=auto (Ray's 'the cluster running on this machine') and ray://: `distpg train` hands them to
    ray.init, while doctor refused them as 'not HOST:PORT', so it could not check the cluster a run would use."""
    import ray

    from distpg import doctor

    tried = []

    def init(address=None, **kwargs):
        tried.append(address)
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(ray, "init", init)
    for address in ("auto", "ray://headnode:10001"):
        says = f"cannot connect to the Ray cluster at '{address}' (from --address): ConnectionError: Could not find"
        with pytest.raises(doctor.DoctorError, match=re.escape(says)):
            doctor.connect(address, timeout=30, source="--address")
    assert tried == ["auto", "ray://headnode:10001"]
    # RAY_ADDRESS=auto left exported: `distpg train` says where the address came from
    from distpg.orchestrator import TrainingError, init_ray
    from tests.conftest import small_config

    monkeypatch.setenv("RAY_ADDRESS", "auto")
    says = "cannot connect to the Ray cluster at 'auto' (from $RAY_ADDRESS): Could not find any running Ray instance"
    with pytest.raises(TrainingError, match=re.escape(says)):
        init_ray(small_config(), None)
    assert tried[-1] == "auto"


@pytest.mark.parametrize("flag, setting, env, named", [
    ("headnode", "LOCALHOST:1", "LOCALHOST:1", "--address 'headnode'"),
    (None, "headnode", "LOCALHOST:1", "ray.address 'headnode'"),  # the config's field before the environment's
    (None, None, "headnode", "$RAY_ADDRESS 'headnode'"),
    # the job API server's address where the GCS's belongs: Ray's message of it, many lines, was cut to its first
    # by doctor ("To fix this, either:") and said RAY_ADDRESS for an --address
    ("http://127.0.0.1:8265", None, "LOCALHOST:1", "--address 'http://127.0.0.1:8265' is an HTTP address"),
    (None, "HTTPS://head:8265", "LOCALHOST:1", "ray.address 'HTTPS://head:8265' is an HTTP address"),
])
def test_a_malformed_address_is_named_by_what_gave_it(flag, setting, env, named, monkeypatch, capsys, tmp_path):
    """The "is not HOST:PORT" message of `distpg train`, `doctor` and `scale` said --address also where the address
    came from the config or $RAY_ADDRESS. Each fails before Ray is started."""
    from distpg.cli import main
    from distpg.orchestrator import TrainingError, init_ray
    from tests.conftest import small_config

    monkeypatch.setenv("RAY_ADDRESS", env)
    says = named if "HTTP" in named else f"{named} is not HOST:PORT"
    overrides = [] if setting is None else [f"ray.address={setting}"]
    with pytest.raises(TrainingError, match=re.escape(says)):  # where `distpg train` joins the cluster
        init_ray(small_config(*overrides), flag)
    args = ([] if flag is None else ["--address", flag]) + [a for o in overrides for a in ("--set", o)]
    assert main(["doctor", *args]) == 1 and says in capsys.readouterr().out
    assert main(["scale", *args, "--out", str(tmp_path / "scale")]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("flag, setting, env, source", [
    ("CLOSED", "LOCALHOST:1", "LOCALHOST:1", "--address"),
    (None, "CLOSED", "LOCALHOST:1", "ray.address"),  # the config's field before the environment's
    (None, None, "CLOSED", "$RAY_ADDRESS"),
])
def test_an_unreachable_address_is_named_by_what_gave_it(flag, setting, env, source, monkeypatch, capsys, tmp_path):
    """"cannot reach the Ray cluster at X" of `distpg train`, `doctor` and `scale` did not say where X came from:
    an old exported $RAY_ADDRESS looks like a cluster that is down. Each fails before Ray is started."""
    from distpg.cli import main
    from distpg.orchestrator import TrainingError, init_ray
    from tests.conftest import small_config

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"LOCALHOST:{s.getsockname()[1]}"
    flag, setting, env = (closed if v == "CLOSED" else v for v in (flag, setting, env))
    monkeypatch.setenv("RAY_ADDRESS", env)
    says = f"cannot reach the Ray cluster at {closed!r} (from {source}): Connection refused"
    stale = "$RAY_ADDRESS of this environment named it: is it left from an earlier cluster"
    overrides = [] if setting is None else [f"ray.address={setting}"]
    with pytest.raises(TrainingError, match=re.escape(says)) as e:  # where `distpg train` joins the cluster
        init_ray(small_config(*overrides), flag)
    assert (stale in str(e.value)) == (source == "$RAY_ADDRESS"), str(e.value)
    args = ([] if flag is None else ["--address", flag]) + [a for o in overrides for a in ("--set", o)]
    assert main(["doctor", *args]) == 1 and says in capsys.readouterr().out
    assert main(["scale", *args, "--out", str(tmp_path / "scale")]) == 2
    assert says in capsys.readouterr().err


def test_the_dashboard_port_given_as_the_gcs_address_fails_fast_naming_it(tmp_path):
    """HOST:8265 (the dashboard, RAY_API_SERVER_ADDRESS's port) as --address: it accepts the TCP connect, so
    ray.init would retry it as a GCS for many minutes; here an HTTP server stands in for the dashboard."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"LOCALHOST:{server.server_address[1]}"
    try:
        run = tmp_path / "run"
        p, train = distpg_commands((["doctor", "--address", address, "--timeout", "30"], {}),
                                   (["train", "--address", address, "--run-dir", str(run)], {}), timeout=90)
        assert p.returncode == 1 and f"{address!r} (from --address) is an HTTP server" in p.stdout, \
            p.stdout + p.stderr[-2000:]
        assert "RAY_API_SERVER_ADDRESS" in p.stdout and "the GCS address" in p.stdout
        p = train
        assert p.returncode != 0 and f"{address!r} (from --address) is an HTTP server" in p.stderr, p.stderr[-2000:]
        assert not run.exists()
    finally:
        server.shutdown()
        server.server_close()


def test_a_token_file_that_cannot_be_read_is_named_instead_of_crashing(tmp_path):
    """RAY_AUTH_MODE=token with RAY_AUTH_TOKEN_PATH naming a missing (or empty) file: Ray's GCS client aborts the
    process with a C++ check and its stack trace, and `distpg train` left its half-made run folder behind."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))  # accepts and hangs up: reaches the GCS client

    def serve():
        while True:
            try:
                listener.accept()[0].close()
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    address = f"LOCALHOST:{listener.getsockname()[1]}"
    (tmp_path / "empty").write_text("")
    try:
        run = tmp_path / "run"
        token_files = (tmp_path / "missing", tmp_path / "empty")
        commands = []
        for token_file in token_files:
            env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
            commands += [(["doctor", "--address", address, "--timeout", "30"], env),
                         (["train", "--address", address, "--run-dir", str(run)], env)]
        done = distpg_commands(*commands, timeout=120)
        for i, token_file in enumerate(token_files):
            p = done[2 * i]
            assert p.returncode == 1 and "Check failed" not in p.stdout + p.stderr, p.stdout + p.stderr[-2000:]
            assert f"RAY_AUTH_TOKEN_PATH is set but file cannot be opened or is empty: {token_file}" in p.stdout
            p = done[2 * i + 1]
            assert p.returncode == 1 and "Check failed" not in p.stderr, p.stderr[-2000:]
            assert f"file cannot be opened or is empty: {token_file}" in p.stderr and not run.exists()
    finally:
        listener.close()


DOCTOR_LOOKING = """
import json, os, sys
import ray
import psutil  # Ray's own copy (ray/thirdparty_files), on the path once ray is imported
from ray._private import ray_constants
from distpg import doctor
from distpg.cli import main
seen = {}
check_gcs = doctor.check_gcs
def look_then_check_gcs(report):  # the runtime is up and has run doctor's tasks (worker processes too)
    tree = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    seen["listening"] = sorted({c.laddr.ip for c in psutil.net_connections("tcp")
                                if c.status == "LISTEN" and c.pid in tree})
    seen["node_ip"] = ray.util.get_node_ip_address()
    return check_gcs(report)
doctor.check_gcs = look_then_check_gcs
code = main(sys.argv[1:])
seen["restored"] = ray_constants.ENABLE_RAY_CLUSTER and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
print(json.dumps(seen))
sys.exit(code)
"""


@pytest.mark.ray
def test_the_local_runtime_listens_on_loopback_only_and_doctor_reports_it_and_a_config_that_does_not_fit():
    """`distpg doctor` with no address starts the local runtime `distpg train` would start (by `cli.main` in a
    process of its own, which also looks at the runtime while it is up: one runtime for what two showed). Every
    process of that runtime, its workers too, listens on loopback only; Ray's own default is back afterwards; and
    the report names the node and the config's finding."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    p = subprocess.run([sys.executable, "-c", DOCTOR_LOOKING, "doctor", "--set", "rollout.num_workers=16", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=180, env={**env, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]  # the config does not fit: a failure
    lines = p.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["node_ip"] == "127.0.0.1"
    assert out["listening"] and all(a in ("127.0.0.1", "::ffff:127.0.0.1") for a in out["listening"]), out
    assert out["restored"]  # a later ray.init(address=...) in the same process sees Ray's own default

    report = json.loads("\n".join(lines[:-1]))
    (n,) = report["nodes"]
    assert n["alive"] and n["head"] and n["cpus"] == os.cpu_count() and n["torch"] and n["ray"]
    if kernels.compiler():  # built (or found built) on the node by the probe
        assert n["cpu_kernels"].startswith("C ("), n
    findings = report["findings"]
    assert [lv for lv, t in findings if "listens on 127.0.0.1" in t] == [OK], findings
    assert any("token authentication is" in t for _, t in findings), findings
    assert [lv for lv, t in findings if "does not fit" in t] == [FAIL], findings
    assert all(lv == OK for lv, t in findings if "versions" in t or " on the driver and every node" in t)
    assert any("the GCS (port" in t for _, t in findings), findings  # a local runtime: on this machine


def test_actor_lines_come_without_colour_codes_where_stdout_is_no_terminal(monkeypatch):
    """Ray wraps the actors' lines it forwards in terminal colour codes, also into a file or a pipe (a helper's
    piped run read ESC[36m(RolloutWorker pid=...)ESC[0m): RAY_COLOR_PREFIX=0 there, unless the user set it."""
    import io

    from distpg.doctor import ray_env_defaults

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    ray_env_defaults()
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")  # the user's own choice stays
    ray_env_defaults()
    assert os.environ["RAY_COLOR_PREFIX"] == "1"
    monkeypatch.delenv("RAY_COLOR_PREFIX")
    master, terminal = os.openpty()
    with open(terminal, "w") as tty, open(master, "rb"):
        monkeypatch.setattr(sys, "stdout", tty)
        ray_env_defaults()
        assert "RAY_COLOR_PREFIX" not in os.environ  # on a terminal, Ray's colours


ACTOR_PRINTS = """
import ray
from distpg.orchestrator import start_local_ray, stop_local_ray
start_local_ray(num_cpus=1, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
@ray.remote(num_cpus=0)
class Speaker:
    def say(self):
        print("hello from the actor", flush=True)
a = Speaker.remote()
ray.get(a.say.remote())
import time; time.sleep(2)  # the line reaches the driver through the log monitor
stop_local_ray()
"""


@pytest.mark.slow  # ~10 s: a local runtime; the default run checks the setting (the test above)
def test_a_piped_runs_actor_lines_carry_no_colour_codes():
    p = subprocess.run([sys.executable, "-c", ACTOR_PRINTS], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={**{k: v for k, v in os.environ.items() if k != "RAY_COLOR_PREFIX"},
                                      "PYTHONPATH": str(ROOT)})
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "hello from the actor" in out, out[-2000:]
    assert "\x1b[" not in out, out[-2000:]
