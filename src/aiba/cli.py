"""aiba: capture attention in text-to-audio diffusion models and score it against instrument bands.

The command line turns arguments into settings and calls the library.

Each sub-command lives in its own module exposing ``register(subparsers)``; the module
sets ``func`` on its parser. Modules are imported lazily so ``aiba --help`` stays fast.

Every failure a user can fix ends in one line ``aiba: error: ...`` on stderr and an exit
status that says its kind (:data:`aiba.errors.EXIT_CODES`); a traceback is printed only
with ``--debug`` (or ``AIBA_DEBUG=1``) or for an unexpected exception, which is a bug.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from .errors import EXIT_CODES, EXIT_MEANINGS, AibaError

# sub-command modules, in the order `aiba --help` lists them
COMMANDS = [
    "aiba.tools.demo",
    "aiba.data.render",
    "aiba.tools.eval",
    "aiba.tools.report",
    "aiba.tools.bench",
    "aiba.tools.diagnose",
    "aiba.tools.train_reference",
]

_EPILOG = ("exit status:\n" + "\n".join(f"  {v:>3} {k:<12} {EXIT_MEANINGS[k]}" for k, v in EXIT_CODES.items())
           + "\n\nErrors are one line 'aiba: error: ...' on stderr; --debug (or AIBA_DEBUG=1) shows the traceback.")

# what to do about an OSError, by errno
_IO_HINTS = {
    errno.ENOSPC: "free disk space or write elsewhere; finished results are kept and a rerun resumes",
    errno.EDQUOT: "free disk space (quota) or write elsewhere; a rerun resumes",
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOTDIR: "a file stands where a folder is needed: move it away or choose another path",
    errno.EISDIR: "a folder stands where a file is needed: give a file path",
    errno.ENOENT: "check the path",
    errno.EEXIST: "move it away or choose another path",
}


def _io_message(e: OSError) -> str:
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e) or type(e).__name__
    hint = _IO_HINTS.get(e.errno, "check the path, permissions and free space")
    return f"{what}{f': {where}' if where else ''}; {hint}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiba", description=__doc__.splitlines()[0], epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also AIBA_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def error_line(message: str) -> None:
    """Print the one error line (a message spanning lines is joined into one)."""
    text = " ".join(str(message).split())
    print(f"aiba: error: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from ._quiet import quiet_third_party

    quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(args.debug or os.environ.get("AIBA_DEBUG"))
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CODES["usage"]
    try:
        return int(args.func(args) or 0)
    except AibaError as e:
        if debug:
            raise
        error_line(e)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        error_line(f"interrupted (Ctrl-C) during 'aiba {args.command}'; every finished result is kept, "
                   "rerun the same command to resume")
        return EXIT_CODES["interrupted"]
    except BrokenPipeError:  # output piped into a program that stopped reading (| head)
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - swallow the flush at exit
        except OSError:
            pass
        return EXIT_CODES["io"]
    except OSError as e:
        if debug:
            raise
        error_line(_io_message(e))
        return EXIT_CODES["io"]
    except MemoryError:
        if debug:
            raise
        error_line(f"out of memory during 'aiba {args.command}'; use fewer or shorter samples, or another device")
        return EXIT_CODES["io"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
