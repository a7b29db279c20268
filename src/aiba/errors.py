"""The one error type aiba raises, and its one warning category."""

__all__ = ["AibaError", "AibaWarning", "EXIT_CODES", "EXIT_MEANINGS"]

# exit status of the `aiba` command per kind of failure, and what it means (listed by `aiba --help`)
_EXITS = {
    "ok": (0, "success"),
    "bug": (1, "an unexpected error (a bug: the traceback is printed; please report it)"),
    "usage": (2, "bad command line"),
    "input": (3, "invalid settings or input files"),
    "io": (4, "reading or writing failed (disk full, permissions, read-only, a file where a folder belongs)"),
    "missing": (5, "a model checkpoint or an optional dependency is not installed"),
    "locked": (6, "the run directory is in use by another aiba process"),
    "interrupted": (130, "interrupted (Ctrl-C, 128 + SIGINT); finished results are kept, rerun to resume"),
}
EXIT_CODES = {kind: code for kind, (code, _) in _EXITS.items()}
EXIT_MEANINGS = {kind: meaning for kind, (_, meaning) in _EXITS.items()}


class AibaError(RuntimeError):
    """Raised for invalid input or state; the message names the layer, shapes and expectation.

    ``kind`` says which exit status the command line gives it (a key of :data:`EXIT_CODES`).
    """

    def __init__(self, *args, kind: str = "input"):
        super().__init__(*args)
        self.kind = kind if kind in EXIT_CODES else "input"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]


class AibaWarning(UserWarning):
    """Something works but is probably not what the user meant (e.g. a constant pooled map)."""
