"""The one exception type the command line shows as a plain message instead of a traceback."""


class PearError(Exception):
    """A user-facing error: says what is wrong, where (file, row, id) and what to do."""
