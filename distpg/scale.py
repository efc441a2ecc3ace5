"""`distpg scale`: a scaling experiment as one command.

It trains the same config again and again with 1, 2, ... rollout workers (and, on a cluster whose nodes
carry `distpg_node_I` resources as cluster/local-cluster.sh gives them, on 1, 2, ... nodes), each run a real
`orchestrator.train` on Ray, and reads each run's metrics.jsonl:

- rollout tokens/s and trajectories/s: completion tokens (samples) generated per second of the rollout
  phase, summed over the measured steps (the first `--warmup` steps of each run are not measured);
- the step time, its split into rollout and learn, and the weight sync within the rollout (means over the
  measured steps);
- parallel efficiency E(N) = T(N) / (N T(1)), with T the rollout tokens/s and T(1) the run with one worker
  on one node (or the smallest run of the sweep when that one is not in it).

Weak scaling by default: every worker gets `--prompts-per-worker` prompts per step, so N workers sample N
times the batch (the learner's batch grows too, and with it the learn time). `--strong` keeps the
config's prompts_per_step and splits it N ways. Runs are in the config's run.mode: synchronous (the default),
where the rollout phase is a clean slice of each step; or asynchronous (`--set run.mode=async`), where the
workers sample while the learner learns: the phases overlap, so tokens/s and trajectories/s are per second of
the run (the sum of the measured steps' perf/step_s, the time from one update's metrics to the next), the
throughput the overlap buys.

On a shared machine other work disturbs the figures: `--repeats R` runs the whole sweep R times, interleaved,
and keeps each point's fastest run (all of them are in scaling.json); the load average before and after is
recorded too. On plain local Ray the runtime is given max(cores, learner + N x CPUs per worker) logical CPUs, so that
N workers can start even past the number of cores: that is the point of the experiment, and why the
efficiency falls once the workers outnumber the cores. Outputs: scaling.csv, scaling.json, scaling.png
and one run folder per point under --out, and a table on the console. A point whose actors do not fit the cluster
is not run; the two files keep it, marked `skipped` with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from distpg.cliargs import number, whole_numbers
from distpg.config import Config, ConfigError, config_from_dict, load_config
from distpg.stopping import how_stopped

NODE_RESOURCE = re.compile(r"^distpg_node_(\d+)$")


@dataclass
class Point:
    workers: int
    nodes: int | None  # node resources the workers were pinned to (None: wherever Ray put them)
    nodes_used: int  # distinct nodes hosting the workers (metrics workers/nodes)
    prompts_per_step: int
    trajectories_per_step: int
    measured_steps: int
    rollout_tokens_per_s: float
    trajectories_per_s: float  # per second of the rollout phase
    train_trajectories_per_s: float  # per second of whole steps (rollout, weight sync included, + learn)
    step_s: float
    rollout_s: float
    learn_s: float
    sync_s: float
    efficiency: float = float("nan")
    run_dir: str = ""
    tries_tokens_per_s: list = field(default_factory=list)  # rollout tokens/s of every try (--repeats)


@dataclass
class Skipped:
    """A point of the sweep that was asked for but not run, and why: its actors do not fit the cluster. Kept in
    scaling.csv and scaling.json (its measured fields empty), left out of the efficiency, the table and the plot."""
    workers: int
    nodes: int | None
    prompts_per_step: int
    trajectories_per_step: int
    skipped: str  # why


# ------------------------------------------------------------------------------------------ the sweep


def with_values(cfg: Config, values: dict) -> Config:
    """A copy of `cfg` with dotted fields replaced, validated like any config."""
    data = cfg.to_dict()
    for key, value in values.items():
        section, name = key.split(".")
        data[section][name] = value
    return config_from_dict(data)


# --set keys that every point of the sweep sets itself, and what to use instead: a --set of one of them would be
# replaced without a word, and the figures would describe another experiment than the one asked for
SWEPT = {
    "rollout.num_workers": "the sweep sets it; give the counts with --workers",
    "rollout.num_cpus_per_worker": "give it with --cpus-per-worker",
    "rollout.node_resource": "the sweep pins the workers itself; give node counts with --nodes",
    "run.steps": "give it with --steps",
    "run.stop_reward": "every point trains all --steps",
}


def check_overrides(overrides: list[str], strong: bool) -> None:
    """Refuse --set items for fields the sweep sets itself (see SWEPT), naming the option to use instead."""
    from distpg.config import parse_set

    for item in overrides:
        key = ".".join(parse_set(item)[0])
        reason = SWEPT.get(key)
        if key == "rollout.prompts_per_step" and not strong:
            reason = ("weak scaling gives each worker --prompts-per-worker prompts; add --strong to keep this batch "
                      "and split it among the workers")
        if reason:
            raise ConfigError(f"--set {item!r}: distpg scale sets {key} for every point: {reason}")


def node_resources_of(nodes: list[dict]) -> list[str]:
    """The distpg_node_I resources of a cluster, by I."""
    names = {k for n in nodes for k in n if NODE_RESOURCE.match(k)}
    return sorted(names, key=lambda k: int(NODE_RESOURCE.match(k).group(1)))


def plan_points(base: Config, workers: list[int], node_counts: list[int | None], node_names: list[str],
                prompts_per_worker: int | None, cpus_per_worker: float) -> list[tuple[int, int | None, Config]]:
    """(workers, nodes, config) of every point. With a node count k the workers are pinned round-robin to the
    first k node resources, and only N >= k is run (fewer workers than nodes is the k = N point again)."""
    points = []
    for k in node_counts:
        for n in workers:
            if k is not None and n < k:
                continue
            values = {
                "rollout.num_workers": n,
                "rollout.num_cpus_per_worker": cpus_per_worker,
                "rollout.node_resource": node_names[:k] if k is not None else None,
                "run.stop_reward": None,
                "run.checkpoint_every": 10**6,
                "log.tensorboard": False,
                "log.rollouts": False,
                "log.print_every": 10**6,
                "ray.placement_strategy": "SPREAD" if k is not None and k > 1 else base.ray.placement_strategy,
            }
            if prompts_per_worker is not None:
                values["rollout.prompts_per_step"] = n * prompts_per_worker
            points.append((n, k, with_values(base, values)))
    return points


def measure(cfg: Config, run_dir: Path, warmup: int, nodes: int | None,
            head_lost: Callable[[], str] | None = None) -> Point:
    """Train `cfg` into `run_dir` (its console output goes to run_dir/train.log) and summarise its metrics.
    `head_lost`: what to tell the user when the Ray head is lost meanwhile (see `orchestrator.train`)."""
    from distpg.orchestrator import train

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log):
        train(cfg, run_dir, head_lost=head_lost)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return summarise(records[warmup:], cfg, nodes, str(run_dir))


def summarise(records: list[dict], cfg: Config, nodes: int | None, run_dir: str = "") -> Point:
    """One point from the measured steps' metrics records."""
    if not records:
        raise ConfigError("no measured steps: --steps must exceed --warmup")
    col = lambda key: np.array([r[key] for r in records], dtype=float)  # noqa: E731
    rollout_s, step_s = col("perf/rollout_s"), col("perf/step_s")
    tokens = col("perf/rollout_tokens_per_s") * rollout_s  # each step's completion tokens
    per_step = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    # async: a step's rollout overlaps the learning of earlier steps, so per second of the run instead
    sampling_s = step_s.sum() if cfg.run.mode == "async" else rollout_s.sum()
    return Point(
        workers=cfg.rollout.num_workers, nodes=nodes, nodes_used=int(max(r["workers/nodes"] for r in records)),
        prompts_per_step=cfg.rollout.prompts_per_step, trajectories_per_step=per_step,
        measured_steps=len(records),
        rollout_tokens_per_s=float(tokens.sum() / sampling_s),
        trajectories_per_s=float(per_step * len(records) / sampling_s),
        train_trajectories_per_s=float(per_step * len(records) / step_s.sum()),
        step_s=float(step_s.mean()), rollout_s=float(rollout_s.mean()), learn_s=float(col("perf/learn_s").mean()),
        sync_s=float(col("perf/sync_s").mean()), run_dir=run_dir,
    )


