"""The exception types hfactory raises on purpose, in one module that imports nothing of hfactory.

Every error that describes something a user can fix (a spec, a command-line argument, a file, a
mask) derives from :class:`HFactoryError`. The command line maps exactly these (and pydantic's
``ValidationError`` for specs, and missing files) to exit status 2 with a one-line message;
anything else is a bug in hfactory or a library and keeps its traceback. The user-error types
also derive from ``ValueError`` so that code written against earlier releases, which raised
plain ``ValueError``, still catches them.
"""

from __future__ import annotations

from pydantic import ValidationError

__all__ = ["HFactoryError", "UsageError", "PlanError", "UnknownComponentError", "SpecKindError",
           "OverrideError", "NonFiniteLossError", "QuietAbort", "USER_ERRORS", "is_user_error"]


class HFactoryError(Exception):
    """Base of every error about input a user can fix; the message says what would be valid."""


class UsageError(HFactoryError, ValueError):
    """A bad argument to a public function or command (a value out of range, a wrong file kind,
    an option that does not apply to this model)."""


class PlanError(HFactoryError, ValueError):
    """A spec that validates field by field but cannot be built as a whole.

    Raised by :func:`hfactory.resolve` before any tensor exists. ``loc`` is the dotted path into
    the spec (``stages.2.token_mixer.window_size``) and the message says what would be valid.
    """

    def __init__(self, loc: str | tuple, message: str):
        if isinstance(loc, tuple):
            loc = ".".join(str(p) for p in loc)
        self.loc = loc
        self.message = message
        super().__init__(f"{loc}: {message}")


class UnknownComponentError(HFactoryError, ValueError):
    """A component name that no registry entry has; the message lists the registered names."""


class SpecKindError(HFactoryError, ValueError):
    """A spec of another model kind than the loader builds (an SFT spec given as an encoder spec)."""


class OverrideError(HFactoryError, ValueError):
    """An override path (``--set PATH=VALUE``, ``with_changes``) that matches nothing; ``path`` is
    the offending dotted path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class NonFiniteLossError(HFactoryError, RuntimeError):
    """The loss (or the test loss) became NaN or infinite; the run stopped without saving. A user
    error in the sense that the remedy is the user's (a lower learning rate, a warmup, clipping)."""


class QuietAbort(HFactoryError):
    """Raised in a torchrun process whose job failed in another process (which reports the
    error): exit with ``status`` without printing the same message once per process."""

    def __init__(self, message: str = "", status: int = 2):
        super().__init__(message)
        self.status = status


#: Exceptions reported as bad input (exit status 2, one message, no traceback): hfactory's own error
#: types, a spec failing validation, and a path that is missing or of the wrong kind. Built-in
#: ValueError and the like are not among them: from torch or from our own code they mean a bug.
USER_ERRORS = (HFactoryError, ValidationError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is reported as bad input (:data:`USER_ERRORS`) rather than as a bug."""
    return isinstance(err, USER_ERRORS)
