"""The error type for bad user input, shared by every layer."""


class InputError(ValueError):
    """Input the user can fix: the commands print it as one line and exit non-zero."""


def first_line(error: BaseException) -> str:
    """An error's message cut to its first line, for one-line reports; its type when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
