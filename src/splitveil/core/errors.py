"""One exception hierarchy. Every error carries a message written for the user, on one line.

The CLI turns a `SplitveilError` into that line on stderr and exit status 2 (bad input) without a traceback.
"""


class SplitveilError(Exception):
    """Base of every error splitveil raises on purpose."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = " ".join(str(message).split())  # always one line


class ConfigError(SplitveilError):
    """A bad option, value or combination of options."""


class ModelNotFoundError(SplitveilError):
    """An unknown model name, a missing model package or an unreadable model directory."""


class PlanError(SplitveilError):
    """A split plan that does not fit the model (cut out of range, cuts not increasing, empty part)."""


class WireError(SplitveilError):
    """A malformed, oversized or unexpected frame."""


class TransportError(SplitveilError):
    """The remote side refused a request or could not be reached."""
