"""`distpg doctor`: check a Ray cluster (or the local runtime `distpg train` would start) before a long run.

It reports every node (address, CPUs, GPUs, object store and memory, custom resources) and, from a tiny task
pinned to each node, the Python, Ray and torch versions that node runs and whether its CPU decode kernels build
(`distpg.kernels`, built there for that CPU; a node without them samples slower: warn); whether the dashboard
listens on loopback only; whether the cluster demands a token (an HTTP request without one is refused); and, given a
config, whether the run's actors fit. Each finding is `ok`, `warn` (the run can go on: a version mismatch,
authentication off, a dashboard open to the network) or `FAIL` (the run would fail: the cluster cannot be
reached, a node cannot run tasks or lacks torch, the config does not fit). The exit code is 1 when any
finding is FAIL, else 0.

Every wait has a timeout. An address nothing listens on, or where an HTTP server (the dashboard) answers, fails
within about a second (a TCP probe comes before `ray.init`, which would otherwise retry for minutes).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import ray

from distpg.config import Config, ConfigError

OK, WARN, FAIL = "ok", "warn", "FAIL"
BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")


class DoctorError(RuntimeError):
    """The cluster cannot be checked at all (unreachable, refused); the message says why and what to do."""


@dataclass
class Report:
    address: str
    nodes: list[dict] = field(default_factory=list)
    findings: list[tuple[str, str]] = field(default_factory=list)  # (level, text)

    def add(self, level: str, text: str) -> None:
        self.findings.append((level, text))

    @property
    def failed(self) -> bool:
        return any(level == FAIL for level, _ in self.findings)


# ------------------------------------------------------------------------------------------ connecting


def auth_hint() -> str:
    """What to add to a failed connection's message when token authentication is not set up here."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return ""
    return ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH "
            "(cluster/local-cluster.sh writes $DISTPG_CLUSTER_DIR/auth_token)")


def named_address(flag: str | None, configured: str | None) -> tuple[str | None, str]:
    """The cluster to join and what named it, for messages about it: `flag` (--address), else `configured`
    (the config's ray.address), else $RAY_ADDRESS. (None, ""): none did; a local runtime is started."""
    named = ((flag, "--address"), (configured, "ray.address"), (os.environ.get("RAY_ADDRESS"), "$RAY_ADDRESS"))
    return next(((address, source) for address, source in named if address), (None, ""))


def probe(address: str, timeout: float, source: str) -> None:
    """Fail fast on an address nothing listens on: a TCP connect to the GCS, then to the address Ray itself
    would dial (its CLI and ray.init rewrite 127.0.0.1 and localhost to the machine's routable address).
    `source`: what named the address (`named_address`), which every message of a bad address names: an address
    from an old exported $RAY_ADDRESS looks like one the user meant."""
    from ray._common.network_utils import parse_address
    from ray._private.services import canonicalize_bootstrap_address

    token_check()
    if address.lower().startswith(("http://", "https://")):  # Ray's own message of it was cut to its first line
        raise DoctorError(f"{source} {address!r} is an HTTP address (the dashboard's or the job API server's, "
                          "which `ray job submit` takes): give the GCS address, HOST:PORT, e.g. the RAY_ADDRESS "
                          "that cluster/local-cluster.sh prints, or 10.0.0.5:6379")
    parsed = parse_address(address) if ":" in address else None
    if parsed is None or not str(parsed[1]).isdigit():
        raise DoctorError(f"{source} {address!r} is not HOST:PORT (the GCS address, e.g. the RAY_ADDRESS "
                          "that cluster/local-cluster.sh prints, or 10.0.0.5:6379)")
    host, port = parsed[0], int(parsed[1])
    named = address_text(address, source)
    stale = ("; is the cluster up? $RAY_ADDRESS of this environment named it: is it left from an earlier cluster "
             "(unset it, or name the cluster with --address)?")  # an export outlives the cluster it named
    _tcp(host, port, timeout, f"cannot reach the Ray cluster at {named}",
         hint=stale if source == "$RAY_ADDRESS" else UNREACHABLE_HINT)
    _not_http(host, port, timeout, named)
    dialed = canonicalize_bootstrap_address(address)
    if dialed and dialed != address:
        dhost, dport = parse_address(dialed)
        _tcp(dhost, int(dport), timeout,
             f"{named} answers, but Ray rewrites it to {dialed!r}, where nothing listens: the cluster listens "
             f"on loopback only; connect with LOCALHOST:{port} (the form cluster/local-cluster.sh prints)", hint="")
    _authenticate(dialed or address, named, timeout)


