"""Reward functions for the `prompts` task: `reward(prompt, completion, reference) -> float`.

Name one in a config as `task.reward: distpg.examples.rewards:match_reference`. Your own is any function with
this signature in a module the workers can import. It runs in a child process with a timeout; raising, or
returning NaN or a non-number, masks that sample (left out of the gradient, counted in
`rollout/failed_rewards`), and a function that fails on every sample of a batch stops the run with its error.
"""

from __future__ import annotations


def match_reference(prompt: str, completion: str, reference) -> float:
    """1.0 for the reference exactly (surrounding whitespace ignored); otherwise partial credit, the fraction
    of characters right position by position over the longer of the two, so extra characters cost as much as
    missing ones."""
    if reference is None:
        raise ValueError("match_reference needs a reference answer in the prompts file")
    got, want = completion.strip(), str(reference).strip()
    n = max(len(got), len(want))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(got, want)) / n
