"""`distpg bench async`: the same config in sync and async mode, side by side on one Ray runtime.

Prints trajectories/s of each, their ratio, and the ideal overlap bound (T_gen + T_learn) / max(T_gen, T_learn)
from the stage times measured in the sync run: what perfect overlap of generation and learning could give.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from distpg.config import Config, config_from_dict, merge_overrides
from distpg.orchestrator import start_local_ray, stop_local_ray

# 1 worker + 1 learner = 2 busy threads on a 2-core machine, and a batch size at which generating and
# learning take about the same time on 2 cores: the setting where overlap can pay the most.
DEFAULT_OVERRIDES = [
    "run.steps=60", "run.stop_reward=null", "run.checkpoint_every=1000",
    "rollout.num_workers=1", "rollout.num_cpus_per_worker=1", "rollout.prompts_per_step=32",
    "log.tensorboard=false", "log.rollouts=false", "log.print_every=1000",
]


def _throughput(run_dir: Path, warmup: int) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = recs[warmup:]
    span = recs[-1]["time_s"] - recs[0]["time_s"]
    return {
        "steps": len(recs) - 1,
        "seconds": span,
        "steps_per_s": (len(recs) - 1) / span,
        "t_gen": float(np.median([r["perf/rollout_s"] for r in recs])),
        "t_learn": float(np.median([r["perf/learn_s"] for r in recs])),
        "t_sync": float(np.median([r["perf/sync_s"] for r in recs])),
        "staleness_mean": float(np.mean([r["rollout/staleness_mean"] for r in recs])),
        "worker_idle_frac": recs[-1]["perf/worker_idle_frac"],
        "learner_idle_frac": recs[-1]["perf/learner_idle_frac"],
    }


def bench_async(overrides: list[str] | None = None, max_staleness: int = 2, warmup: int = 5,
                out: Path | None = None) -> dict:
    """Run sync then async (max_staleness K) with the same config; returns and prints the comparison."""
    import ray

    from distpg.orchestrator import train

    base = merge_overrides({}, DEFAULT_OVERRIDES + list(overrides or []))
    sync_cfg: Config = config_from_dict(merge_overrides(base, ["run.mode=sync"]))
    async_cfg: Config = config_from_dict(
        merge_overrides(base, ["run.mode=async", f"algo.max_staleness={max_staleness}"]))
    started = not ray.is_initialized()
    if started:
        start_local_ray(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="distpg-bench-async-") as tmp:
            train(sync_cfg, Path(tmp) / "sync")
            train(async_cfg, Path(tmp) / "async")
            s, a = _throughput(Path(tmp) / "sync", warmup), _throughput(Path(tmp) / "async", warmup)
    finally:
        if started:
            stop_local_ray()
    per_step = sync_cfg.rollout.prompts_per_step * sync_cfg.rollout.group_size
    bound = (s["t_gen"] + s["t_learn"]) / max(s["t_gen"], s["t_learn"])
    speedup = a["steps_per_s"] / s["steps_per_s"]
    result = {
        "config": {"overrides": DEFAULT_OVERRIDES + list(overrides or []), "max_staleness": max_staleness},
        "sync": {**s, "trajectories_per_s": s["steps_per_s"] * per_step},
        "async": {**a, "trajectories_per_s": a["steps_per_s"] * per_step},
        "speedup": speedup,
        "ideal_overlap_bound": bound,
        "fraction_of_bound": speedup / bound,
    }
    print(f"{'mode':<6} {'traj/s':>9} {'steps/s':>8} {'T_gen':>8} {'T_learn':>8} {'T_sync':>8} {'stale':>6} "
          f"{'worker idle':>11} {'learner idle':>12}")
    for part in ("sync", "async"):
        r = result[part]
        print(f"{part:<6} {r['trajectories_per_s']:>9.1f} {r['steps_per_s']:>8.2f} {r['t_gen'] * 1e3:>6.1f}ms "
              f"{r['t_learn'] * 1e3:>6.1f}ms {r['t_sync'] * 1e3:>6.1f}ms {r['staleness_mean']:>6.2f} "
              f"{r['worker_idle_frac']:>11.2f} {r['learner_idle_frac']:>12.2f}")
    print(f"async / sync = {speedup:.2f}x; ideal overlap bound (T_gen + T_learn) / max(T_gen, T_learn) = {bound:.2f}x; "
          f"async reaches {100 * speedup / bound:.0f}% of the bound")
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1))
    return result


def learning_race(overrides: list[str] | None = None, max_staleness: int = 2, threshold: float = 0.9,
                  seeds: tuple[int, ...] = (0, 1), out: Path | None = None) -> dict:
    """Wall-clock seconds until the 5-step mean reward reaches `threshold`, sync vs async, per seed, on the
    default config (plus overrides)."""
    import ray

    from distpg.orchestrator import train

    started = not ray.is_initialized()
    if started:
        start_local_ray(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="distpg-race-") as tmp:
            for seed in seeds:
                for mode in ("sync", "async"):
                    extra = [f"run.mode={mode}", f"algo.max_staleness={max_staleness}", f"run.seed={seed}",
                             f"run.stop_reward={threshold}", "run.steps=1000", "log.print_every=1000"]
                    cfg = config_from_dict(merge_overrides({}, list(overrides or []) + extra))
                    run = Path(tmp) / f"{mode}-{seed}"
                    train(cfg, run)
                    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                    rows.append({"mode": mode, "seed": seed, "steps": recs[-1]["step"], "seconds": recs[-1]["time_s"],
                                 "final_reward": recs[-1]["rollout/reward_mean"]})
    finally:
        if started:
            stop_local_ray()
    print(f"seconds of training until the 5-step mean reward reaches {threshold} "
          f"(async: max_staleness {max_staleness})")
    print(f"{'seed':>4} {'sync s':>8} {'sync steps':>10} {'async s':>8} {'async steps':>11}")
    for seed in seeds:
        s = next(r for r in rows if r["seed"] == seed and r["mode"] == "sync")
        a = next(r for r in rows if r["seed"] == seed and r["mode"] == "async")
        print(f"{seed:>4} {s['seconds']:>8.1f} {s['steps']:>10} {a['seconds']:>8.1f} {a['steps']:>11}")
    result = {"threshold": threshold, "max_staleness": max_staleness, "runs": rows}
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1))
    return result
