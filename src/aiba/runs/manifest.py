"""A run's manifest.json: versions, git revision and settings; a rerun with other settings is refused.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..atomic import atomic_write
from ..errors import AibaError
from .config import EvalConfig
from .records import record_files

__all__ = [
    "check_manifest",
    "config_from_manifest",
    "has_results",
    "manifest_for",
    "prepare_dir",
    "read_manifest",
]


def _git_revision() -> str | None:
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not rev:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("aiba", "torch", "diffusers", "transformers", "numpy", "librosa"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def manifest_for(cfg: EvalConfig, n_samples: int, world: int) -> dict:
    return {"tool": "aiba eval", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(),
            "git_revision": _git_revision(), "backend": {"name": cfg.backend, "tiny": cfg.tiny,
                                                         "model_id": cfg.model_id, "dtype": cfg.dtype},
            "seeds": {"base": cfg.seed, "rule": "sample k of every class uses seed + k"},
            "samples": n_samples, "world_size": world, "config": cfg.resolved().to_dict(),
            "identity": cfg.identity()}


def has_results(run: Path) -> bool:
    """Whether a run directory holds any record (a non-empty record file or a saved map)."""
    if any(f.stat().st_size > 0 for f in record_files(run)):
        return True
    return (run / "maps").is_dir() and any((run / "maps").glob("*.npz"))


def check_manifest(run: Path, cfg: EvalConfig, n_samples: int, world: int, *, write: bool = True) -> None:
    """Compare the run's manifest with ``cfg`` (refusing other settings), and write it
    (``write``) when absent. A manifest with other settings whose run produced no record
    (it failed before its first sample) is replaced."""
    path = run / "manifest.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())["identity"]
            if not isinstance(old, dict):
                raise ValueError(f"identity is {type(old).__name__}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise AibaError(f"{path}: unreadable manifest ({e}); move it away to start over") from None
        new = cfg.identity()
        diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        if not diff:
            return
        if has_results(run):
            raise AibaError(f"{run} was written with other settings {diff} (manifest, now): "
                            "rerun with the same settings or use another --out")
        if not write:
            return
        print(f"aiba eval: {run}: its manifest came from a run with other settings that wrote no record; "
              "replaced (with the assets built for those settings)", file=sys.stderr)
        import shutil

        for asset in ("data_templates.npz", "mini_slakh"):  # built for the old settings
            p = run / asset
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    elif not write:
        return
    atomic_write(path, json.dumps(manifest_for(cfg, n_samples, world), indent=2))


def prepare_dir(run: Path) -> None:
    """Create the run directory (and maps/) or say why it cannot be one."""
    for d in (run, run / "maps"):
        if d.exists() and not d.is_dir():
            raise AibaError(f"--out {run}: {d} is a file, not a folder; move it away or choose another --out",
                            kind="io")
    (run / "maps").mkdir(parents=True, exist_ok=True)
    if not os.access(run, os.W_OK):
        raise AibaError(f"--out {run}: the folder is not writable; check its permissions or choose another --out",
                        kind="io")


def read_manifest(run) -> dict:
    """The manifest of an ``aiba eval`` run directory, or an error saying what is wrong with it."""
    path = Path(run) / "manifest.json"
    if not Path(run).is_dir():
        raise AibaError(f"{run}: no such run directory")
    if not path.is_file():
        raise AibaError(f"{run}: no manifest.json (not an aiba eval run directory)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AibaError(f"{path}: corrupt manifest ({type(e).__name__}: {e}); restore it or rerun aiba eval "
                        "with the run's settings into a fresh --out") from None
    if not isinstance(manifest, dict) or manifest.get("tool") != "aiba eval" or not isinstance(
            manifest.get("config"), dict):
        raise AibaError(f"{path}: not a manifest written by aiba eval (no 'tool: aiba eval' and 'config')")
    return manifest


def config_from_manifest(manifest: dict) -> EvalConfig:
    try:
        d = dict(manifest["config"])
        for k in ("classes", "templates", "grid"):
            d[k] = tuple(d[k])
        d["instruments"] = tuple(tuple(p) for p in d["instruments"])
        if d.get("streams") is not None:
            d["streams"] = tuple(d["streams"])
        return EvalConfig(**d)
    except (KeyError, TypeError, ValueError) as e:
        raise AibaError(f"manifest.json: config unusable ({type(e).__name__}: {e}); "
                        "was it written by another aiba version?") from None
