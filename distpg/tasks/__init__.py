"""Tasks: a prompt source and a reward function, by name.

Built in: `reverse`, `sort`, `addition` (see each module) and `prompts` (your own prompts file and reward
function). A user's own task is named "module:attr", where `attr` is a callable taking the `TaskConfig` and
returning an object with the `Task` interface below (a subclass of `CharTask` is the easiest way to get one).

A policy that comes with its own tokenizer (`model.init_from`) encodes every task's text with it: `make_task`
hands it to the `prompts` task and puts it in place of any other task's character tokenizer.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from distpg.config import ConfigError
from distpg.tasks.addition import AdditionTask
from distpg.tasks.base import CharTask, load_attr
from distpg.tasks.prompts import PromptsTask
from distpg.tasks.reverse import ReverseTask
from distpg.tasks.sort import SortTask
from distpg.tokenizer import Tokenizer

BUILTIN_TASKS = {"reverse": ReverseTask, "sort": SortTask, "addition": AdditionTask, "prompts": PromptsTask}


@runtime_checkable
class Task(Protocol):
    """What the rollout workers and `distpg eval` need from a task."""

    name: str
    tokenizer: Tokenizer
    max_prompt_len: int  # tokens (characters, for a character tokenizer)
    max_new_tokens: int  # default completion budget in tokens (the <eos> included where the task needs one)

    def sample_prompts(self, rng: np.random.Generator, n: int) -> list[str]: ...

    def eval_prompts(self) -> list[str]: ...

    def reward(self, prompt: str, completion: str) -> float: ...

    def target(self, prompt: str) -> str: ...

    # optional: `reward_batch(prompts, completions) -> list` scores a whole batch in one call, and
    # `reward_functions` (a list of `distpg.rewards.RewardFunction`) several named, weighted functions whose sum
    # is a sample's reward (see distpg.rewards); either takes the place of `reward` in training and eval


def make_task(cfg, tokenizer: Tokenizer | None = None) -> Task:
    """Build the task named by `cfg.name` (a built-in name or "module:attr").

    Args:
        cfg: the TaskConfig.
        tokenizer: the policy's own tokenizer (model.init_from), used for the task's text; None: the task's own.
    """
    task = _build_task(cfg, tokenizer)
    if tokenizer is not None:
        if cfg.name != "prompts":
            _count_in_tokens(task, tokenizer)
        task.tokenizer = tokenizer
    return task


def _count_in_tokens(task: Task, tokenizer: Tokenizer) -> None:
    """A task over an alphabet (`charset`) counts its prompt length and completion budget in characters, one
    token each with its own character tokenizer. With another tokenizer a character may take more (a byte-level
    BPE writes 'α' as two bytes' tokens) and a prompt may gain a token of the tokenizer's own (a BOS its
    post-processor adds): scale both budgets to it, so that the model still holds the longest prompt and a
    completion has room for the whole answer, and keep what was done in `task.token_budget` (not set where
    nothing changed). A character the tokenizer cannot write is left to `validate_with_task` to name."""
    charset = getattr(task, "charset", None)
    if not isinstance(charset, str) or not charset:
        return
    try:
        added = len(tokenizer.encode(""))
        per_char = max(len(tokenizer.encode(c)) - added for c in set(charset))
    except Exception:  # the tokenizers library raises its own types (a WordLevel vocabulary has no unknown token)
        return
    if per_char <= 1 and added == 0:
        return
    per_char = max(per_char, 1)
    before = (task.max_prompt_len, task.max_new_tokens)
    task.max_prompt_len = added + per_char * task.max_prompt_len
    task.max_new_tokens = per_char * task.max_new_tokens
    task.token_budget = (per_char, added, before)


def _takes(name: str, field: str) -> bool:
    return name == "prompts" if field in ("prompts_path", "reward", "reward_weights", "max_prompt_tokens",
                                          "eval_prompts_path") else ":" in name


def _build_task(cfg, tokenizer: Tokenizer | None) -> Task:
    name = cfg.name
    unused = [f"task.{k}" for k, v in (("params", cfg.params), ("prompts_path", cfg.prompts_path),
                                        ("reward", cfg.reward), ("reward_weights", cfg.reward_weights),
                                        ("max_prompt_tokens", cfg.max_prompt_tokens),
                                        ("eval_prompts_path", cfg.eval_prompts_path))
              if v is not None and v != {} and not _takes(name, k)]
    if unused:  # set but read by no task: a typo of task.name, or a field meant for another task
        raise ConfigError(f"{' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by "
                          f"task.name={name!r}: task.params is for a user's task ('module:attr'), "
                          "task.prompts_path, task.reward, task.reward_weights, task.max_prompt_tokens and "
                          "task.eval_prompts_path for task.name=prompts")
    if name in BUILTIN_TASKS:
        try:
            # the prompts task measures its prompts and references in the policy's tokens
            return PromptsTask(cfg, tokenizer) if name == "prompts" else BUILTIN_TASKS[name](cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if ":" not in name:
        raise ConfigError(
            f"task.name={name!r} is not a built-in task ({', '.join(sorted(BUILTIN_TASKS))}) "
            "and not of the form 'module:attr'"
        )
    try:
        factory = load_attr(name, "task.name")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        task = factory(cfg)
    except Exception as e:  # a user's factory may raise anything: report it as a config problem
        raise ConfigError(f"task.name={name!r}: building the task failed: {type(e).__name__}: {e}") from None
    missing = [m for m in Task.__annotations__ if not hasattr(task, m)] + [
        m for m in ("sample_prompts", "eval_prompts", "reward", "target") if not callable(getattr(task, m, None))
    ]
    if missing:
        raise ConfigError(f"task.name={name!r}: the object it returned lacks {', '.join(missing)}")
    return task


__all__ = ["BUILTIN_TASKS", "CharTask", "PromptsTask", "Task", "make_task"]
