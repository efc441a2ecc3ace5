"""`sort`: the prompt is `length` characters from `alphabet` then "="; the completion should be the same
characters in sorted order. Reward: fraction of positions right."""

from __future__ import annotations

from distpg.tasks.reverse import ReverseTask


class SortTask(ReverseTask):
    name = "sort"

    def target(self, prompt: str) -> str:
        return "".join(sorted(prompt[:-1]))
