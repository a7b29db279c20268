"""A run's records: one JSON line per sample, per-rank shard files, read back with every problem named.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ..errors import AibaError, AibaWarning

__all__ = ["RECORDS", "append_record", "read_lines", "record_files", "load_records", "load_arrays"]


RECORDS = "records.jsonl"

_SHARD_RE = re.compile(r"^records\.rank(\d+)-of-(\d+)\.jsonl$")


def read_lines(path: Path):
    """(good records, problems) of one JSONL file; a record needs its keys and its .npz."""
    good, problems = [], []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if i == len(lines) and not raw.endswith(b"\n"):
            problems.append(f"{path.name}:{i}: incomplete last line ({len(line)} bytes)")
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not {"id", "class", "metrics", "maps"} <= set(rec):
                raise ValueError("missing keys")
        except ValueError as e:
            problems.append(f"{path.name}:{i}: corrupt record ({e})")
            continue
        npz = path.parent / rec["maps"]
        try:
            with np.load(npz) as z:
                if not {"map", "gt"} <= set(z.files):
                    raise ValueError("no map/gt arrays")
                for key in z.files:  # decompress every member: a truncated archive fails here
                    z[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            problems.append(f"{path.name}:{i}: record {rec['id']!r}: maps file {rec['maps']} unreadable ({e})")
            continue
        good.append(rec)
    return good, problems


def record_files(run: Path) -> list[Path]:
    files = [run / RECORDS] if (run / RECORDS).is_file() else []
    return files + sorted(p for p in run.glob("records.rank*.jsonl") if _SHARD_RE.match(p.name))


def _same(a: dict, b: dict) -> bool:
    keys = ("class", "prompt", "seed", "role", "metrics")
    return all(a.get(k) == b.get(k) for k in keys)


def load_records(run_dir, *, report_problems: bool = True) -> tuple[list[dict], list[str]]:
    """Every good record of a run (single file and shards), deduplicated by id.

    Returns ``(records in plan order, problems)``; problems (corrupt lines, unreadable maps,
    conflicting duplicates) are also warned about when ``report_problems``.
    """
    run = Path(run_dir)
    files = record_files(run)
    if not files:
        raise AibaError(f"no records in {run} (no {RECORDS} or records.rank*-of-*.jsonl)")
    by_id: dict = {}
    problems: list[str] = []
    for f in files:
        good, bad = read_lines(f)
        problems += bad
        for rec in good:
            old = by_id.get(rec["id"])
            if old is None:
                by_id[rec["id"]] = rec
            elif not _same(old, rec):
                problems.append(f"conflict: record {rec['id']!r} differs between shards ({f.name} vs an earlier "
                                "file); kept the first")
    if report_problems:
        for p in problems:
            warnings.warn(p, AibaWarning, stacklevel=2)
    recs = sorted(by_id.values(), key=lambda r: r.get("index", 0))
    return recs, problems


def append_record(path: Path, rec: dict) -> None:
    line = (json.dumps(rec, sort_keys=True) + "\n").encode()
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def load_arrays(run: Path, recs: list[dict], layers: bool = False) -> dict:
    """Stack the records' maps: ``map`` (N, T, F), ``gt`` (N, T, F), ``mel`` (N, T, F), and with
    ``layers`` ``layer_maps`` (N, L, T, F) and ``layer_names``."""
    out: dict = {"map": [], "gt": [], "mel": []}
    names = None
    if layers:
        out["layer_maps"] = []
    for r in recs:
        with np.load(run / r["maps"]) as z:
            out["map"].append(z["map"])
            out["gt"].append(z["gt"].astype(bool))
            out["mel"].append(z["mel"] if "mel" in z.files else np.zeros_like(z["map"]))
            if layers:
                n = [str(x) for x in z["layer_names"]]
                if names is None:
                    names = n
                elif n != names:
                    raise AibaError(f"record {r['id']!r}: layers {n[:3]}... differ from the first record's "
                                    f"{names[:3]}...; cannot combine layer maps")
                out["layer_maps"].append(z["layer_maps"])
    arrays = {k: np.stack(v) for k, v in out.items() if v}
    if layers:
        arrays["layer_names"] = names or []
    return arrays
