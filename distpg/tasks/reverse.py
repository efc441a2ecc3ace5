"""`reverse`: the prompt is `length` characters from `alphabet` then "="; the completion should be the
characters in reverse order. Reward: fraction of positions right."""

from __future__ import annotations

import numpy as np

from distpg.tasks.base import CharTask


class ReverseTask(CharTask):
    name = "reverse"

    def __init__(self, cfg) -> None:
        if cfg.length < 1:
            raise ValueError(f"task.length={cfg.length}: must be at least 1")
        if len(set(cfg.alphabet)) < 2 or "=" in cfg.alphabet:
            raise ValueError(f"task.alphabet={cfg.alphabet!r}: needs 2 or more distinct characters, no '='")
        self.alphabet = "".join(sorted(set(cfg.alphabet)))
        self.length = cfg.length
        self.charset = self.alphabet + "="
        self.max_prompt_len = self.length + 1
        # the answer has exactly `length` characters, so the completion ends there without an <eos>
        self.max_new_tokens = self.length
        self.num_prompts = len(self.alphabet) ** self.length
        super().__init__(cfg)

    def random_prompt(self, rng: np.random.Generator) -> str:
        chars = rng.integers(0, len(self.alphabet), self.length)
        return "".join(self.alphabet[i] for i in chars) + "="

    def target(self, prompt: str) -> str:
        return prompt[:-1][::-1]
