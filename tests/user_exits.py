"""A user's module that calls sys.exit() when imported (a script's guard gone wrong), loaded by tests as
'tests.user_exits:score'."""

import sys

sys.exit(3)
