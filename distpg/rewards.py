"""Scoring completions with a task's reward function, so that a misbehaving function cannot poison a run.

A task scores one sample with `reward(prompt, completion)`, or a whole batch with an optional
`reward_batch(prompts, completions) -> list`. Each sample's result is checked: an exception, or a value
that is not a finite number, marks that sample `reward_ok = False` (left out of the gradient and counted
in `rollout/failed_rewards`); a batch result of the wrong length fails the whole batch.

Isolation: with `isolation="process"` the function runs in a forked child process with a per-batch
timeout. A child that hangs past the timeout or dies (it may even kill itself) is killed and reaped, and
its batch is marked failed; the worker goes on. A user's code (a "module:attr" task, the `prompts` task's
reward function) runs this way by default (`rollout.reward_isolation: auto`); the built-in tasks are pure
Python and run in-process.

If every sample of a batch *raised or returned garbage*, the reward function is broken rather than unlucky:
`RewardError` is raised with the first failure, and the run stops with that message. Timeouts and dead
children are infrastructure faults: those samples are masked and training goes on.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import numbers


class RewardError(RuntimeError):
    """Every reward of a batch failed."""


FLOAT32_MAX = 3.4028234663852886e38  # rewards are stored and learned from as float32


def _check(r) -> float:
    """A reward as a float: any finite real number float32 holds, or a bool (True = 1.0, as in
    `return completion == target`), also as a 0-dim numpy array or torch tensor (`return torch.tensor(x)`)."""
    if getattr(r, "ndim", None) == 0 and not isinstance(r, numbers.Number) and callable(getattr(r, "item", None)):
        r = r.item()  # a 0-dim array or tensor: its Python number
    if isinstance(r, bool) or getattr(getattr(r, "dtype", None), "kind", None) == "b":  # numpy's bool_ too
        return float(r)
    if not isinstance(r, numbers.Real):
        raise ValueError(f"returned {r!r} (a {type(r).__name__}), expected a finite number: a float, an int, a bool "
                         "or a 0-dim numpy/torch value")
    if not math.isfinite(r):
        raise ValueError(f"returned {r!r}, expected a finite number")
    if abs(float(r)) > FLOAT32_MAX:
        raise ValueError(f"returned {r!r}, beyond float32's range (±3.4e38), in which rewards are stored")
    return float(r)


def score_each(task, prompts: list[str], completions: list[str]) -> tuple[list[float], list[bool], list[str]]:
    """Rewards, ok flags and error texts, in this process. Never raises for the function's faults."""
    batch_fn = getattr(task, "reward_batch", None)
    if callable(batch_fn):
        try:
            values = list(batch_fn(prompts, completions))
            if len(values) != len(prompts):
                raise ValueError(f"reward_batch returned {len(values)} values for {len(prompts)} samples")
        except Exception as e:  # a user's reward function may raise anything: the batch is masked
            msg = f"{type(e).__name__}: {e}"
            return [0.0] * len(prompts), [False] * len(prompts), [msg] * len(prompts)
    else:
        values = [None] * len(prompts)
    rewards, ok, errors = [], [], []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        try:
            rewards.append(_check(values[i] if callable(batch_fn) else task.reward(prompt, completion)))
            ok.append(True)
        except Exception as e:  # one bad sample is masked, the others count
            rewards.append(0.0)
            ok.append(False)
            errors.append(f"{type(e).__name__}: {e}")
    return rewards, ok, errors


def _child(task, prompts, completions, conn) -> None:
    conn.send(score_each(task, prompts, completions))
    conn.close()


def score_in_subprocess(task, prompts: list[str], completions: list[str], timeout_s: float):
    """`score_each` in a forked child, killed after `timeout_s`. Returns (rewards, ok, errors, infra_error)."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(task, prompts, completions, send), daemon=True)
    child.start()
    send.close()
    result, problem = None, None
    try:
        if recv.poll(timeout_s):
            result = recv.recv()
        else:
            problem = f"the reward function did not finish within rollout.reward_timeout_s={timeout_s:g}s"
    except (EOFError, OSError):
        problem = "the reward process died"
    finally:
        recv.close()
        if child.is_alive():
            child.kill()
        child.join(timeout=10)
    if result is None:
        if problem == "the reward process died":
            problem += f" (exit code {child.exitcode})"
        n = len(prompts)
        return [0.0] * n, [False] * n, [problem] * n, problem
    return (*result, None)


def score(task, prompts: list[str], completions: list[str], isolation: str = "none",
          timeout_s: float = 30.0) -> tuple[list[float], list[bool], list[str]]:
    """Rewards for (prompt, completion) pairs.

    Args:
        isolation: "none" (in this process) or "process" (a killable child with a timeout).
    Returns:
        rewards (0.0 where failed), ok flags, and the error text of each failure (in order).
    Raises:
        RewardError when the function raised or returned garbage for every sample.
    """
    if not prompts:
        return [], [], []
    if isolation == "process":
        rewards, ok, errors, infra = score_in_subprocess(task, prompts, completions, timeout_s)
        if infra is not None:
            return rewards, ok, errors
    else:
        rewards, ok, errors = score_each(task, prompts, completions)
    if not any(ok):
        raise RewardError(
            f"the reward function of task {getattr(task, 'name', '?')!r} failed on all {len(prompts)} samples; "
            f"first failure, for prompt {prompts[0]!r} and completion {completions[0]!r}: {errors[0]}"
        )
    return rewards, ok, errors
