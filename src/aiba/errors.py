"""The one error type aiba raises, and its one warning category."""

__all__ = ["AibaError", "AibaWarning", "EXIT_CODES"]

# exit status of the `aiba` command per kind of failure (listed by `aiba --help`)
EXIT_CODES = {
    "ok": 0,
    "bug": 1,  # an unexpected exception (traceback printed): please report it
    "usage": 2,  # bad command line (argparse)
    "input": 3,  # invalid settings or input files
    "io": 4,  # reading or writing files failed (disk full, permissions, a file where a folder belongs)
    "missing": 5,  # a model checkpoint or an optional dependency is not installed
    "locked": 6,  # the run directory is in use by another process
    "interrupted": 130,  # Ctrl-C (128 + SIGINT)
}


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
