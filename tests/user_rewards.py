"""Reward functions for the `prompts` task tests, named as 'tests.user_rewards:NAME'."""


def length_of_reference(prompt, completion, reference):
    """1.0 when the completion is as long as the reference (any characters)."""
    return float(len(completion) == len(reference))


def needs_reference(prompt, completion, reference):
    if reference is None:
        raise ValueError(f"no reference for {prompt!r}")
    return 1.0


def two_arguments(prompt, completion):
    return 0.0


def kills_its_process(prompt, completion, reference):
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


NOT_CALLABLE = 3
