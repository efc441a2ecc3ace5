"""Learning curves from run folders (`distpg plot`): reward against wall-clock seconds and steps.
Needs matplotlib (`pip install distpg[plot]`)."""

from __future__ import annotations

import math
from pathlib import Path

from distpg.config import ConfigError
from distpg.metrics import EVALS, read_records


def read_metrics(run_dir: Path, evals: bool = False) -> list[dict]:
    """The step records of a run folder's metrics.jsonl (`evals`: the evaluations of its eval.jsonl, written with
    run.eval_every), as `distpg.metrics.read_records` reads them: a last line cut off (a run killed, or being
    written, as it is read) is left out, any other bad line named."""
    path = Path(run_dir) / (EVALS if evals else "metrics.jsonl")
    if not path.exists():
        if evals and (Path(run_dir) / "metrics.jsonl").exists():
            raise FileNotFoundError(f"{str(path)!r} not found: the run scored no held-out prompts while training "
                                    "(run.eval_every was null); an eval/ metric needs them")
        raise FileNotFoundError(f"{str(path)!r} not found: not a distpg run folder")
    records = read_records(path)
    if not records:
        raise ConfigError(f"{str(path)!r} holds no {'evaluation' if evals else 'step'} yet")
    return records


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` steps (the first points average what there is). A NaN (a null in
    metrics.jsonl, such as the reward of a step whose rewards all failed) is left out of the windows that hold
    it; a window of NaNs only is NaN. (A running sum would carry one NaN into every later point.)"""
    out = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i - window + 1): i + 1] if not math.isnan(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def labels(run_dirs: list[Path]) -> list[str]:
    """Legend labels: each run's folder name, or as many of its parent folders as tell it from the others
    (`sweep/lr1e-3/seed0` and `sweep/lr3e-3/seed0` are lr1e-3/seed0 and lr3e-3/seed0, not seed0 twice)."""
    parts = [Path(run).resolve().parts for run in run_dirs]
    out = []
    for i, mine in enumerate(parts):
        others = {p for j, p in enumerate(parts) if j != i and p != mine}  # a folder given twice is itself
        n = 1
        while n < len(mine) and any(p[-n:] == mine[-n:] for p in others):
            n += 1
        out.append("/".join(mine[-n:]))
    return out


def plot_runs(run_dirs: list[Path], out: Path, metric: str = "rollout/reward_mean", title: str | None = None,
              smooth: int = 1) -> Path:
    """One PNG: `metric` against time_s (left) and step (right), one line per run, optionally smoothed by a
    trailing moving average of `smooth` points. An eval/ metric (eval/reward_mean, eval/exact_match, ...) is read
    from the runs' eval.jsonl, one point per evaluation (run.eval_every)."""
    evals = metric.startswith("eval/")
    runs = [(Path(run), read_metrics(run, evals)) for run in run_dirs]  # bad folders are named before plotting
    for run, records in runs:
        if any(metric not in r for r in records):
            names = sorted(k for k in set().union(*records) - {"step", "time_s"}
                           if all(isinstance(r.get(k), (int, float, type(None))) for r in records))
            raise ConfigError(f"--metric {metric!r} is not in every record of {str(run)!r}; its metrics: "
                              f"{', '.join(names)}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ImportError("distpg plot needs matplotlib: pip install 'distpg[plot]'") from None
    if out.is_dir():
        raise ConfigError(f"-o {str(out)!r} is a folder; give a file name (e.g. {out / 'curve.png'})")
    if not out.suffix:  # matplotlib would write OUT.png and the line below name OUT
        out = out.with_suffix(".png")
    kinds = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in kinds:
        raise ConfigError(f"-o {str(out)!r}: matplotlib writes no {out.suffix!r} file; allowed: "
                          + ", ".join(f".{k}" for k in sorted(kinds)))
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for (_, records), label in zip(runs, labels([run for run, _ in runs])):
        values = _smooth([math.nan if r[metric] is None else r[metric] for r in records], max(1, smooth))  # null: NaN
        ax_t.plot([r["time_s"] for r in records], values, label=label)
        ax_s.plot([r["step"] for r in records], values, label=label, marker="o" if evals else None)
    ax_t.set_xlabel("wall-clock seconds of training (time_s)")
    ax_s.set_xlabel("step")
    ax_t.set_ylabel(metric + (f" ({smooth}-point moving average)" if smooth > 1 else ""))
    for ax in (ax_t, ax_s):
        ax.grid(alpha=0.3)
    ax_s.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
