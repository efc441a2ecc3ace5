"""Scoring completions with a task's reward functions, so that a misbehaving function cannot poison a run.

A task scores one sample with `reward(prompt, completion)`, or a whole batch with an optional
`reward_batch(prompts, completions) -> list`, or with several functions, `reward_functions` (a list of
`RewardFunction`: a name, the function, whether it takes a batch, a weight), whose weighted sum is a sample's
reward, as TRL sums its `reward_funcs` with `reward_weights`. A function returning None for a sample does not
score it (TRL's "not applicable"); a sample no function scores is masked. An `async def` function is awaited,
as TRL awaits one: every async function's calls for a batch (a function of one sample: one per sample) are
awaited together, so that they overlap, as TRL runs its async functions concurrently. Each value is checked:
an exception, or a value that is not a finite number, marks that sample `reward_ok = False` (left out of the
gradient and counted in `rollout/failed_rewards`); a batch result of
the wrong length fails the whole batch.

Isolation: with `isolation="process"` the functions run in a forked child process with a per-batch
timeout. A child that hangs past the timeout or dies (it may even kill itself) is killed and reaped, and
its batch is marked failed; the worker goes on. A user's code (a "module:attr" task, the `prompts` task's
reward functions) runs this way by default (`rollout.reward_isolation: auto`); the built-in tasks are pure
Python and run in-process.

If no sample of a training step was scored and the functions *failed* on some (raised, returned garbage), the
reward function is broken rather than unlucky: the run stops with the first failure (`step_failure`, read by the
driver from the step's batches, whatever the number of workers that sampled it; `score` raises `RewardError` for
one batch scored alone, as `distpg eval` does). Samples that no function scored only because each returned None
are no error here: None says a function does not apply, and TRL warns and trains on (the driver says how many
samples of a step got no reward, and stops where none of the run's first step did: see `NOT_SCORED`). Timeouts
and dead children are infrastructure faults: those samples are masked and training goes on (a run of steps with
nothing scored stops at learner.max_consecutive_skips).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import multiprocessing as mp
import numbers
from collections.abc import Callable
from dataclasses import dataclass


class RewardError(RuntimeError):
    """Every reward of a batch failed."""


# The error text of a sample that no function scored, each returning None (for one function; for several): the
# function does not apply to it. Such a sample is masked like a failed one, but a batch of them alone is no error
NOT_SCORED = ("returned None: no reward for this sample",
              "every reward function returned None for this sample (none applies to it)")


# the error text of every sample of a batch whose reward child hung past the timeout or died (`score_in_subprocess`):
# an infrastructure fault, not the function failing
TIMED_OUT, DIED = "the reward function did not finish within rollout.reward_timeout_s=", "the reward process died"


def not_scored(errors: list[str]) -> int:
    """How many of the failures `errors` (as `score` returns them) are samples no function scored (`NOT_SCORED`)."""
    return sum(e in NOT_SCORED for e in errors)


def function_failures(errors: list[str]) -> int:
    """How many of the failures `errors` (as `score` returns them) are the functions' own (they raised or returned
    no number): neither samples no function scored (`NOT_SCORED`) nor a hung or dead child's (`TIMED_OUT`, `DIED`)."""
    return sum(e not in NOT_SCORED and not e.startswith((TIMED_OUT, DIED)) for e in errors)


def first_failure(prompts: list[str], completions: list[str], ok: list[bool], errors: list[str],
                  width: int = 80) -> tuple[str, str] | None:
    """The first sample whose reward failed (raised, returned garbage, timed out; not one that no function
    scored, `NOT_SCORED`): ('for prompt P and completion C', its error), P and C cut to `width` characters; None
    if there is none. `ok`, `errors` as `score` returns them."""
    failed = [i for i, good in enumerate(ok) if not good]
    k = next((k for k, e in enumerate(errors) if e not in NOT_SCORED), None)
    if k is None:
        return None
    i = failed[k]
    cut = lambda s: repr(s if len(s) <= width else s[:width] + "...")  # noqa: E731
    return f"for prompt {cut(prompts[i])} and completion {cut(completions[i])}", errors[k]


# the keys under which a rollout batch's schema metadata names its first failed reward (`first_failure`), and
# counts its samples whose functions failed (`function_failures`; absent where none did)
FAILED_FOR, FAILED_WITH, FUNCTION_FAILED = b"failed_for", b"failed_with", b"function_failed"


def failure_in(batches) -> tuple[str, str] | None:
    """The first failed reward that one of `batches` (rollout RecordBatches, in order) names in its metadata, as
    `first_failure` gives it; None where none does."""
    for b in batches:
        meta = b.schema.metadata or {}
        if FAILED_WITH in meta:
            return meta[FAILED_FOR].decode(), meta[FAILED_WITH].decode()
    return None


