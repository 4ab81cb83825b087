"""Errors that name the problem and the fix.

`InputError` subclasses ValueError and `CheckpointError` subclasses OSError, so code that
already catches the built-in kinds keeps working.
"""


class FastSAEError(Exception):
    """Base class of every error fastsae raises on purpose."""


class InputError(FastSAEError, ValueError):
    """Bad input to a module or op: wrong shape, dtype, device, or non-finite values."""


class ConfigError(FastSAEError, ValueError):
    """An SAE configuration that cannot describe a working SAE."""


class CheckpointError(FastSAEError, OSError):
    """A checkpoint that is missing, corrupt, or disagrees with its own config."""
