"""`CharTask`: the shared machinery of the character tasks: held-out evaluation prompts, training prompts
that never include them, and the positional partial-credit reward."""

from __future__ import annotations

import importlib
import traceback

import numpy as np

from distpg.tokenizer import CharTokenizer


def load_attr(spec: str, field: str):
    """The object named by `spec` = "module:attr" (a user's task factory or reward function).

    Raises:
        ValueError naming `field`, the module or attribute, and what is wrong.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{field}={spec!r} is not of the form 'module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{field}={spec!r}: cannot import module {module_name!r}: {e}") from None
    except (Exception, SystemExit) as e:  # a user's module may raise anything at import (a SyntaxError, a missing
        # API key), or call sys.exit(), which ended distpg with the module's status and not a word
        frames = traceback.extract_tb(e.__traceback__)
        where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames and not isinstance(e, SyntaxError) else ""
        raise ValueError(f"{field}={spec!r}: importing module {module_name!r} raised {type(e).__name__}: {e}"
                         f"{where}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise ValueError(f"{field}={spec!r}: module {module_name!r} has no attribute {attr!r}")
    return obj


def positional_reward(completion: str, target: str) -> float:
    """Fraction of positions right: matches / max(len(target), len(completion)), in [0, 1].

    Dividing by the longer of the two makes extra characters cost as much as missing ones.
    """
    n = max(len(target), len(completion))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(completion, target)) / n


class CharTask:
    """A task over a character alphabet with a known target per prompt.

    Subclasses set `name`, `charset`, `max_prompt_len`, `max_new_tokens`, `num_prompts` (size of the
    prompt space) and implement `random_prompt(rng)` and `target(prompt)`.
    """

    name = "char"
    charset = ""
    max_prompt_len = 0
    max_new_tokens = 0
    num_prompts = 0

    def __init__(self, cfg) -> None:
        self.num_eval = cfg.num_eval
        self.eval_seed = cfg.eval_seed
        self.tokenizer = CharTokenizer(self.charset)
        if self.num_prompts < 2 * self.num_eval:
            raise ValueError(
                f"task {self.name}: only {self.num_prompts} distinct prompts, too few to hold out "
                f"task.num_eval={self.num_eval} for evaluation and train on the rest; "
                f"give the task more distinct prompts (the built-in ones: a longer task.length or a larger "
                f"task.alphabet), or lower task.num_eval (at most {self.num_prompts // 2} here)"
            )
        self._eval = self._draw_distinct(np.random.default_rng(self.eval_seed), self.num_eval, exclude=set())
        self._eval_set = set(self._eval)

    def random_prompt(self, rng: np.random.Generator) -> str:
        raise NotImplementedError

    def target(self, prompt: str) -> str:
        raise NotImplementedError

    def reward(self, prompt: str, completion: str) -> float:
        return positional_reward(completion, self.target(prompt))

    def eval_prompts(self) -> list[str]:
        """The held-out prompts (fixed by task.eval_seed); training never sees them."""
        return list(self._eval)

    def sample_prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        """n training prompts (repeats allowed), none of them held out."""
        out = []
        while len(out) < n:
            p = self.random_prompt(rng)
            if p not in self._eval_set:
                out.append(p)
        return out

    def _draw_distinct(self, rng: np.random.Generator, n: int, exclude: set[str]) -> list[str]:
        seen: dict[str, None] = {}
        while len(seen) < n:
            p = self.random_prompt(rng)
            if p not in exclude:
                seen[p] = None
        return list(seen)