def step_failure(task_name: str, batches) -> str | None:
    """Why a training step stops the run, where no sample of it was scored and the reward functions failed on
    some (raised, returned no number): its samples' count and the first such failure, from the metadata of the
    step's rollout `batches` (RecordBatches, in worker order). None where any sample was scored, or where each
    failure is a sample no function scored or a hung or dead reward child (masked; see the module's docstring).
    Per step, not per worker's batch: how many workers share a step does not change what stops a run."""
    first = next((b for b in batches if FUNCTION_FAILED in (b.schema.metadata or {})), None)
    if first is None or any(any(b.column("reward_ok").to_pylist()) for b in batches):
        return None
    n = sum(b.num_rows for b in batches)
    none = sum(int((b.schema.metadata or {}).get(b"not_scored", 0)) for b in batches)
    where, error = failure_in([first])
    return (f"the reward of task {task_name!r} failed on all {n} samples of the step"
            + (f" ({none} of them got None from every function)" if none else "")
            + f"; first failure, {where}: {error}")


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


@dataclass(frozen=True)
class RewardFunction:
    """One of a task's reward functions: `fn(prompts, completions) -> values` (one per sample) when `batched`,
    else `fn(prompt, completion) -> value`. A sample's reward is the weighted sum of the values its functions
    give it; a function returning None for a sample does not score it (TRL's "not applicable")."""

    name: str
    fn: Callable
    batched: bool = False
    weight: float = 1.0
    ids: bool = False  # batched: also called with completion_ids=[...] (each completion's token ids), as TRL does


def reward_functions(task) -> list[RewardFunction]:
    """A task's reward functions: its `reward_functions` (several, named and weighted), else its
    `reward_batch` (a whole batch), else its `reward` (one sample)."""
    several = getattr(task, "reward_functions", None)
    if several:
        return list(several)
    batch_fn = getattr(task, "reward_batch", None)
    if callable(batch_fn):
        return [RewardFunction("reward_batch", batch_fn, batched=True)]
    return [RewardFunction("reward", task.reward)]


def reward_parts(task) -> list[str]:
    """The names of a task's reward functions when it has several (each one's values are kept beside the sum:
    the rollouts' `reward/NAME` columns, the `rollout/rewards/NAME/*` metrics); [] for one."""
    fns = reward_functions(task)
    return [f.name for f in fns] if len(fns) > 1 else []


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _awaited(values: list) -> list:
    """`values` with each awaitable one (what an `async def` reward function returns: TRL's GRPOTrainer takes
    those too, e.g. an LLM judge) replaced by its result, or by the exception it raised; all awaited together on
    a loop of their own, so that a judge's calls for a batch's samples overlap; the others as they are."""
    pending = [i for i, v in enumerate(values) if inspect.isawaitable(v)]
    if not pending:
        return values

    async def gather():
        return await asyncio.gather(*(values[i] for i in pending), return_exceptions=True)

    out = list(values)
    for i, result in zip(pending, asyncio.run(gather())):
        out[i] = result
    return out


def _call(f: RewardFunction, prompts: list[str], completions: list[str], completion_ids: list | None) -> list:
    """`f`'s raw outputs, not yet awaited or checked: a batched function's `[its return value]`, or the
    exception it raised; else one entry per sample (its return value, or the exception it raised)."""
    if f.batched:
        try:
            return [f.fn(prompts, completions, completion_ids) if f.ids else f.fn(prompts, completions)]
        except Exception as e:  # a user's reward function may raise anything: the batch is masked
            return e
    out = []
    for i in range(len(prompts)):
        try:
            out.append(f.fn(prompts[i], completions[i]))
        except Exception as e:  # one bad sample is masked, the others count
            out.append(e)
    return out


def _values(f: RewardFunction, out, n: int) -> list[tuple[float | None, str | None]]:
    """Each sample's (value, or None where `f` returned None or failed; the failure's text, or None) from `f`'s
    outputs (`_call`, awaited)."""
    if f.batched:
        try:
            if isinstance(out, Exception):
                raise out
            (out,) = out
            if isinstance(out, BaseException):  # what the awaited function raised (a cancellation: as an error)
                raise out if isinstance(out, Exception) else RuntimeError(f"{type(out).__name__}: {out}")
            if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__iter__") or getattr(out, "ndim", 1) == 0:
                # `return "1.0"` would count its characters, `return 1.0` fail inside list(): say what it was
                raise ValueError(f"{f.name} returned {repr(out)[:60]} (a {type(out).__name__}), expected a list of "
                                 f"{n} values, one per sample: a function with a `completions` parameter scores "
                                 "the whole batch, as TRL calls it")
            out = list(out)
            if len(out) != n:
                raise ValueError(f"{f.name} returned {len(out)} values for {n} samples")
        except Exception as e:  # a user's reward function may raise anything: the batch is masked
            return [(None, _error(e))] * n
    result = []
    for value in out:
        try:
            if isinstance(value, Exception):
                raise value
            result.append((None if value is None else _check(value), None))
        except Exception as e:  # one bad sample is masked, the others count
            result.append((None, _error(e)))
    return result


