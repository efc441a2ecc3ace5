"""What a config starts from: the task, with the policy's tokenizer, and the initial policy.

With `model.init_from` both come from a Hugging Face GPT-2 folder: its tokenizer.json encodes the task's text
and its weights are the initial policy. The learner, every rollout worker and `distpg eval` call these
functions, so they all load the same folder and start from identical weights. Without it, the task keeps its
own character tokenizer and the weights are a fresh init from `run.seed`.
"""

from __future__ import annotations

from distpg.config import Config, ConfigError
from distpg.model import GPT, policy_from_config
from distpg.tasks import Task, make_task


def task_for(cfg: Config) -> Task:
    """The task of a config, encoding its text with the policy's tokenizer."""
    tokenizer = None
    if cfg.model.init_from:
        from distpg.hf import load_tokenizer

        try:
            tokenizer = load_tokenizer(cfg.model.init_from)
        except ValueError as e:
            raise ConfigError(f"model.init_from={cfg.model.init_from!r}: {e}") from None
    return make_task(cfg.task, tokenizer)


def initial_policy(cfg: Config, device: str = "cpu") -> tuple[Task, GPT]:
    """(the task, the policy before any update) of a config, the policy on `device`."""
    task = task_for(cfg)
    return task, policy_from_config(cfg.model, task.tokenizer.vocab_size, cfg.run.seed, device)
