"""A user's module that raises when imported (as one reading an API key at import would), loaded by tests as
'tests.user_broken_import:score' (a reward function) and 'tests.user_broken_import:make' (a task factory)."""

raise RuntimeError("REWARD_API_KEY is not set")
