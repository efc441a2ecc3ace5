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


def trl_style(completions, answer, **kwargs):
    """TRL's form of a reward function: a batch, a dataset column by name, the other columns in **kwargs."""
    return [float(c == a) + kwargs["id"][i] / 100 for i, (c, a) in enumerate(zip(completions, answer))]


def trl_without_kwargs(completions, answer):
    return [0.0] * len(completions)


def trl_with_completion_ids(completions, completion_ids, **kwargs):
    """TRL's completion_ids: the number of tokens of each completion."""
    return [float(len(ids)) for ids in completion_ids]


def trl_with_trainer_state(completions, trainer_state, **kwargs):
    return [0.0] * len(completions)


def length_of_reference_or_none(prompt, completion, reference):
    """1.0 when the completion is as long as the reference (as long as the prompt's word without one)."""
    return float(len(completion) == len(reference if reference is not None else prompt.split()[-1][:-1]))


def length_unless_vowel(prompt, completion, reference):
    """One sample: the completion's length; None (not applicable) for a word starting with a vowel."""
    return None if prompt.split()[-1][0] in "aeiou" else float(len(completion))


def id_unless_zero(completions, id, **kwargs):
    """TRL's form: the row's `id` / 100; None (not applicable) for id 0."""
    return [None if i == 0 else i / 100 for i in id]


async def trl_async(completions, answer, **kwargs):
    """TRL's form as an `async def` function (an LLM judge's, say): awaited, as TRL's GRPOTrainer awaits it."""
    import asyncio

    await asyncio.sleep(0)
    return [float(c == a) for c, a in zip(completions, answer)]


async def async_length_of_reference(prompt, completion, reference):
    """`length_of_reference` as an `async def` function of one sample."""
    return float(len(completion) == len(reference))


def trl_with_log_metric(completions, log_metric, **kwargs):
    """Recent TRL passes log_metric (a callable to log a scalar) too."""
    log_metric("judge_calls", len(completions))
    return [0.0] * len(completions)


IN_FLIGHT = {"now": 0, "most": 0}


async def async_judge(prompt, completion, reference):
    """One sample, as an LLM judge's call would be: its reward is the most calls in flight at once so far (every
    sample of the batch when they are awaited together, 1 when one after another)."""
    import asyncio

    IN_FLIGHT["now"] += 1
    IN_FLIGHT["most"] = max(IN_FLIGHT["most"], IN_FLIGHT["now"])
    await asyncio.sleep(0.01)
    IN_FLIGHT["now"] -= 1
    return float(IN_FLIGHT["most"])


async def async_judge_too(prompt, completion, reference):
    """A second judge counting in the same `IN_FLIGHT`: several async functions awaited together see each other's
    calls in flight."""
    return await async_judge(prompt, completion, reference)


def forgot_return(prompt, completion, reference):
    """A reward function missing its `return`: it gives None (TRL's "does not apply") for every sample."""
    float(len(completion))


def raises_on_vowel(prompt, completion, reference):
    """A user's bug on some samples: raises for a word starting with a vowel, else the completion's length."""
    word = prompt.split()[-1][:-1]
    if word[0] in "aeiou":
        raise RuntimeError(f"my bug on {word!r}")
    return float(len(completion))