def address_text(address: str | None, source: str) -> str:
    """An address as messages name it: with what named it (`named_address`'s source), where known."""
    return f"{address!r} (from {source})" if source else repr(address)


def token_check() -> None:
    """With RAY_AUTH_MODE=token, fail where this client has no token to send: RAY_AUTH_TOKEN_PATH naming a file
    that is missing, unreadable or empty, or neither it, RAY_AUTH_TOKEN nor ~/.ray/auth_token set. Ray's GCS
    client aborts the whole process on that (a failed C++ check and its stack trace), before any message."""
    try:
        from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode
        from ray.exceptions import AuthenticationError
    except ImportError:  # another Ray: ray.init says it, later
        return
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        return
    try:
        if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
            return
        reason = "neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set, and ~/.ray/auth_token does not exist"
    except AuthenticationError as e:
        reason = str(e).split(". ")[0]
    raise DoctorError(f"RAY_AUTH_MODE=token, and this client has no token to send ({reason}); set "
                      "RAY_AUTH_TOKEN_PATH to a file holding the cluster's token (cluster/local-cluster.sh writes "
                      "$DISTPG_CLUSTER_DIR/auth_token) or RAY_AUTH_TOKEN to the token itself")


def _not_http(host: str, port: int, timeout: float, named: str) -> None:
    """Fail fast where an HTTP server answers, most often the dashboard (RAY_API_SERVER_ADDRESS, port 8265)
    given as the GCS address: it accepts the TCP connect, and ray.init would retry it for many minutes. The GCS
    speaks gRPC (HTTP/2), which answers an HTTP/1 request with a frame; an HTTP/1 server answers it with a status
    line. No answer within `timeout` is left to ray.init. `named`: the address as messages name it
    (`address_text`)."""
    head = b""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            while len(head) < 5 and (chunk := s.recv(5 - len(head))):
                head += chunk
    except OSError:
        return
    if head == b"HTTP/":
        raise DoctorError(f"{named} is an HTTP server, not a Ray GCS: is it the dashboard (RAY_API_SERVER_ADDRESS, "
                          "port 8265 by default), which takes `ray job submit` and cluster/submit.sh? --address, "
                          "ray.address and RAY_ADDRESS take the GCS address (the RAY_ADDRESS that "
                          "cluster/local-cluster.sh prints, port 6379 by default)")


def _authenticate(dialed: str, named: str, timeout: float) -> None:
    """Fail fast where the cluster refuses this client's token (or its lack of one): ray.init retries that
    for about 20 seconds before it gives up. A GCS client answers within milliseconds; anything else it meets
    (or no answer within `timeout`) is left to ray.init to report. `named`: the address as messages name it."""
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # another Ray: ray.init says it, later
        return
    refused: list[str] = []

    def connect() -> None:
        try:
            GcsClient(address=dialed)
        except AuthenticationError as e:
            refused.append(str(e).split(". ")[0])
        except Exception:  # noqa: BLE001 - not ours to judge: ray.init reports it
            pass

    checker = threading.Thread(target=connect, daemon=True, name="distpg-auth-probe")
    checker.start()
    checker.join(timeout)
    if refused:
        raise DoctorError(f"cannot connect to the Ray cluster at {named}: it refused this client ({refused[0]})"
                          + (auth_hint() or "; RAY_AUTH_MODE=token is set here: is RAY_AUTH_TOKEN_PATH (or "
                             "RAY_AUTH_TOKEN) the cluster's token?"))


UNREACHABLE_HINT = "; is the cluster up, and is this its GCS address (default port 6379)?"


def _tcp(host: str, port: int, timeout: float, what: str, hint: str = UNREACHABLE_HINT) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise DoctorError(f"{what}: {reason} (TCP connect to {host}:{port}, {timeout:g}s timeout){hint}") from None


# Ray's defaults that distpg changes for the Ray processes it starts (the driver, and a local runtime's, which
# inherit its environment); a value set in the environment wins. Task events: a driver's core worker flushes them
# to the GCS on ray.shutdown and waits up to 5 s for it, all of which it spends when the GCS is gone (a
# scheduler's signal to every process of the job, a lost head); a live GCS takes them in milliseconds.
RAY_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_task_events_shutdown_flush_timeout_ms": "500"}


