"""The `fastsae` command: one subcommand per job, each in its own module.

On the command line a user error (fastsae's own error types, a missing file, a device this
machine lacks) ends the command with one line on stderr and exit status 1; `--debug` shows the
traceback instead. main(argv) called from Python raises the error as it is.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from .errors import ConfigError, FastSAEError

# subcommand -> module with add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "demo": "fastsae.demo",
    "convert": "fastsae.compat.formats.convert_cli",
    "toy-sweep": "fastsae.toy.sweep",
    "train": "fastsae.train_cli",
    "harvest": "fastsae.harvest",
    "eval": "fastsae.evaluate",
}

# Errors that are the user's to fix, not bugs: reported in one line. FileNotFoundError,
# PermissionError, IsADirectoryError and friends are OSErrors with a file name.
USER_ERRORS = (FastSAEError, OSError)
DEBUG_HELP = "on an error, show the full traceback instead of one line"


def check_device(name: str, flag: str = "--device") -> torch.device:
    """The torch.device `name` names, or a ConfigError saying in one line why this machine
    cannot use it (no CUDA build, no GPU visible, a bad name)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{flag} {name}: not a device name ({e}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "torch sees no CUDA GPU (check CUDA_VISIBLE_DEVICES and the driver)")
            raise ConfigError(f"{flag} {name}: {why}; use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} {name}: MPS is not available on this machine; use {flag} cpu")
    return device


def describe(error: BaseException) -> str:
    """The one line a user sees for `error`."""
    if isinstance(error, OSError) and not isinstance(error, FastSAEError) and error.filename is not None:
        what = error.strerror or type(error).__name__
        return f"{what}: {error.filename}"
    return str(error) or type(error).__name__


def main(argv: list[str] | None = None, one_line_errors: bool | None = None) -> int:
    """Run `fastsae ARGS`. one_line_errors: report user errors in one line and return 1
    instead of raising them (default: only when reading the real command line, argv None)."""
    if one_line_errors is None:
        one_line_errors = argv is None
    parser = argparse.ArgumentParser(prog="fastsae", description="Fast sparse autoencoders")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        # also after the subcommand (fastsae train ... --debug); absent there, the global one counts
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except USER_ERRORS as e:
        if args.debug or not one_line_errors:
            raise
        print(f"fastsae {args.command}: error: {describe(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug or not one_line_errors:
            raise
        print(f"fastsae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
