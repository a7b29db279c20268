"""aiba: capture attention in text-to-audio diffusion models and score it against instrument bands.

The command line turns arguments into settings and calls the library.

Each sub-command lives in its own module exposing ``register(subparsers)``; the module
sets ``func`` on its parser. Modules are imported lazily so ``aiba --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import AibaError

# sub-command modules, in the order `aiba --help` lists them
COMMANDS = [
    "aiba.demo",
    "aiba.data.render",
    "aiba.evaluate",
    "aiba.report",
    "aiba.bench",
    "aiba.diagnose",
    "aiba.train_reference",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiba", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AibaError as e:
        print(f"aiba: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