def ray_env_defaults() -> None:
    """Put `RAY_ENV_DEFAULTS` in this process's environment where it sets none of them, before ray.init; and where
    standard output is no terminal (a file, a pipe, a job's log), RAY_COLOR_PREFIX=0: the actors' lines that Ray
    forwards to the driver come without the terminal colour codes it wraps them in otherwise (seen in a helper's
    piped output as ESC[36m(RolloutWorker pid=...)ESC[0m)."""
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        terminal = sys.stdout.isatty()
    except (AttributeError, ValueError):  # no stdout, or a closed one
        terminal = False
    if not terminal:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def connect(address: str | None, timeout: float, source: str) -> str | None:
    """Join the cluster at `address` (named by `source`: see `named_address`), or start a local runtime as
    `distpg train` would (dashboard on 127.0.0.1). Returns the dashboard URL. A connect that outlives `timeout`
    ends the process with exit 1: ray.init cannot be interrupted otherwise."""
    ray_env_defaults()
    if address and address != "auto" and not address.startswith("ray://"):  # as `distpg train` (init_ray) probes it
        probe(address, min(timeout, 5.0), source)
    done = threading.Event()

    def give_up() -> None:
        if not done.is_set():
            where = address_text(address, source) if address else "a local Ray runtime"
            print(f"distpg doctor: FAIL: connecting to {where} did not finish within "
                  f"{timeout:g}s (--timeout): what answers there may not be a Ray GCS, or the cluster refuses this "
                  "client (token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH)",
                  file=sys.stderr, flush=True)
            os._exit(1)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        if address:
            from distpg.stopping import kept_across_ray_init

            with kept_across_ray_init():  # a `distpg scale` on a cluster keeps its SIGTERM and SIGHUP handlers
                ctx = ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        else:
            from distpg.orchestrator import start_local_ray

            ctx = start_local_ray(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                                  logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, ray.exceptions.RayError, RuntimeError, ValueError) as e:
        raise DoctorError(f"cannot connect to the Ray cluster at {address_text(address, source)}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{auth_hint()}") from None
    finally:
        done.set()
        watchdog.cancel()
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


# --------------------------------------------------------------------------------------------- checks


