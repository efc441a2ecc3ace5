"""`addition`: the prompt is "a+b=" with a and b of `digits` digits each (zero-padded, so every prompt has
the same shape); the completion should be the decimal sum, without leading zeros. Reward: fraction of
digits right, position by position from the left (a wrong length costs the missing or extra digits)."""

from __future__ import annotations

import numpy as np

from distpg.tasks.base import CharTask


class AdditionTask(CharTask):
    name = "addition"
    charset = "0123456789+="

    def __init__(self, cfg) -> None:
        if not 1 <= cfg.digits <= 9:
            raise ValueError(f"task.digits={cfg.digits}: must be between 1 and 9")
        self.digits = cfg.digits
        self.max_prompt_len = 2 * self.digits + 2
        self.max_new_tokens = self.digits + 2  # the longest sum, then <eos>
        self.num_prompts = 10 ** (2 * self.digits)
        super().__init__(cfg)

    def random_prompt(self, rng: np.random.Generator) -> str:
        a, b = rng.integers(0, 10**self.digits, 2)
        return f"{a:0{self.digits}d}+{b:0{self.digits}d}="

    def target(self, prompt: str) -> str:
        a, b = prompt[:-1].split("+")
        return str(int(a) + int(b))
