"""`distpg eval`'s scoring on a real (briefly trained) policy and its exact-match rule."""

import pytest

from distpg import kernels
from distpg.evaluate import evaluate, exact_match
from distpg.learner import Learner
from distpg.policy import task_for
from tests.conftest import small_config


@pytest.mark.parametrize("completion, target, same", [
    (" river", "river", True),  # a GPT-2-style completion starts with a space
    ("river\n", "river", True),
    ("dcba", "dcba", True),
    ("dcb a", "dcba", False),  # whitespace inside counts
    ("dcb", "dcba", False),
    ("", "", True),
])
def test_exact_match_ignores_whitespace_at_the_ends_only(completion, target, same):
    assert exact_match(completion, target) is same


def test_evaluate_counts_exact_matches_of_the_greedy_completions(pack_every_weight):
    cfg = small_config()
    learner = Learner(cfg)
    result = evaluate(cfg, learner.model.eval())
    assert result.num_prompts == len(result.samples) > 0
    expected = sum(exact_match(c, t) for _, c, t, _ in result.samples) / result.num_prompts
    assert result.exact_match == expected
    # greedy decoding is deterministic: the same policy gives the same completions
    again = evaluate(cfg, learner.model)
    assert [s[1] for s in again.samples] == [s[1] for s in result.samples]
    assert learner.model not in kernels._packs  # the pre-packed weights do not outlive the call
    # the reward is the task's own on each completion
    task = task_for(cfg)
    assert [task.reward(p, c) for p, c, _, _ in result.samples] == [r for *_, r in result.samples]