def _versions() -> dict:
    """Runs on each node."""
    out = {"python": platform.python_version(), "ray": ray.__version__, "host": socket.gethostname(),
           "cores": os.cpu_count()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda_devices"] = torch.cuda.device_count()
    except ImportError:
        out["torch"] = None
        return out
    try:  # builds the CPU decode kernels for this node's CPU, or says why it cannot (distpg.kernels)
        from distpg import kernels

        out["cpu_kernels"] = kernels.status()
    except ImportError as e:
        out["cpu_kernels"] = f"off: distpg cannot be imported here ({e})"
    return out


def inspect_nodes(report: Report, timeout: float) -> None:
    """One row per node, and the version probe on each alive one."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe_task = ray.remote(num_cpus=0)(_versions)
    nodes = ray.nodes()
    refs = {}
    for n in nodes:
        if n.get("Alive"):
            refs[n["NodeID"]] = probe_task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    ready = set(ready)
    for n in nodes:
        res = n.get("Resources", {})
        row = {
            "node_id": n["NodeID"], "address": f"{n.get('NodeManagerAddress')}:{n.get('NodeManagerPort')}",
            "alive": bool(n.get("Alive")), "head": "node:__internal_head__" in res,
            "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0),
            "object_store_bytes": res.get("object_store_memory", 0), "memory_bytes": res.get("memory", 0),
            "custom": {k: v for k, v in sorted(res.items()) if k not in BUILTIN and not k.startswith("node:")},
        }
        ref = refs.get(n["NodeID"])
        if ref is not None and ref in ready:
            try:
                row.update(ray.get(ref, timeout=timeout))
            except ray.exceptions.RayError as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        elif ref is not None:
            row["error"] = f"a task pinned to this node did not finish within {timeout:g}s"
        report.nodes.append(row)
    report.nodes.sort(key=lambda r: (not r["head"], not r["alive"], sorted(r["custom"]), r["address"]))


def judge_nodes(report: Report) -> None:
    alive = [n for n in report.nodes if n["alive"]]
    dead = len(report.nodes) - len(alive)
    if not alive:
        report.add(FAIL, "the cluster has no alive nodes")
        return
    cpus, gpus = sum(n["cpus"] for n in alive), sum(n["gpus"] for n in alive)
    store = sum(n["object_store_bytes"] for n in alive)
    report.add(OK if cpus > 0 else FAIL, f"{len(alive)} alive node(s): {cpus:g} CPUs, {gpus:g} GPUs, "
               f"{_size(store)} object store" + ("" if cpus > 0 else "; no CPUs: no actor can start"))
    if dead:
        report.add(WARN, f"{dead} dead node(s) are still listed by the GCS")
    for n in alive:
        if "error" in n:
            report.add(FAIL, f"node {n['node_id'][:8]} ({n['address']}) cannot run tasks: {n['error']}")
        elif n.get("torch") is None:
            report.add(FAIL, f"node {n['node_id'][:8]} ({n['address']}) cannot import torch; install distpg's "
                             "dependencies on every node")
        elif n["gpus"] and not n.get("cuda_devices"):
            report.add(WARN, f"node {n['node_id'][:8]} declares {n['gpus']:g} GPUs but torch sees no CUDA device")
        if str(n.get("cpu_kernels", "")).startswith("off"):
            report.add(WARN, f"node {n['node_id'][:8]} ({n['address']}) samples on its CPUs with PyTorch ops, "
                             f"slower: its CPU decode kernels are {n['cpu_kernels']} (see rollout.cpu_kernels)")
    here = {"python": platform.python_version(), "ray": ray.__version__}
    try:
        import torch

        here["torch"] = torch.__version__
    except ImportError:
        here["torch"] = None
    for key in ("python", "ray", "torch"):
        seen = {n.get(key) for n in alive if "error" not in n} | {here[key]}
        if len(seen) > 1:
            per_node = ", ".join(f"{n['node_id'][:8]}={n.get(key)}" for n in alive if "error" not in n)
            report.add(WARN, f"{key} versions differ: driver={here[key]}, {per_node}")
        else:
            report.add(OK, f"{key} {here[key]} on the driver and every node")


def _listeners(port: int) -> list[str]:
    """Local addresses of sockets listening on `port` on this machine (Linux /proc; [] elsewhere)."""
    found = []
    for name, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state != "0A" or int(p, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                found.append(socket.inet_ntop(socket.AF_INET6, raw))
            else:
                found.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
    return found


def _is_loopback(addr: str) -> bool:
    return addr.lower() in ("localhost", "::1") or addr.startswith("127.") or addr.startswith("::ffff:127.")


def check_dashboard(report: Report, url: str | None, timeout: float) -> None:
    """Where the dashboard listens, and whether it refuses a request that carries no token."""
    if not url:
        report.add(WARN, "the cluster has no dashboard: `ray job submit` cannot reach it")
        return
    from urllib.parse import urlparse

    parsed = urlparse(url)
    host = parsed.hostname or ""
    on_this_machine = _is_loopback(host) or host in _local_addresses()
    local = _listeners(parsed.port) if on_this_machine and parsed.port else []
    if local:
        where = ", ".join(sorted(set(local)))
        ok = all(_is_loopback(a) for a in local)
        report.add(OK if ok else WARN, f"dashboard {url} listens on {where}" + (
            "" if ok else ": reachable from the network; bind it to 127.0.0.1 and use an SSH tunnel"))
    else:
        ok = _is_loopback(host)
        report.add(OK if ok else WARN, f"dashboard at {url}" + (" (loopback)" if ok else
                   ": not on loopback; make sure only a tunnel or a private network reaches it"))
    try:  # a request without credentials: 401/403 means the cluster demands a token
        req = urllib.request.Request(url.rstrip("/") + "/api/version")
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=timeout) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        report.add(WARN, f"the dashboard at {url} did not answer within {timeout:g}s ({e})")
        return
    if status in (401, 403):
        report.add(OK, f"token authentication is on (the dashboard answered {status} to a request without a token)")
    else:
        report.add(WARN, f"token authentication is off (the dashboard answered {status} without a token): anyone "
                         "who can reach the cluster's ports can run code on it; start it with RAY_AUTH_MODE=token")


def check_gcs(report: Report) -> None:
    """Where the GCS port listens, when the head runs on this machine (its other ports follow the same rule:
    loopback only when the head's node address is 127.0.0.1)."""
    from ray._common.network_utils import parse_address

    host, port = parse_address(ray.get_runtime_context().gcs_address)
    if not (_is_loopback(host) or host in _local_addresses()):
        return  # a remote head: its sockets cannot be read from here
    local = sorted(set(_listeners(int(port))))
    if not local:
        return
    if all(_is_loopback(a) for a in local):
        report.add(OK, f"the GCS (port {port}) listens on {', '.join(local)} only")
    else:
        where = ", ".join("all interfaces" if a in ("::", "0.0.0.0") else a for a in local)
        report.add(WARN, f"the GCS (port {port}) and the head's other Ray ports listen on {where}, reachable from "
                         "the network and guarded by token authentication alone (cluster/local-cluster.sh keeps "
                         "every port on 127.0.0.1)")


def _local_addresses() -> set[str]:
    """Addresses of this machine: its hostname's, and the address Ray found for this driver's node."""
    found = set()
    try:
        found = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    if ray.is_initialized():
        found.add(ray.util.get_node_ip_address())
    return found


def check_config(report: Report, cfg: Config, label: str) -> None:
    from distpg.orchestrator import cluster_nodes, plan_placement

    res = ray.cluster_resources()
    try:
        placement = plan_placement(cfg, res.get("CPU", 0), res.get("GPU", 0), nodes=cluster_nodes())
    except ConfigError as e:
        report.add(FAIL, f"{label} does not fit this cluster: {e}")
        return
    n = cfg.rollout.num_workers
    cpus, gpus = placement.reserved(n, "CPU"), placement.reserved(n, "GPU")
    report.add(OK, f"{label} fits: {n} workers + the learner reserve {cpus:g} of {res.get('CPU', 0):g} CPUs"
               + (f" and {gpus:g} of {res.get('GPU', 0):g} GPUs" if placement.use_gpu else " (CPU training)"))


# --------------------------------------------------------------------------------------------- output


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_report(report: Report) -> str:
    cols = ["node", "address", "role", "CPU", "GPU", "object store", "memory", "python", "ray", "torch",
            "CPU kernels", "custom"]
    rows = []
    for n in report.nodes:
        rows.append([n["node_id"][:8], n["address"], ("head" if n["head"] else "worker") + ("" if n["alive"] else
                     " (dead)"), f"{n['cpus']:g}", f"{n['gpus']:g}", _size(n["object_store_bytes"]),
                     _size(n["memory_bytes"]), str(n.get("python", "?")), str(n.get("ray", "?")),
                     str(n.get("torch", "?")), str(n.get("cpu_kernels", "?")).split(" ")[0].rstrip(":"),
                     ",".join(n["custom"]) or "-"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = [f"distpg doctor: {report.address}"]
    if rows:
        lines += ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"{level:<4}  {text}" for level, text in report.findings]
    fails = sum(level == FAIL for level, _ in report.findings)
    warns = sum(level == WARN for level, _ in report.findings)
    lines.append(f"distpg doctor: {fails} problem(s), {warns} warning(s)")
    return "\n".join(lines)


def run(flag: str | None, cfg: Config | None = None, config_label: str = "the config", timeout: float = 60.0,
        as_json: bool = False) -> int:
    """Check the cluster at `flag` (--address), else the `cfg`'s ray.address, else $RAY_ADDRESS (a local runtime
    when none names one), print the report, return the exit code (1 if anything would make a run fail)."""
    address, source = named_address(flag, cfg.ray.address if cfg is not None else None)
    report = Report(address=f"Ray cluster at {address}" if address else "local Ray runtime (as distpg train starts)")
    try:
        url = connect(address, timeout, source)
    except DoctorError as e:
        report.add(FAIL, str(e))
        print(json.dumps({"address": address, "nodes": [], "findings": report.findings}) if as_json
              else format_report(report))
        return 1
    try:
        inspect_nodes(report, timeout)
        judge_nodes(report)
        check_dashboard(report, url, min(timeout, 10.0))
        check_gcs(report)
        if cfg is not None:
            check_config(report, cfg, config_label)
    finally:
        if address:  # joined a cluster: ray.shutdown disconnects
            ray.shutdown()
        else:  # the runtime connect started (and imported the orchestrator for)
            from distpg.orchestrator import stop_local_ray

            stop_local_ray()
    if as_json:
        print(json.dumps({"address": address, "dashboard": url, "nodes": report.nodes,
                          "findings": report.findings, "failed": report.failed}, indent=1))
    else:
        print(format_report(report))
    return 1 if report.failed else 0
