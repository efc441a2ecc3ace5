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