def _scored(fns: list[RewardFunction], prompts: list[str], completions: list[str],
            completion_ids: list | None) -> list[list[tuple[float | None, str | None]]]:
    """`_values` of every function; the `async def` ones' calls (every function's, every sample's) awaited
    together, as TRL's GRPOTrainer runs its async reward functions concurrently."""
    raw = [_call(f, prompts, completions, completion_ids) for f in fns]
    done = iter(_awaited([x for r in raw if isinstance(r, list) for x in r]))
    raw = [[next(done) for _ in r] if isinstance(r, list) else r for r in raw]
    return [_values(f, r, len(prompts)) for f, r in zip(fns, raw)]


def score_each(task, prompts: list[str], completions: list[str],
               completion_ids: list | None = None) -> tuple[list[float], list[bool], list[str], dict]:
    """Rewards, ok flags, error texts and, for a task with several reward functions, each one's values
    ({name: [value or None per sample]}), in this process. Never raises for the functions' faults.

    A sample is masked (ok False, reward 0.0) where a function failed on it (raised, or returned something
    that is not a finite number) or where every function returned None."""
    fns = reward_functions(task)
    values = _scored(fns, prompts, completions, completion_ids)
    several = len(fns) > 1
    rewards, ok, errors = [], [], []
    for i in range(len(prompts)):
        failed = [f"{f.name}: {v[i][1]}" if several else v[i][1] for f, v in zip(fns, values) if v[i][1]]
        scored = [f.weight * v[i][0] for f, v in zip(fns, values) if v[i][0] is not None]
        if not failed and not scored:
            failed = [NOT_SCORED[int(several)]]
        if not failed:
            try:
                rewards.append(_check(math.fsum(scored)))
                ok.append(True)
                continue
            except ValueError as e:  # the weighted sum beyond float32
                failed = [f"the weighted sum of the reward functions {_error(e)}"]
        rewards.append(0.0)
        ok.append(False)
        errors.append(failed[0])
    parts = {f.name: [x for x, _ in v] for f, v in zip(fns, values)} if several else {}
    return rewards, ok, errors, parts


def _child(task, prompts, completions, completion_ids, conn) -> None:
    conn.send(score_each(task, prompts, completions, completion_ids))
    conn.close()


def score_in_subprocess(task, prompts: list[str], completions: list[str], timeout_s: float,
                        completion_ids: list | None = None):
    """`score_each` in a forked child, killed after `timeout_s`. Returns (rewards, ok, errors, parts,
    infra_error)."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(task, prompts, completions, completion_ids, send), daemon=True)
    child.start()
    send.close()
    result, problem = None, None
    try:
        if recv.poll(timeout_s):
            result = recv.recv()
        else:
            problem = f"{TIMED_OUT}{timeout_s:g}s"
    except (EOFError, OSError):
        problem = DIED
    finally:
        recv.close()
        if child.is_alive():
            child.kill()
        child.join(timeout=10)
    if result is None:
        if problem == DIED:
            problem += f" (exit code {child.exitcode})"
        n = len(prompts)
        return [0.0] * n, [False] * n, [problem] * n, {}, problem
    return (*result, None)


def score(task, prompts: list[str], completions: list[str], isolation: str = "none", timeout_s: float = 30.0,
          completion_ids: list | None = None, check: bool = True) -> tuple[list[float], list[bool], list[str], dict]:
    """Rewards for (prompt, completion) pairs.

    Args:
        isolation: "none" (in this process) or "process" (a killable child with a timeout).
        completion_ids: each completion's token ids, for the functions that take them (TRL's completion_ids).
        check: raise where every sample failed (below); False for a rollout worker's share of a step, which the
            driver checks with the step's other shares (`step_failure`).
    Returns:
        rewards (0.0 where failed), ok flags, the error text of each failure (in order), and with several reward
        functions each one's values by name (None where it gave none; {} when the child hung or died).
    Raises:
        RewardError (with `check`) when no sample was scored and the functions failed (raised, returned garbage)
        on some; not where each returned None (does not apply) on every sample: those are masked.
    """
    if not prompts:
        return [], [], [], {}
    if isolation == "process":
        rewards, ok, errors, parts, infra = score_in_subprocess(task, prompts, completions, timeout_s, completion_ids)
        if infra is not None:
            return rewards, ok, errors, parts
    else:
        rewards, ok, errors, parts = score_each(task, prompts, completions, completion_ids)
    none = not_scored(errors)
    if check and not any(ok) and none < len(prompts):  # every sample failed (ok False: errors[i] is sample i's)
        several = "functions" if reward_parts(task) else "function"
        i = next(i for i, e in enumerate(errors) if e not in NOT_SCORED)
        raise RewardError(
            f"the reward {several} of task {getattr(task, 'name', '?')!r} failed on all {len(prompts)} samples"
            + (f" ({none} of them got None from every function)" if none else "")
            + f"; first failure, for prompt {prompts[i]!r} and completion {completions[i]!r}: {errors[i]}"
        )
    return rewards, ok, errors, parts