def split_by_fit(plan: list[tuple[int, int | None, Config]], cpus: float, gpus: float,
                 nodes: list[dict]) -> tuple[list[tuple[int, int | None, Config]], list[Skipped]]:
    """The points of `plan` whose actors fit the cluster (`cpus`, `gpus` in all, on `nodes`), and those that do
    not, with the reason."""
    from distpg.orchestrator import plan_placement

    fitting, skipped = [], []
    for n, k, cfg in plan:
        try:
            plan_placement(cfg, cpus, gpus, nodes=nodes)
            fitting.append((n, k, cfg))
        except ConfigError as e:
            per_step = cfg.rollout.prompts_per_step * cfg.rollout.group_size
            skipped.append(Skipped(n, k, cfg.rollout.prompts_per_step, per_step, f"does not fit the cluster: {e}"))
    return fitting, skipped


def best(tries: list[Point]) -> Point:
    """The try with the highest rollout tokens/s (the one least disturbed by other work on the machine); every
    try's figure is kept in `tries_tokens_per_s`."""
    top = max(tries, key=lambda p: p.rollout_tokens_per_s)
    top.tries_tokens_per_s = [p.rollout_tokens_per_s for p in tries]
    return top


def add_efficiency(points: list[Point]) -> Point:
    """E(N) = T(N) / (N T(1)) against the one-worker, one-node point (else the smallest); returns that point."""
    base = min(points, key=lambda p: (p.workers, p.nodes or 0))
    for p in points:
        p.efficiency = p.rollout_tokens_per_s * base.workers / (p.workers * base.rollout_tokens_per_s)
    return base


