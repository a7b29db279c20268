"""Checks of single settings, shared by every place that accepts them.

Each check returns the value normalised (``int``/``float``) or raises :class:`AibaError`
naming the setting, the value and what is expected, so a bad setting fails before any
model is loaded or any file is written.
"""

from __future__ import annotations

import math
import string

from .errors import AibaError

__all__ = ["DTYPES", "integer", "number", "dtype_name", "device", "fill_template", "writable_file"]

DTYPES = ("float32", "float16", "bfloat16")  # the floating types a model may run in


def _fail(name: str, value, expected: str):
    raise AibaError(f"{name} must be {expected}, got {value!r}")


def integer(name: str, value, *, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (bools refused) in ``[lo, hi]``."""
    if isinstance(value, bool):
        _fail(name, value, "an integer")
    try:
        v = int(value)
        if v != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        _fail(name, value, "an integer")
    if lo is not None and v < lo:
        _fail(name, value, f"an integer >= {lo}")
    if hi is not None and v > hi:
        _fail(name, value, f"an integer <= {hi}")
    return v


def number(name: str, value, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite number in the interval given (open or closed at each end)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        _fail(name, value, "a number")
    lo_s = "" if lo is None else f"{'(' if lo_open else '['}{lo:g}"
    hi_s = "" if hi is None else f"{hi:g}{')' if hi_open else ']'}"
    rng = (f"in {lo_s}, {hi_s}" if lo is not None and hi is not None else
           f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else
           f"{'<' if hi_open else '<='} {hi:g}" if hi is not None else "")
    expected = f"a finite number{' ' + rng if rng else ''}"
    if not math.isfinite(v):
        _fail(name, value, expected)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        _fail(name, value, expected)
    if hi is not None and (v > hi or (hi_open and v == hi)):
        _fail(name, value, expected)
    return v


def dtype_name(name: str, value) -> str:
    """One of :data:`DTYPES`, by name."""
    if value not in DTYPES:
        _fail(name, value, f"one of {DTYPES}")
    return value


def device(name: str, value) -> str:
    """A torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...),
    normalised; checked by placing an empty tensor on it. ``meta`` (no data) is refused."""
    import torch

    try:
        d = torch.device(value)
    except (TypeError, RuntimeError, ValueError):
        _fail(name, value, "a torch device such as 'cpu', 'cuda' or 'cuda:1'")
    why = None
    if d.type == "meta":
        why = "a meta tensor holds no data to run a model on"
    elif d.type == "cuda" and not torch.cuda.is_available():
        why = f"this torch ({torch.__version__}) sees no CUDA device"
    elif d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        why = f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    else:
        try:
            torch.empty(0, device=d)
        except Exception as e:  # torch says why in many ways (RuntimeError, AssertionError, a missing module)
            text = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
            why = text if len(text) <= 160 else text[:157] + "..."  # torch's first sentence
    if why is not None:
        raise AibaError(f"{name} {value!r} is not usable here: {why}")
    return str(d)


def fill_template(template, fields: dict, what: str = "prompt template") -> str:
    """``template.format(**fields)`` after checking it uses only the named ``fields``.

    Positional (``{0}``, ``{}``), unknown (``{artist}``), attribute/index (``{instrument.x}``)
    fields and unbalanced braces are refused with a message that names the template.
    """
    if not isinstance(template, str):
        raise AibaError(f"{what} must be text, got {template!r}")
    known = ", ".join("{" + k + "}" for k in fields)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise AibaError(f"{what} {template!r}: {e} (write literal braces as '{{{{' and '}}}}')") from None
    for _, field_name, spec, _ in parsed:
        if field_name is None:
            continue
        if field_name not in fields:
            raise AibaError(f"{what} {template!r}: unknown field {{{field_name}}}; only {known} is filled in "
                            "(write literal braces as '{{' and '}}')")
        if spec and any(ch in spec for ch in "{}"):
            raise AibaError(f"{what} {template!r}: nested fields are not supported")
    try:
        return template.format(**fields)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise AibaError(f"{what} {template!r}: {e}") from None


def writable_file(name: str, path):
    """A path a file can be written to: not a folder, its folder exists and is writable.

    Checked before any work so a long run does not fail at its last write.
    """
    import os
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise AibaError(f"{name} {p}: is a folder; give a file path (e.g. {p / 'result.json'})", kind="io")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        what = "is a file" if parent.exists() else "does not exist"
        raise AibaError(f"{name} {p}: its folder {parent} {what}; create the folder or choose another path",
                        kind="io")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise AibaError(f"{name} {p}: not writable (permissions or a read-only file system); choose another path",
                        kind="io")
    return p
