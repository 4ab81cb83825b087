"""The `fastsae` command: one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "demo": "fastsae.demo",
    "convert": "fastsae.compat.formats.convert_cli",
    "toy-sweep": "fastsae.toy.sweep",
    "train": "fastsae.train_cli",
    "harvest": "fastsae.harvest",
    "eval": "fastsae.evaluate",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastsae", description="Fast sparse autoencoders")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        modules[name] = module
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