# --------------------------------------------------------------------------------------------- output


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    gpu = f"{gpus} GPU(s)" if gpus else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}"


def format_table(points: list[Point]) -> str:
    head = ["workers", "nodes", "on nodes", "tokens/s", "traj/s", "train traj/s", "step ms", "rollout ms",
            "learn ms", "sync ms", "efficiency"]
    rows = [[str(p.workers), "any" if p.nodes is None else str(p.nodes), str(p.nodes_used),
             f"{p.rollout_tokens_per_s:,.0f}", f"{p.trajectories_per_s:,.0f}", f"{p.train_trajectories_per_s:,.0f}",
             f"{p.step_s * 1e3:.0f}", f"{p.rollout_s * 1e3:.0f}", f"{p.learn_s * 1e3:.0f}", f"{p.sync_s * 1e3:.0f}",
             f"{p.efficiency:.2f}"] for p in points]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def write_outputs(points: list[Point | Skipped], out: Path, meta: dict) -> list[Path]:
    """scaling.csv, scaling.json and (where matplotlib is installed: `pip install 'distpg[plot]'`) scaling.png
    under `out`. Every point asked for has a row, in the order given; a skipped one says why (`skipped`) and
    has its measured fields empty (null in the JSON), and the plot leaves it out."""
    out.mkdir(parents=True, exist_ok=True)
    columns = [f.name for f in fields(Point)] + ["skipped"]
    rows = [{**dict.fromkeys(columns), **asdict(p)} for p in points]
    with open(out / "scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    (out / "scaling.json").write_text(json.dumps({**meta, "points": rows}, indent=1))
    files = [out / "scaling.csv", out / "scaling.json"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("distpg scale: no scaling.png without matplotlib (pip install 'distpg[plot]', then distpg scale "
              "again); the figures are in scaling.csv and scaling.json", flush=True)
        return files
    return [*files, plot([p for p in points if isinstance(p, Point)], out / "scaling.png", meta)]


def plot(points: list[Point], path: Path, meta: dict) -> Path:
    """Rollout tokens/s (with the ideal N x T(1)) and parallel efficiency against workers, a line per node count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = min(points, key=lambda p: (p.workers, p.nodes or 0))
    xs = sorted({p.workers for p in points})
    ax_t.plot(xs, [base.rollout_tokens_per_s * x / base.workers for x in xs], "k--", lw=1, label="ideal: N x T(1)")
    for k in sorted({p.nodes for p in points}, key=lambda k: k or 0):
        line = sorted((p for p in points if p.nodes == k), key=lambda p: p.workers)
        label = "any node" if k is None else f"{k} node{'s' if k > 1 else ''}"
        ax_t.plot([p.workers for p in line], [p.rollout_tokens_per_s for p in line], "o-", label=label)
        ax_e.plot([p.workers for p in line], [p.efficiency for p in line], "o-", label=label)
    ax_e.axhline(1.0, color="k", ls="--", lw=1)
    cores = os.cpu_count() or 0
    for ax in (ax_t, ax_e):
        ax.axvline(cores, color="grey", ls=":", lw=1)
        ax.set_xlabel("rollout workers (N)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    ax_t.set_ylim(bottom=0)
    ax_t.text(cores, ax_t.get_ylim()[1] * 0.97, f" {cores} cores", va="top", fontsize=8, color="grey")
    ax_t.set_ylabel("rollout tokens/s")
    ax_e.set_ylabel("parallel efficiency T(N) / (N T(1))")
    ax_e.set_ylim(0, 1.15)
    ax_t.legend(fontsize=8)
    ax_e.legend(fontsize=8)
    load = meta.get("load_average") or []
    load_text = ""
    if len(load) == 2 and None not in load:
        load_text = f"; load average {load[0]:.1f} before, {load[1]:.1f} after"
    fig.suptitle(f"distpg scale ({meta.get('scaling', 'weak')} scaling): {meta['where']}\n{meta['machine']}{load_text}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ CLI


def _label(n: int, k: int | None) -> str:
    return f"{n} worker(s)" + ("" if k is None else f" on {k} node(s)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config to scale (default: the embedded default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--address", help="Ray cluster to run on (default: $RAY_ADDRESS, else a local runtime)")
    p.add_argument("--workers", type=whole_numbers, default="1,2,3,4",
                   help="numbers of rollout workers to sweep (default 1,2,3,4)")
    p.add_argument("--nodes", type=node_counts_text, default="auto",
                   help="numbers of nodes to pin the workers to, e.g. 1,2,3 (needs distpg_node_I resources); "
                        "auto: every count on a multi-node cluster with them, else none; none: no pinning")
    p.add_argument("--steps", type=number(int, 1), default=10,
                   help="training steps per point, warm-up included (default 10)")
    p.add_argument("--warmup", type=number(int, 0), default=2,
                   help="first steps of each point not measured (default 2)")
    p.add_argument("--prompts-per-worker", type=number(int, 1), default=16,
                   help="weak scaling: prompts per worker per step (default 16)")
    p.add_argument("--strong", action="store_true", help="strong scaling: keep the config's prompts_per_step")
    p.add_argument("--cpus-per-worker", type=number(float, 0, above=True), default=1.0,
                   help="rollout.num_cpus_per_worker of every point, in place of the config's (default 1); torch "
                        "threads = max(1, round(this))")
    p.add_argument("--repeats", type=number(int, 1), default=1,
                   help="runs per point, interleaved across the sweep; the fastest counts (default 1)")
    p.add_argument("--timeout", type=number(float, 0, above=True), default=60.0,
                   help="seconds to wait for the cluster connection")
    p.add_argument("--out", help="output folder, new or without an earlier sweep (default: runs/scale-TIMESTAMP)")


def _start_ray(args: argparse.Namespace, base: Config, workers: list[int]) -> str:
    """Join the cluster (--address, ray.address, $RAY_ADDRESS) or start a local runtime big enough for the
    largest point. Returns where the sweep runs, in words."""
    from distpg.doctor import DoctorError, connect, named_address

    address, source = named_address(args.address, base.ray.address)
    if address:
        try:
            connect(address, args.timeout, source)
        except DoctorError as e:
            raise ConfigError(str(e)) from None
        return f"Ray cluster at {address}"
    logical = max(os.cpu_count() or 1, int(np.ceil(base.learner.num_cpus + max(workers) * args.cpus_per_worker)))
    if (note := crowded(max(workers), os.cpu_count() or 1, available_memory())) is not None:
        print(f"distpg scale: warning: {note}", flush=True)
    from distpg.orchestrator import start_local_ray

    start_local_ray(num_cpus=logical, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    return f"local Ray, {logical} logical CPUs"


ACTOR_BYTES = 400 << 20  # an actor with torch and the default policy: 416 MB resident (a worker and a learner)


def available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def crowded(workers: int, cores: int, memory: int | None) -> str | None:
    """What a local sweep up to `workers` rollout workers on this machine's `cores` and available `memory` risks,
    or None: a process per worker, started whatever the cores (a local sweep gives Ray as many logical CPUs as
    its largest point needs), which past the memory ends with the kernel killing processes."""
    need = (workers + 1) * ACTOR_BYTES  # and the learner's
    if memory is not None and need > memory:
        return (f"--workers {workers}: the largest point starts {workers + 1} processes of about "
                f"{ACTOR_BYTES >> 20} MB each, {need / 2**30:.1f} GiB, more than the {memory / 2**30:.1f} GiB "
                "this machine has available: lower --workers, or sweep on a cluster")
    if workers > 8 * cores:
        return (f"--workers {workers}: the largest point runs {workers} rollout workers on {cores} cores, "
                f"{workers / cores:.0f} per core: its figures measure the cores' sharing more than distpg")
    return None


def node_counts_text(text: str) -> str:
    """An argparse `type` for --nodes: auto, none or comma-separated whole numbers, checked before Ray starts
    (the counts against the cluster's nodes once it has)."""
    if text not in ("auto", "none"):
        try:
            whole_numbers(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (or auto, or none)") from None
    return text


def _node_counts(text: str, names: list[str]) -> list[int | None]:
    """--nodes: auto (every count when the cluster has 2+ distpg_node_I resources), none, or a list."""
    if text == "auto":
        return list(range(1, len(names) + 1)) if len(names) > 1 else [None]
    if text == "none":
        return [None]
    try:
        counts = whole_numbers(text)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--nodes {e}") from None
    if max(counts) > len(names):
        raise ConfigError(f"--nodes {text}: the cluster has {len(names)} nodes with distpg_node_I resources "
                          "(cluster/local-cluster.sh gives each node one)")
    return counts


def check_out(out: Path) -> None:
    """Refuse an --out that is a file or holds an earlier sweep: its run folders would refuse the new runs (after
    Ray started and earlier points ran) and its scaling.* files would be replaced."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder (created if missing)")
    if (out / "config.yaml").is_file() and (out / "metrics.jsonl").exists():
        raise ConfigError(f"--out {str(out)!r} is a training run's folder; give a new or empty folder")
    held = sorted(n for n in ("runs", "scaling.csv", "scaling.json", "scaling.png") if (out / n).exists())
    if held:
        raise ConfigError(f"--out {str(out)!r} already holds a sweep ({', '.join(held)}); give a new or empty folder")


def sweep_settings(args: argparse.Namespace) -> dict:
    """The options that shaped every point, for scaling.json: the recorded `config` is the base config, which
    each point overrides with these (a point's own config is in its run folder's config.yaml)."""
    return {"workers": args.workers, "nodes": args.nodes, "cpus_per_worker": args.cpus_per_worker,
            "prompts_per_worker": None if args.strong else args.prompts_per_worker, "repeats": args.repeats,
            "set": list(args.set), "config_file": args.config}


def _load() -> float | None:
    """The machine's 1-minute load average (other work on the cores skews the figures)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def main(args: argparse.Namespace) -> int:
    import ray

    from distpg.orchestrator import cluster_nodes, stop_local_ray

    check_overrides(args.set, args.strong)
    base = load_config(args.config, args.set)
    workers = args.workers
    if args.steps <= args.warmup:
        raise ConfigError(f"--steps {args.steps} must exceed --warmup {args.warmup}: nothing would be measured")
    base = with_values(base, {"run.steps": args.steps})
    out = Path(args.out or f"runs/scale-{time.strftime('%Y%m%d-%H%M%S')}")
    check_out(out)
    where = _start_ray(args, base, workers)
    try:
        nodes = cluster_nodes()
        names = node_resources_of(nodes)
        node_counts = _node_counts(args.nodes, names)
        where += f", {len(nodes)} node(s)"
        res = ray.cluster_resources()
        plan = plan_points(base, workers, node_counts, names, None if args.strong else args.prompts_per_worker,
                           args.cpus_per_worker)
        load_before = _load()
        print(f"distpg scale: {len(plan)} points, {base.run.mode} mode, on {where}; {machine()}; load average "
              f"{load_before}", flush=True)
        fitting, skipped = split_by_fit(plan, res.get("CPU", 0), res.get("GPU", 0), nodes)
        for s in skipped:
            print(f"  {_label(s.workers, s.nodes)}: skipped, {s.skipped}", flush=True)
        tries, stop = sweep(fitting, args.repeats, args.warmup, out)
    finally:
        stop_local_ray()
    points = [best(ps) for ps in tries.values()]
    if not points and stop is None:
        first = skipped[0]  # the reason may be other than size (a strict placement strategy, a pinned resource)
        raise ConfigError(f"no point of the sweep fits the cluster; {_label(first.workers, first.nodes)}: "
                          f"{first.skipped}")
    if not points:
        _raise_stop(stop, "no point was measured before it")
    add_efficiency(points)
    order = [(n, k) for n, k, _ in plan]  # the plan's, so a skipped point sits where it was asked for
    asked = sorted([*points, *skipped], key=lambda p: order.index((p.workers, p.nodes)))
    meta = {"where": where, "machine": machine(), "cores": os.cpu_count(), "config": base.to_dict(),
            "warmup": args.warmup, "steps": args.steps, "scaling": "strong" if args.strong else "weak",
            "mode": base.run.mode,
            "sweep": sweep_settings(args),
            # 1-minute load average of the machine before and after: other work on the cores skews the figures
            "load_average": [load_before, _load()],
            "efficiency": "rollout tokens/s with N workers / (N x with the smallest point)",
            "tokens_per_s": "per second of the rollout phase" if base.run.mode == "sync" else
            "per second of the run (async: the phases overlap)"}
    if stop is not None:
        e = stop[2]  # a TrainingError, or a KeyboardInterrupt (Ctrl-C, SIGTERM, SIGHUP)
        meta["stopped"] = f"{stop[0]}: {how_stopped(e) if isinstance(e, KeyboardInterrupt) else e}"
    files = write_outputs(asked, out, meta)
    print(format_table(points))
    print(f"tokens/s, traj/s: {meta['tokens_per_s']}; train traj/s: per second of the run")  # a mode's meaning
    print("wrote " + ", ".join(str(f) for f in files))
    if stop is not None:
        _raise_stop(stop, f"the {len(points)} point(s) measured before it are in {out}/scaling.*")
    return 0


def sweep(fitting: list[tuple[int, int | None, Config]], repeats: int, warmup: int,
          out: Path) -> tuple[dict[tuple, list[Point]], tuple | None]:
    """Train every (workers, nodes, config) point `repeats` times into out/runs/NAME. Returns the tries of each
    point and, when a run failed or was interrupted (Ctrl-C, SIGTERM), (its label, its run folder, the
    exception) of that run, else None: the sweep stops there, and what it measured before is kept."""
    from distpg.orchestrator import TrainingError

    # repeats go round the whole sweep (1, 2, .., 1, 2, ..) so a busy spell on the machine hits every point
    tries: dict[tuple, list[Point]] = {}
    done: list[str] = []  # the runs measured, by run folder name
    for r in range(repeats):
        for n, k, cfg in fitting:
            t0 = time.perf_counter()
            name = (f"w{n}" if k is None else f"n{k}-w{n}") + (f"-r{r}" if repeats > 1 else "")
            head_lost = functools.partial(sweep_head_lost, _label(n, k), out / "runs" / name, list(done), out)
            try:
                p = measure(cfg, out / "runs" / name, warmup, k, head_lost)
            except (TrainingError, KeyboardInterrupt) as e:
                return tries, (_label(n, k), out / "runs" / name, e)
            tries.setdefault((n, k), []).append(p)
            done.append(name)
            print(f"  {_label(n, k)}: {p.rollout_tokens_per_s:,.0f} rollout tokens/s, step {p.step_s * 1e3:.0f} "
                  f"ms ({time.perf_counter() - t0:.0f}s)", flush=True)
    return tries, None


def sweep_head_lost(label: str, run_dir: Path, done: list[str], out: Path) -> str:
    """What a sweep whose Ray head was lost while it measured point `label` (into `run_dir`) leaves, after the
    runs `done` (run folder names under out/runs), and what to do: the driver ends with the cluster, before the
    sweep writes anything of its own, so the sweep is run again (a run of a sweep is a measurement, not a training
    to resume)."""
    before = (f"the runs done before it ({', '.join(done)}) are in {out}/runs, each with its metrics.jsonl"
              if done else "no run of the sweep was done before it")
    return (f"the sweep (distpg scale) was measuring {label}, run folder {run_dir}; {before}, but no scaling.* was "
            f"written. Run the sweep again, with a new --out ({out} holds this one's runs)")


def _raise_stop(stop: tuple, kept: str) -> None:
    """Re-raise what stopped the sweep, naming the point, its run folder and what was kept."""
    from distpg.orchestrator import TrainingError

    label, run_dir, e = stop
    if isinstance(e, KeyboardInterrupt):
        print(f"distpg scale: interrupted during {label} ({run_dir}); {kept}", flush=True)
        raise e
    raise TrainingError(f"the sweep stopped at {label}: {e} (its run folder {run_dir}, console output in "
                        f"train.log there); {kept}") from None
