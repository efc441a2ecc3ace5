"""Worked examples that ship with the package: reward functions for the `prompts` task and a script that makes
a small random GPT-2 folder to try `model.init_from` without downloading anything."""
