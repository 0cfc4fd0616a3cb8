"""The one exception type a user can cause: the CLI prints its message and exits 1, without a traceback."""


class TrainferError(Exception):
    """A problem with the user's input (a path, a file, a flag): the message says what to do."""
