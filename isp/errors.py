"""Errors that reach a user: one line that says what is wrong and how to fix it."""


class InputError(ValueError):
    """Bad user input (file, option, config). The CLIs print it as one line and exit 2."""


class RawReadError(InputError):
    """A file that cannot be read as a supported camera RAW."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
