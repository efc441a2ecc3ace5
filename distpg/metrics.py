"""Metrics: one `log()` call writes a step's scalars to RUN_DIR/metrics.jsonl and TensorBoard, and prints
the console progress line every `print_every` steps."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from pathlib import Path

from distpg.config import ConfigError

# The contract of DESIGN.md: every step's record carries these keys.
CONTRACT_METRICS = (
    "step", "time_s", "rollout/reward_mean", "rollout/reward_std", "rollout/length_mean",
    "rollout/failed_rewards", "learner/loss", "learner/grad_norm", "learner/entropy", "learner/kl",
    "policy/version", "rollout/staleness_mean", "perf/step_s", "perf/rollout_s", "perf/learn_s",
    "perf/sync_s", "perf/rollout_tokens_per_s", "perf/learner_tokens_per_s", "workers/alive",
    "workers/restarts", "workers/nodes",
)


def read_records(path: Path) -> list[dict]:
    """The step records of a metrics.jsonl. A last line that is not JSON was cut off by a kill while it was
    written (its step has no checkpoint, so `--resume` redoes it): it is left out. Any other line that is not
    JSON raises ConfigError naming it."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n < len(lines):
                raise ConfigError(f"{str(path)!r} line {n} is not a JSON record ({e.msg})") from None
    return records


def record_line(record: dict) -> str:
    """A record as one line of strict JSON: a value that is not finite (the reward mean of a step whose rewards
    all failed) is written as null."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()},
                      allow_nan=False) + "\n"


def cut_records(path: Path, key: str, upto: int) -> None:
    """Keep only the records of a .jsonl file whose `key` is at most `upto` (what a resume from checkpoint
    `upto` does not redo; a last line cut off by a kill goes too), rewritten atomically."""
    from distpg import checkpoint

    checkpoint.write_atomic(path, "".join(record_line(r) for r in read_records(path) if r[key] <= upto))


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


EVALS = "eval.jsonl"  # in the run folder, with run.eval_every: one record per evaluation
RATE_WINDOW = 50  # steps: the progress line's steps/s (and ETA) are over the last this many steps of the attempt


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool, print_every: int,
                 start_step: int = 0, stream=None, stop_reward: float | None = None,
                 max_time_s: float | None = None) -> None:
        """`stop_reward`, `max_time_s`: run.stop_reward and run.max_time_s, which may end the run before
        `total_steps`; the progress line's ETA is then a bound (the time left, counted from this logger's start,
        caps it)."""
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.stop_reward, self.max_time_s = stop_reward, max_time_s
        self.print_every = print_every
        self.stream = stream or sys.stdout
        self.t_start = time.time()
        # a resumed run's time_s goes on from that of its checkpoint's step (the file is cut there), so that
        # time_s keeps rising: `distpg plot` draws reward against it
        path = self.run_dir / "metrics.jsonl"
        kept = read_records(path) if start_step and path.exists() else []
        self.t_offset = next((float(r["time_s"]) for r in reversed(kept) if r["step"] <= start_step), 0.0)
        self._jsonl = open(path, "a")
        # (step, seconds into this attempt) of the last steps logged, from the attempt's start: see `_print`
        self._recent: deque[tuple[int, float]] = deque([(start_step, 0.0)], maxlen=RATE_WINDOW + 1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run redoes the steps after its checkpoint: TensorBoard drops the first attempt's
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"),
                                     purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float], samples: list[tuple[str, str, float]] | None = None) -> dict:
        """Record step `step` (1-based: steps completed). Returns the record written."""
        record = {"step": step, "time_s": round(self.t_offset + time.time() - self.t_start, 4), **metrics}
        self._recent.append((step, record["time_s"] - self.t_offset))
        self._jsonl.write(record_line(record))
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
            if samples:
                text = "\n\n".join(f"`{p}` → `{c}` (reward {r:.2f})" for p, c, r in samples)
                self._tb.add_text("samples", text, step)
        if step % self.print_every == 0 or step == self.total_steps:
            self._print(record)
        return record

    def log_eval(self, step: int, res: dict) -> dict:
        """Record an evaluation made after step `step` (`run.eval_every`; `res` from `Learner.evaluate`): a line
        of eval.jsonl, the eval/* scalars in TensorBoard at the version scored, a console line."""
        record = {"step": step, "time_s": round(self.t_offset + time.time() - self.t_start, 4), **res}
        with open(self.run_dir / EVALS, "a") as f:
            f.write(record_line(record))
        if self._tb is not None:
            for k, v in res.items():
                if k.startswith("eval/") and v is not None:
                    self._tb.add_scalar(k, v, res["version"])
        exact = res["eval/exact_match"]
        parts = "".join(f" | {k[len('eval/rewards/'):]} {'n/a' if v is None else format(v, '.3f')}"
                        for k, v in res.items() if k.startswith("eval/rewards/"))
        which = "held-out" if res.get("prompts", "held-out") == "held-out" else "test"
        print(f"eval  {res['version']:>5} | {which} reward {res['eval/reward_mean']:.3f}{parts} | exact match "
              f"{'n/a' if exact is None else format(exact, '.3f')} | {res['eval/num_prompts']} prompts, greedy",
              file=self.stream, flush=True)
        return record

    def _print(self, r: dict) -> None:
        # over the last RATE_WINDOW steps of this attempt (its start while fewer): a run slowed for a while (a node
        # lost, a worker replaced) shows its speed again within that many steps, not the whole run's average
        (s0, t0), (s1, t1) = self._recent[0], self._recent[-1]
        rate = (s1 - s0) / max(t1 - t0, 1e-9)
        eta = (self.total_steps - r["step"]) / rate if rate > 0 else 0.0
        if self.max_time_s is not None:
            eta = min(eta, max(0.0, self.max_time_s - (r["time_s"] - self.t_offset)))
        # at most: run.stop_reward may end the run sooner (the default config's stops near step 150 of 400)
        bound = "≤ " if self.stop_reward is not None else ""
        print(
            f"step {r['step']:>5}/{self.total_steps} | reward {r['rollout/reward_mean']:.3f}"
            f" ± {r['rollout/reward_std']:.3f} | len {r['rollout/length_mean']:.1f}"
            f" | loss {r['learner/loss']:+.4f} | {rate:.2f} steps/s"
            f" | rollout {r['perf/rollout_s'] * 1000:.0f}ms learn {r['perf/learn_s'] * 1000:.0f}ms"
            f" sync {r['perf/sync_s'] * 1000:.0f}ms | ETA {bound}{_fmt_duration(eta)}",
            file=self.stream, flush=True,
        )

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
