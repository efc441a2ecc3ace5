"""Scoring completions with a task's reward function, so that a misbehaving function cannot poison a run.

Each sample is scored on its own: an exception, or a result that is not a finite number, marks that
sample `reward_ok = False` (it is left out of the gradient and counted in `rollout/failed_rewards`).
If every sample of a call fails, the reward function is broken rather than unlucky: `RewardError` is
raised with the first failure, and the run stops with that message.
"""

from __future__ import annotations

import math
import numbers


class RewardError(RuntimeError):
    """Every reward of a batch failed."""


def score(task, prompts: list[str], completions: list[str]) -> tuple[list[float], list[bool], list[str]]:
    """Rewards for (prompt, completion) pairs.

    Returns:
        rewards (0.0 where failed), ok flags, and the error text of each failure (in order).
    """
    rewards, ok, errors = [], [], []
    for prompt, completion in zip(prompts, completions):
        try:
            r = task.reward(prompt, completion)
            if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r):
                raise ValueError(f"returned {r!r}, expected a finite number")
            rewards.append(float(r))
            ok.append(True)
        except Exception as e:  # a user's reward function may raise anything; the sample is masked
            rewards.append(0.0)
            ok.append(False)
            errors.append(f"{type(e).__name__}: {e}")
    if prompts and not any(ok):
        raise RewardError(
            f"the reward function of task {getattr(task, 'name', '?')!r} failed on all {len(prompts)} samples; "
            f"first failure, for prompt {prompts[0]!r} and completion {completions[0]!r}: {errors[0]}"
        )
    return rewards, ok, errors
