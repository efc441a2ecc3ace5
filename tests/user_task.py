"""A user's own task, loaded by tests as 'tests.user_task:make'."""

from distpg.tasks import CharTask


class Echo(CharTask):
    """Answer a fixed word whatever the prompt."""

    name = "echo"
    charset = "abcdefghijklmnopqrstuvwxyz="
    max_prompt_len = 4
    max_new_tokens = 3
    num_prompts = 26**3

    def __init__(self, cfg):
        self.word = (cfg.params or {}).get("word", "ok")
        super().__init__(cfg)

    def random_prompt(self, rng):
        return "".join(self.charset[i] for i in rng.integers(0, 26, 3)) + "="

    def target(self, prompt):
        return self.word


def make(cfg):
    return Echo(cfg)


class AlwaysFails(Echo):
    name = "always_fails"

    def reward(self, prompt, completion):
        raise RuntimeError("reward service unavailable")


def always_fails(cfg):
    return AlwaysFails(cfg)


def broken_factory(cfg):
    raise RuntimeError("boom")


def not_a_task(cfg):
    return object()


class Misbehaving(Echo):
    """A reward function that misbehaves on purpose, chosen by task.params['fault']."""

    name = "misbehaving"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.params = cfg.params or {}
        self.fault = self.params.get("fault", "none")

    def reward(self, prompt, completion):
        import os
        import signal
        import time

        if self.fault == "hang":
            time.sleep(3600)
        if self.fault == "suicide":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault == "some_raise" and prompt[0] < "m":
            raise KeyError(prompt)
        if self.fault == "listed" and prompt in self.params["prompts"]:
            raise KeyError(prompt)
        if self.fault == "after":  # fails on every sample once `calls` samples were scored (a service going down)
            with open(self.params["counter"], "a+") as f:
                f.seek(0)
                if f.read().count("\n") >= self.params["calls"]:
                    raise RuntimeError("reward service unavailable")
                f.write("x\n")
        if self.fault == "held_out" and prompt in self._eval_set:  # fails on every evaluation prompt only
            raise LookupError("no grader for held-out prompts")
        if self.fault == "nan":
            return float("nan") if prompt[0] < "m" else None
        return super().reward(prompt, completion)


def misbehaving(cfg):
    return Misbehaving(cfg)


class WrongLength(Echo):
    name = "wrong_length"

    def reward_batch(self, prompts, completions):
        return [1.0] * (len(prompts) - 1)


def wrong_length(cfg):
    return WrongLength(cfg)
