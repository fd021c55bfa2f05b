"""The project's exception types: what went wrong with the user's input, in one line.

Two kinds of failure are the user's to fix, and the command line maps each to an exit code
(see README, "Error contract"):

- :class:`UsageError` (exit code 2): an argument or option value that cannot work (a size of
  zero, a device this machine does not have, a folder with no images, an output path that is
  a file). Nothing has been loaded or written when it is raised.
- :class:`InputError` (exit code 1): an input that exists but cannot be read (a folder whose
  images all fail to decode); :class:`CheckpointError`, its subclass, for checkpoints (truncated,
  foreign, hostile pickle, weights that do not fit the architecture).

Any other exception is a bug in asg_probe (or its dependencies): the command line exits with 1,
one line and a hint to rerun with ``--debug`` for the traceback.

Both subclass :class:`ValueError`, so code written against the library's earlier
``ValueError`` keeps working.

Examples
--------
>>> from asg_probe.errors import UsageError
>>> try:
...     raise UsageError("batch_size must be positive, got 0")
... except ValueError as exc:
...     print(type(exc).__name__, exc)
UsageError batch_size must be positive, got 0
"""
from __future__ import annotations

__all__ = ["AsgProbeError", "UsageError", "InputError", "CheckpointError"]


class AsgProbeError(ValueError):
    """Base of the errors whose message tells the user what to change."""

    exit_code = 1


class UsageError(AsgProbeError):
    """Bad input from the user (argument, option value, path): exit code 2."""

    exit_code = 2


class InputError(AsgProbeError):
    """An input that exists but cannot be read or used (checkpoint, image folder): exit code 1."""

    exit_code = 1


class CheckpointError(InputError):
    """A checkpoint could not be read or does not fit the model; the message says what to do (exit 1).

    Defined here rather than in :mod:`asg_probe.checkpoint` (which re-exports it) so that the
    modules ``checkpoint`` calls (Hugging Face and named-model loaders) can raise it without
    importing ``checkpoint`` back.
    """
