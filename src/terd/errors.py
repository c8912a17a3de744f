"""One exception type for everything the user can get wrong.

The CLI turns a :class:`TerdError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""


class TerdError(Exception):
    """A problem with the user's input (path, file, config, shape) — reported in one line."""
