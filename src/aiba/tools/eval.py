"""``aiba eval``: the paper's evaluation end to end (AIBA Sec. 3, Tables 1 and 3, Figs. 2/3).

For every instrument class and sample ``k`` (prompt template ``k % n_templates``, seed
``seed + k``, the same seeds for every class), generate with the backend under capture,
map the scored attention streams to the ``(T, F)`` grid, and score it against the chosen
ground truth:

- ``knowledge``: the class's Hz band (:data:`aiba.align.templates.KNOWLEDGE_BANDS`) over all frames;
- ``data``: the class band of the data-driven templates built once from the dataset's stems
  (``data_templates.npz`` in the run directory; without ``--dataset`` a small mini-Slakh is
  rendered into the run directory first);
- ``generated``: the knowledge band x the active frames of the generated clip's own mel
  energy (:func:`aiba.align.templates.time_aligned_mask`).

Run directory (``runs/NAME``)::

    .aiba.lock              held by the one process writing the directory (pid, host, start time)
    manifest.json           versions, git revision, backend, seeds, full config (checked on resume)
    records.jsonl           one JSON line per sample (single process)
    records.rank{r}-of-{w}.jsonl   one shard file per rank (RANK / WORLD_SIZE), until --merge
    maps/{id}.npz           per-sample map, GT, per-layer maps, per-step maps and profiles, mel
    data_templates.npz      data-driven templates (gt=data)
    mini_slakh/             the rendered dataset when no --dataset was given
    table1.{csv,md}  table3.{csv,md}  tables.json  learned_weights.json (weights=learned)
    figures/*.png

Records are appended as one full line with flush + fsync after their ``.npz`` is in place
(``os.replace``), so an interruption loses at most the sample in flight; a rerun skips the
ids already written, refuses a run directory written with other settings, and reports and
redoes corrupt records (a half-written last line, a missing or unreadable ``.npz``).
Every setting is checked (:class:`EvalConfig`, every prompt filled) before anything is
written; the model is loaded before ``manifest.json`` is, and the manifest of a run that
wrote no record is replaced. A second writer on the directory stops with the holder's
pid, host and start time; temporaries of a dead writer are removed.

Scale-out: under ``accelerate launch -m aiba eval ...`` or ``torchrun``, sample ``i`` of the
plan goes to rank ``i % WORLD_SIZE``; each rank writes its own shard file, and
``aiba eval --merge runs/NAME`` combines the shards (deduplicated, conflicts reported) and
builds the tables and figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import zipfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, remove_stale_temps
from ..errors import AibaError, AibaWarning
from ..runs.lock import LOCK_NAME, RunLock
from ..settings import fill_template, integer, number

__all__ = ["EvalConfig", "Sample", "DEFAULT_TEMPLATES", "INSTRUMENT_WORDS", "GT_KINDS", "plan",
           "run_eval", "merge", "report", "load_records", "load_prompts", "instrument_token_indices",
           "dist_info", "register"]

GT_KINDS = ("knowledge", "data", "generated")
# Prompt templates cycled over a class's samples; {instrument} is the class's instrument word.
DEFAULT_TEMPLATES = ("a solo {instrument} recording", "the sound of {instrument} playing alone")
# Paper class -> the word(s) the prompt names it with; subset pooling keeps these tokens.
INSTRUMENT_WORDS = {"Bass": "bass", "Drums": "drums", "Guitars": "guitar", "Piano": "piano",
                    "Strings": "strings", "Organ": "organ"}
# Settings that do not change a record: a rerun may change them freely.
_FREE_FIELDS = ("out", "dataset", "n_boot", "device", "progress", "figures")
RECORDS = "records.jsonl"
_SHARD_RE = re.compile(r"^records\.rank(\d+)-of-(\d+)\.jsonl$")


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run; ``manifest.json`` records them (``None`` = the default
    for the backend, fixed by :meth:`resolved`)."""

    out: str = "runs/eval"
    backend: str = "audioldm2"
    tiny: bool = False  # the backend's offline random-weight model
    model_id: str | None = None  # checkpoint for the real backend (None: the backend's default)
    dtype: str | None = None  # "float16", "bfloat16", ... for the real backend
    device: str | None = None  # None: cuda:LOCAL_RANK when available, else cpu
    dataset: str | None = None  # Slakh-layout root (gt=data); None renders a mini-Slakh into out
    classes: tuple = ("Bass", "Drums", "Guitars", "Piano", "Strings", "Organ")
    templates: tuple = DEFAULT_TEMPLATES
    instruments: tuple = tuple(INSTRUMENT_WORDS.items())  # (class, instrument word) pairs
    samples_per_class: int | None = None  # None: 8 (real) / 2 (tiny)
    steps: int | None = None  # denoising steps; None: 200 (the paper) / 10 (tiny)
    guidance_scale: float | None = None  # None: the backend's default
    seconds: float | None = None  # clip length; None: the backend's default
    seed: int = 0  # sample k of every class uses seed + k
    gt: str = "data"  # ground truth: knowledge | data | generated
    pool: str = "mean"  # text-token pooling: mean | max | softmax | subset
    aggregate: str = "mean"  # spatial aggregator over layers and steps: mean | max
    weights: str = "uniform"  # uniform | late | learned (NNLS on the fit split, applied to test)
    gamma: float = 0.9  # decay of weights="late"
    kinds: str = "cross"  # cross: cross-attention only; all: cross + self
    streams: tuple | None = None  # streams scored; None: the word streams (+ self with kinds=all)
    grid: tuple = (128, 64)  # (T, F) of every map and GT
    fit_fraction: float = 0.25  # weights=learned: share of each class's samples used to fit
    threshold: float = 0.5  # operating point after normalisation
    normalize: str = "max"
    n_boot: int = 1000  # bootstrap resamples of the tables' CIs
    step_maps: int = 4  # per-step maps kept per sample (evenly spaced steps)
    template_split: str | None = "train"  # dataset split the data templates come from
    template_stems: int = 64  # at most this many stems per class enter the data templates
    render_tracks: int = 4  # mini-Slakh rendered when gt=data and no dataset is given
    render_seconds: float = 4.0
    progress: bool = True
    figures: bool = True

    def __post_init__(self):
        def bad(what, value, allowed):
            raise AibaError(f"eval: {what} must be one of {allowed}, got {value!r}")
        if self.gt not in GT_KINDS:
            bad("gt", self.gt, GT_KINDS)
        if self.pool not in ("mean", "max", "softmax", "subset"):
            bad("pool", self.pool, ("mean", "max", "softmax", "subset"))
        if self.aggregate not in ("mean", "max"):
            bad("aggregate", self.aggregate, ("mean", "max"))
        if self.weights not in ("uniform", "late", "learned"):
            bad("weights", self.weights, ("uniform", "late", "learned"))
        if self.kinds not in ("cross", "all"):
            bad("kinds", self.kinds, ("cross", "all"))
        if len(self.grid) != 2 or min(self.grid) < 2:
            raise AibaError(f"eval: grid must be (T, F) with sizes >= 2, got {self.grid}")
        integer("eval: grid T", self.grid[0], lo=2, hi=1 << 16)
        integer("eval: grid F", self.grid[1], lo=2, hi=1 << 16)
        if not self.classes:
            raise AibaError("eval: no classes")
        dup = sorted({c for c in self.classes if list(self.classes).count(c) > 1})
        if dup:
            raise AibaError(f"eval: class(es) {dup} given more than once")
        if not self.templates or any(not isinstance(t, str) or "{instrument}" not in t for t in self.templates):
            raise AibaError(f"eval: every prompt template needs '{{instrument}}', got {list(self.templates)}")
        try:
            words = dict(self.instruments)
        except (TypeError, ValueError):
            raise AibaError(f"eval: instruments must be (class, word) pairs, got {self.instruments!r}") from None
        bad_words = {c: w for c, w in words.items() if not isinstance(w, str) or not w.strip()}
        if bad_words:
            raise AibaError(f"eval: instrument words must be non-empty text, got {bad_words}")
        missing = [c for c in self.classes if c not in words]
        if missing:
            raise AibaError(f"eval: no instrument word for class(es) {missing}; have {sorted(words)}")
        for t in self.templates:  # every template filled once up front, with every class's word
            for c in self.classes:
                fill_template(t, {"instrument": words[c]}, "eval: prompt template")
        number("eval --fit-fraction", self.fit_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
        if self.samples_per_class is not None:
            integer("eval --samples-per-class", self.samples_per_class, lo=1)
        if self.steps is not None:
            integer("eval --steps", self.steps, lo=1, hi=100_000)
        if self.guidance_scale is not None:
            number("eval --guidance-scale", self.guidance_scale)
        if self.seconds is not None:
            number("eval --seconds", self.seconds, lo=0, lo_open=True, hi=3600)
        integer("eval --seed", self.seed, lo=0)
        number("eval --gamma", self.gamma, lo=0, lo_open=True, hi=1)
        number("eval --threshold", self.threshold, lo=0, hi=1)
        integer("eval --n-boot", self.n_boot, lo=1)
        integer("eval --step-maps", self.step_maps, lo=1)
        integer("eval --template-stems", self.template_stems, lo=1)
        integer("eval --render-tracks", self.render_tracks, lo=1)
        number("eval --render-seconds", self.render_seconds, lo=0.5, hi=600)
        if self.normalize not in ("max", "minmax", "none"):
            bad("normalize", self.normalize, ("max", "minmax", "none"))

    def resolved(self) -> "EvalConfig":
        """Fill the backend-dependent defaults (steps, samples per class)."""
        return replace(self,
                       steps=self.steps if self.steps is not None else (10 if self.tiny else 200),
                       samples_per_class=(self.samples_per_class if self.samples_per_class is not None
                                          else (2 if self.tiny else 8)))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as the manifest stores them

    def identity(self) -> dict:
        """The settings every record depends on (compared with the manifest on resume)."""
        d = self.resolved().to_dict()
        return {k: v for k, v in d.items() if k not in _FREE_FIELDS}


@dataclass(frozen=True)
class Sample:
    """One generation of the plan."""

    index: int  # position in the plan (sharding: rank index % world)
    id: str  # e.g. "bass-0003"
    cls: str
    k: int  # sample number within the class
    template: str
    prompt: str
    seed: int
    role: str  # "test", or "fit" (weights=learned: used to fit the layer weights)


# ---------------------------------------------------------------------------- settings
def canonical_class(name: str) -> str:
    """``bass`` / ``Bass`` / ``guitar`` -> the paper class name (``Guitars``)."""
    from ..data.slakh import PAPER_CLASSES

    key = name.strip().lower()
    for c in PAPER_CLASSES:
        if key in (c.lower(), INSTRUMENT_WORDS[c].lower()):
            return c
    raise AibaError(f"unknown class {name!r}; known: {', '.join(c.lower() for c in PAPER_CLASSES)}")


def load_prompts(path) -> tuple[tuple, tuple]:
    """Prompt templates (and optional instrument words) from a YAML file.

    Either a list of templates, or a mapping ``{templates: [...], instruments: {class: word}}``.
    Returns ``(templates, instruments)``; instruments default to :data:`INSTRUMENT_WORDS`.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise AibaError(f"--prompts {p}: {'a folder, not a file' if p.is_dir() else 'file not found'}")
    try:
        text = p.read_bytes().decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", b"\x00", 0, 1, "NUL byte")
    except UnicodeDecodeError:
        raise AibaError(f"--prompts {p}: not a UTF-8 text file (YAML expected)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise AibaError(f"--prompts {p}: malformed YAML{at} ({problem})") from None
    words = dict(INSTRUMENT_WORDS)
    if isinstance(data, dict):
        unknown = sorted(str(k) for k in data if k not in ("templates", "instruments"))
        if unknown:
            raise AibaError(f"--prompts {p}: unknown key(s) {unknown}; expected 'templates:' and 'instruments:'")
        templates = data.get("templates")
        inst = data.get("instruments") or {}
        if not isinstance(inst, dict):
            raise AibaError(f"--prompts {p}: 'instruments:' must map class to word (e.g. 'bass: electric bass'), "
                            f"got a {type(inst).__name__}: {inst!r}")
        for k, v in inst.items():
            if not isinstance(v, str) or not v.strip():
                raise AibaError(f"--prompts {p}: instrument word of {k!r} must be non-empty text, got {v!r}")
            words[canonical_class(str(k))] = v
    else:
        templates = data
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        shown = repr(data)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        raise AibaError(f"--prompts {p}: expected a list of prompt templates (or a mapping with 'templates:'), "
                        f"got {shown}")
    for t in templates:
        if "{instrument}" not in t:
            raise AibaError(f"--prompts {p}: template {t!r} has no '{{instrument}}'")
        for w in words.values():
            fill_template(t, {"instrument": w}, f"--prompts {p}: template")
    return tuple(templates), tuple(words.items())


def plan(cfg: EvalConfig) -> list[Sample]:
    """Every sample of the run, in a fixed order (classes, then k)."""
    cfg = cfg.resolved()
    words = dict(cfg.instruments)
    n = cfg.samples_per_class
    fit = set()
    if cfg.weights == "learned":
        if n < 2:
            raise AibaError("weights=learned needs samples_per_class >= 2 (some to fit, some to test)")
        n_fit = min(n - 1, max(1, math.ceil(cfg.fit_fraction * n)))
        rng = np.random.default_rng([cfg.seed, 7])  # the same fit ks for every class
        fit = set(int(k) for k in rng.permutation(n)[:n_fit])
    out = []
    for cls in cfg.classes:
        for k in range(n):
            t = cfg.templates[k % len(cfg.templates)]
            out.append(Sample(len(out), f"{cls.lower()}-{k:04d}", cls, k, t, fill_template(t, {"instrument": words[cls]}),
                              cfg.seed + k, "fit" if k in fit else "test"))
    return out


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` from RANK / WORLD_SIZE (set by torchrun and accelerate launch)."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise AibaError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                        "are not integers") from None
    if world < 1 or not 0 <= rank < world:
        raise AibaError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return rank, world


def _norm_token(tok: str) -> str:
    return re.sub(r"^(▁|Ġ|##)", "", tok).replace("</w>", "").lower()


def instrument_token_indices(tokens, words: str) -> list[int]:
    """Indices of the key tokens that spell the instrument word(s) (subword runs allowed).

    ``tokens``: the stream's key tokens as the backend's tokenizer gives them.
    """
    norm = [_norm_token(t) for t in tokens]
    out: list[int] = []
    for w in re.findall(r"[\w'-]+", words.lower()):
        for i in range(len(norm)):
            acc = ""
            for j in range(i, len(norm)):
                acc += norm[j]
                if acc == w:
                    out.extend(range(i, j + 1))
                    break
                if not w.startswith(acc):
                    break
    if not out:
        raise AibaError(f"instrument word(s) {words!r} not found among the key tokens {list(tokens)}")
    return sorted(set(out))


# ---------------------------------------------------------------------------- run dir
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


def _manifest(cfg: EvalConfig, n_samples: int, world: int) -> dict:
    return {"tool": "aiba eval", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(),
            "git_revision": _git_revision(), "backend": {"name": cfg.backend, "tiny": cfg.tiny,
                                                         "model_id": cfg.model_id, "dtype": cfg.dtype},
            "seeds": {"base": cfg.seed, "rule": "sample k of every class uses seed + k"},
            "samples": n_samples, "world_size": world, "config": cfg.resolved().to_dict(),
            "identity": cfg.identity()}


def _has_results(run: Path) -> bool:
    """Whether a run directory holds any record (a non-empty record file or a saved map)."""
    if any(f.stat().st_size > 0 for f in _record_files(run)):
        return True
    return (run / "maps").is_dir() and any((run / "maps").glob("*.npz"))


def _check_manifest(run: Path, cfg: EvalConfig, n_samples: int, world: int, *, write: bool = True) -> None:
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
        if _has_results(run):
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
    atomic_write(path, json.dumps(_manifest(cfg, n_samples, world), indent=2))


def _prepare_dir(run: Path) -> None:
    """Create the run directory (and maps/) or say why it cannot be one."""
    for d in (run, run / "maps"):
        if d.exists() and not d.is_dir():
            raise AibaError(f"--out {run}: {d} is a file, not a folder; move it away or choose another --out",
                            kind="io")
    (run / "maps").mkdir(parents=True, exist_ok=True)
    if not os.access(run, os.W_OK):
        raise AibaError(f"--out {run}: the folder is not writable; check its permissions or choose another --out",
                        kind="io")


def _read_lines(path: Path):
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


def _record_files(run: Path) -> list[Path]:
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
    files = _record_files(run)
    if not files:
        raise AibaError(f"no records in {run} (no {RECORDS} or records.rank*-of-*.jsonl)")
    by_id: dict = {}
    problems: list[str] = []
    for f in files:
        good, bad = _read_lines(f)
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


# ---------------------------------------------------------------------------- ground truth
def _wait_for(path: Path, what: str, timeout: float = 6 * 3600) -> None:
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout:
            raise AibaError(f"waited {timeout:.0f} s for rank 0 to write {what} ({path})")
        time.sleep(2)


def _dataset_root(cfg: EvalConfig, run: Path, rank: int) -> Path:
    if cfg.dataset is not None:
        return Path(cfg.dataset)
    root = run / "mini_slakh"
    done = root / ".complete"
    if rank != 0:
        _wait_for(done, "the mini-Slakh")
        return root
    if not done.is_file():
        from ..data.render import RenderConfig, make_dataset

        print(f"aiba eval: no --dataset: rendering a {cfg.render_tracks}-track mini-Slakh into {root}",
              file=sys.stderr)
        make_dataset(root, RenderConfig(tracks=cfg.render_tracks, seconds=cfg.render_seconds, seed=cfg.seed),
                     progress=cfg.progress)
        done.write_text("ok\n")
    return root


def _data_templates(cfg: EvalConfig, run: Path, rank: int):
    """Data-driven templates: built once from the dataset's stems, saved in the run dir."""
    from ..align.templates import DataTemplates, build_data_templates

    path = run / "data_templates.npz"
    if not path.is_file():
        if rank != 0:
            _wait_for(path, "the data templates")
        else:
            from ..data.slakh import SlakhDataset

            root = _dataset_root(cfg, run, rank)
            ds = SlakhDataset(root, split=cfg.template_split, on_missing="warn")
            rng = np.random.default_rng([cfg.seed, 11])
            stems = []
            for cls in cfg.classes:
                pool = [s for s in ds.stems(classes=(cls,))]
                if not pool:
                    raise AibaError(f"data templates: no {cls} stems in {root} (split {cfg.template_split!r})")
                if len(pool) > cfg.template_stems:
                    pool = [pool[i] for i in sorted(rng.choice(len(pool), cfg.template_stems, replace=False))]
                stems += pool
            T, F = cfg.grid
            dt = build_data_templates(stems, T=T, F=F, progress=cfg.progress,
                                      meta={"dataset": str(root), "split": cfg.template_split,
                                            "stems": [s.name for s in stems]})
            atomic_write(path, dt.save)
    dt = DataTemplates.load(path)
    missing = [c for c in cfg.classes if c not in dt.classes]
    if missing:
        raise AibaError(f"{path}: no data template for class(es) {missing}; has {list(dt.classes)}")
    return dt


def _ground_truth(cfg: EvalConfig, cls: str, templates, audio, sr: int):
    """(T, F) bool GT and the clip's (T, F) mel energy."""
    from ..align.audio import MelConfig, mel_grid
    from ..align.templates import KNOWLEDGE_BANDS, band_rows, knowledge_template, time_aligned_mask

    T, F = cfg.grid
    mel_cfg = MelConfig(sr=sr, fmax=min(8000.0, sr / 2))
    y = np.asarray(audio, dtype=np.float32)
    if y.size < mel_cfg.n_fft:
        y = np.pad(y, (0, mel_cfg.n_fft - y.size))  # clips shorter than one FFT window (tiny models)
    mel = mel_grid(y, mel_cfg, T, F)
    if cfg.gt == "knowledge":
        gt = knowledge_template(cls, T, F)
    elif cfg.gt == "data":
        gt = templates.mask(cls, T)
    else:
        gt = time_aligned_mask(band_rows(KNOWLEDGE_BANDS[cls], F), mel)
    return gt.astype(bool), mel.astype(np.float32)


def sample_metrics(m, g, threshold: float, normalize: str) -> dict:
    """Per-sample scores at the operating point plus AP, profile correlations, pointing game."""
    from ..align.metrics import binarize, confusion_counts, pointing_game, profile_correlation, scores_from_counts, tf_ap

    counts = confusion_counts(binarize(m, threshold, normalize), g)
    s = scores_from_counts(counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AibaWarning)  # undefined values are stored as null
        extra = {"ap": tf_ap(m, g), "pearson": profile_correlation(m, g, "pearson"),
                 "spearman": profile_correlation(m, g, "spearman"),
                 "pointing": float(pointing_game(m, g, ties="expected"))}
    out = {k: float(v) for k, v in s.items()}
    out.update({k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in extra.items()})
    out["counts"] = [int(v) for v in np.asarray(counts).reshape(-1)]
    return out


# ---------------------------------------------------------------------------- one sample
@dataclass
class _Ctx:
    backend: object
    cfg: EvalConfig
    run: Path
    templates: object = None
    streams: dict = field(default_factory=dict)  # stream -> layer patterns scored


def _scored_streams(backend, cfg: EvalConfig, prompt: str) -> dict:
    all_streams = backend.streams()
    if cfg.streams is not None:
        names = list(cfg.streams)
    else:
        words = list(backend.tokens(prompt))
        cross = [s for s in all_streams if s != "self"]
        names = words if (words and cfg.pool != "max") else cross
        if cfg.kinds == "all" and "self" in all_streams:
            names.append("self")
    unknown = [s for s in names if s not in all_streams]
    if unknown or not names:
        raise AibaError(f"backend {backend.name!r}: unknown stream(s) {unknown}; streams {list(all_streams)}")
    return {s: all_streams[s] for s in names}


def _make_tap(ctx: _Ctx, sample: Sample):
    from ..capture.tap import AttnTap

    cfg = ctx.cfg
    T, F = cfg.grid
    tokens = relevance = None
    if cfg.pool in ("subset", "softmax"):
        word = dict(cfg.instruments)[sample.cls]
        tokens, relevance = {}, {}
        for stream, toks in ctx.backend.tokens(sample.prompt).items():
            if stream not in ctx.streams:
                continue
            idx = instrument_token_indices(toks, word)
            tokens[len(toks)] = idx
            r = np.zeros(len(toks), dtype=np.float32)
            r[idx] = 1.0  # relevance: 1 on the instrument tokens (softmax pooling, temperature 1)
            relevance[len(toks)] = r
        if not tokens:
            raise AibaError(f"pool={cfg.pool!r} needs a stream whose keys are words; scored streams "
                            f"{list(ctx.streams)} have none (backend {ctx.backend.name!r})")
    layers = tuple(p for pats in ctx.streams.values() for p in pats)
    kinds = ("cross",) if cfg.kinds == "cross" else ("cross", "self")
    weights = "late" if cfg.weights == "late" else "uniform"
    return AttnTap(T, F, pool=cfg.pool, kinds=kinds, layers=layers, keep="steps", tokens=tokens,
                   relevance=relevance if cfg.pool == "softmax" else None, aggregate=cfg.aggregate,
                   weights=weights, gamma=cfg.gamma)


def _step_maps(tap, n_keep: int):
    """Per-step maps (keep="steps", held on the device during generation): steps, (S, F)
    frequency profiles, the kept step indices and their (K, T, F) maps."""
    steps, maps = tap.step_maps()  # (S, B, T, F)
    maps = maps[:, 0].numpy()  # (S, T, F)
    steps = np.asarray(steps)
    keep = np.unique(np.linspace(0, len(steps) - 1, max(1, min(n_keep, len(steps)))).round().astype(int))
    return steps, maps.mean(axis=1), keep, maps[keep]  # steps, (S, F) profiles, idx, (K, T, F)


def _run_sample(ctx: _Ctx, sample: Sample) -> dict:
    cfg = ctx.cfg
    t0 = time.time()
    tap = _make_tap(ctx, sample)
    res = ctx.backend.generate(sample.prompt, tap=tap, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                               seed=sample.seed, seconds=cfg.seconds)
    if not tap.freq_resolved:
        raise AibaError(f"backend {ctx.backend.name!r}: latent {tap.latent_shape} has no frequency axis; "
                        "band alignment needs a time x frequency lattice")
    maps = tap.maps()
    names = sorted(maps.layers)
    m = maps.overall[0].numpy().astype(np.float32)  # (T, F)
    layer_maps = np.stack([maps.layers[n][0].numpy() for n in names]).astype(np.float32)  # (L, T, F)
    steps, step_prof, keep_idx, step_maps = _step_maps(tap, cfg.step_maps)
    audio = np.asarray(res.audio)[0]
    if audio.ndim > 1:
        audio = audio.mean(axis=0)  # (channels, n) -> mono
    gt, mel = _ground_truth(cfg, sample.cls, ctx.templates, audio, res.sample_rate)
    rel = Path("maps") / f"{sample.id}.npz"
    dest = ctx.run / rel
    arrays = dict(map=m, gt=gt, mel=mel, layer_names=np.array(names), layer_maps=layer_maps,
                  steps=steps.astype(np.int32), step_profiles=step_prof.astype(np.float32),
                  step_index=steps[keep_idx].astype(np.int32), step_maps=step_maps.astype(np.float32))
    atomic_write(dest, lambda tmp: np.savez_compressed(tmp, **arrays))
    seconds = float(audio.shape[-1]) / res.sample_rate
    return {"id": sample.id, "index": sample.index, "class": sample.cls, "k": sample.k,
            "template": sample.template, "prompt": sample.prompt, "seed": sample.seed, "role": sample.role,
            "streams": list(ctx.streams), "metrics": sample_metrics(m, gt, cfg.threshold, cfg.normalize),
            "maps": rel.as_posix(), "layers": len(names), "calls": maps.calls, "steps": maps.steps,
            "seconds": seconds, "sample_rate": int(res.sample_rate), "time_s": round(time.time() - t0, 3)}


def _append(path: Path, rec: dict) -> None:
    line = (json.dumps(rec, sort_keys=True) + "\n").encode()
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _get_backend(cfg: EvalConfig, rank: int):
    from ..backends import get

    if cfg.tiny:
        return get(cfg.backend, tiny=True, seed=cfg.seed)
    import torch

    device = cfg.device
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if torch.cuda.is_available() else "cpu"
    kw = {"device": device}
    if cfg.model_id:
        kw["model_id"] = cfg.model_id
    if cfg.dtype:
        kw["dtype"] = getattr(torch, cfg.dtype)
    return get(cfg.backend, **kw)


# ---------------------------------------------------------------------------- entry points
def run_eval(cfg: EvalConfig, *, rank: int | None = None, world: int | None = None, backend=None,
             on_record=None) -> Path:
    """Run (or resume) an evaluation; returns the run directory.

    ``rank`` / ``world`` default to :func:`dist_info`; this process handles samples
    ``i % world == rank`` and writes ``records.jsonl`` (world 1) or its shard file. With
    world 1 the tables and figures are built at the end (:func:`report`). ``backend``: an
    adapter to reuse (else built from the config); ``on_record(record)`` is called after
    each record is durably written.
    """
    cfg = cfg.resolved()
    if rank is None or world is None:
        rank, world = dist_info()
    samples = plan(cfg)  # every prompt filled: nothing is written before the settings hold
    run = Path(cfg.out)
    if cfg.dataset is not None and not Path(cfg.dataset).is_dir():
        raise AibaError(f"--dataset {cfg.dataset}: no such folder (a Slakh-layout root is expected)")
    if rank == 0:
        _check_manifest(run, cfg, len(samples), world, write=False)  # refuse other settings before writing
    _prepare_dir(run)
    lock = RunLock(run, what=f"aiba eval{f' rank {rank}/{world}' if world > 1 else ''}",
                   name=LOCK_NAME if world == 1 else f"{LOCK_NAME}.rank{rank}-of-{world}")
    with lock:
        remove_stale_temps(run)
        remove_stale_temps(run / "maps")
        return _run_locked(cfg, run, samples, rank, world, backend, on_record)


def _run_locked(cfg, run: Path, samples, rank: int, world: int, backend, on_record) -> Path:
    if rank != 0:
        _wait_for(run / "manifest.json", "the manifest")
        _check_manifest(run, cfg, len(samples), world)
    mine = [s for s in samples if s.index % world == rank]
    out_file = run / (RECORDS if world == 1 else f"records.rank{rank}-of-{world}.jsonl")
    done: set = set()
    if out_file.is_file():
        good, problems = _read_lines(out_file)
        for p in problems:
            msg = f"{p}: reported and redone"
            warnings.warn(msg, AibaWarning, stacklevel=2)
            print(f"aiba eval: {msg}", file=sys.stderr)
        if problems:  # keep only the good lines (atomically), then append
            atomic_write(out_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in good))
        done = {r["id"] for r in good}
    if world > 1:  # a rerun after --merge also finds its samples in records.jsonl
        try:
            done |= {r["id"] for r in load_records(run, report_problems=False)[0]}
        except AibaError:
            pass
    todo = [s for s in mine if s.id not in done]
    ctx = None
    if todo:  # the model is loaded (and its streams checked) before the manifest is written
        ctx = _Ctx(backend or _get_backend(cfg, rank), cfg, run)
        ctx.streams = _scored_streams(ctx.backend, cfg, todo[0].prompt)
    if rank == 0:
        _check_manifest(run, cfg, len(samples), world)
    templates = None
    if cfg.gt == "data" and (todo or rank == 0):  # rank 0 builds the shared assets even with no samples
        templates = _data_templates(cfg, run, rank)
    if todo:
        from tqdm import tqdm

        ctx.templates = templates
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"eval{f' rank {rank}' if world > 1 else ''}",
                   unit="sample", disable=not cfg.progress, dynamic_ncols=True)
        try:
            for s in todo:
                bar.set_postfix_str(s.id)
                rec = _run_sample(ctx, s)
                _append(out_file, rec)
                bar.update(1)
                if on_record is not None:
                    on_record(rec)
        finally:
            bar.close()
    if world == 1:
        report(run, n_boot=cfg.n_boot, figures=cfg.figures)
    else:
        print(f"aiba eval: rank {rank} done ({len(mine)} samples in {out_file.name}); when every rank has "
              f"finished run: aiba eval --merge {run}", file=sys.stderr)
    return run


def merge(run_dir) -> Path:
    """Combine the shard files of a run into ``records.jsonl`` (deduplicated, conflicts
    reported), check every planned sample is present, and build tables and figures."""
    run = Path(run_dir)
    mpath = run / "manifest.json"
    if not mpath.is_file():
        raise AibaError(f"{run}: no manifest.json (not an aiba eval run directory)")
    manifest = read_manifest(run)
    recs, problems = load_records(run)
    for p in problems:
        print(f"aiba eval --merge: {p}", file=sys.stderr)
    expected = manifest.get("samples")
    if expected is not None and len(recs) != expected:
        have = {r["id"] for r in recs}
        cfg = _config_from_manifest(manifest)
        missing = [s.id for s in plan(cfg) if s.id not in have]
        print(f"aiba eval --merge: {len(missing)} of {expected} samples missing ({missing[:6]}"
              f"{'...' if len(missing) > 6 else ''}); rerun the ranks to complete them", file=sys.stderr)
    atomic_write(run / RECORDS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    report(run)
    return run


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


def _config_from_manifest(manifest: dict) -> EvalConfig:
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


def report(run_dir, *, n_boot: int | None = None, figures: bool | None = None) -> dict:
    """Tables (and figures) from the records alone; see :func:`aiba.tools.report.build_report`."""
    from .report import build_report

    return build_report(run_dir, n_boot=n_boot, figures=figures)


# ---------------------------------------------------------------------------- CLI
def _csv(s: str) -> tuple:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _grid(s: str) -> tuple:
    try:
        t, f = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 128x64, got {s!r}") from None
    return (t, f)


def _cmd(args: argparse.Namespace) -> int:
    if args.merge is not None:
        run = args.out if args.merge is True else args.merge
        if run is None:
            raise AibaError("--merge needs the run directory (aiba eval --merge runs/NAME)")
        if not Path(run).is_dir():
            raise AibaError(f"--merge {run}: no such run directory")
        with RunLock(run, what="aiba eval --merge"), contextlib.redirect_stdout(sys.stderr):
            remove_stale_temps(run)
            merge(run)
        print(f"merged {run}: tables and figures written")
        return 0
    if args.backend == "reference":  # the positive control: trained vs untrained vs nulls (aiba.tools.control)
        from .control import run_from_args

        return run_from_args(args)
    templates, instruments = (load_prompts(args.prompts) if args.prompts else
                              (DEFAULT_TEMPLATES, tuple(INSTRUMENT_WORDS.items())))
    classes = tuple(canonical_class(c) for c in _csv(args.classes))
    out = args.out or f"runs/{args.backend}{'-tiny' if args.tiny else ''}"
    cfg = EvalConfig(out=out, backend=args.backend, tiny=args.tiny, model_id=args.model_id, dtype=args.dtype,
                     device=args.device, dataset=args.dataset, classes=classes, templates=templates,
                     instruments=instruments, samples_per_class=args.samples_per_class, steps=args.steps,
                     guidance_scale=args.guidance_scale, seconds=args.seconds, seed=args.seed, gt=args.gt,
                     pool=args.pool, aggregate=args.aggregate, weights=args.weights, gamma=args.gamma,
                     kinds=args.kinds, streams=_csv(args.streams) if args.streams else None, grid=args.grid,
                     fit_fraction=args.fit_fraction, threshold=args.threshold, n_boot=args.n_boot,
                     step_maps=args.step_maps, render_tracks=args.render_tracks,
                     render_seconds=args.render_seconds, progress=not args.quiet, figures=not args.no_figures)
    rank = world = None
    if args.shard:
        try:
            i, n = (int(v) for v in args.shard.split("/"))
        except ValueError:
            raise AibaError(f"--shard must be i/n (e.g. 0/4), got {args.shard!r}") from None
        if not 0 <= i < n:
            raise AibaError(f"--shard {args.shard}: need 0 <= i < n")
        rank, world = i, n
    with contextlib.redirect_stdout(sys.stderr):  # what libraries print stays off stdout
        run = run_eval(cfg, rank=rank, world=world)
    if (world or dist_info()[1]) == 1:
        print(f"{run}: tables in table1.md / table3.md, figures in figures/")
        print((run / "table1.md").read_text())
    return 0


def register(subparsers) -> None:
    """Add ``aiba eval``."""
    p = subparsers.add_parser("eval", help="generate with capture and score attention against instrument bands",
                              description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="audioldm2", help="model family (default audioldm2)")
    p.add_argument("--tiny", action="store_true", help="the backend's offline random-weight model (no download)")
    p.add_argument("--model-id", default=None, help="checkpoint of the real backend (default: the backend's)")
    p.add_argument("--dtype", default=None, help="float16 / bfloat16 / float32 for the real backend")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--dataset", default=None,
                   help="Slakh-layout root for --gt data (default: render a small mini-Slakh into the run dir)")
    p.add_argument("--classes", default="bass,drums,guitars,piano,strings,organ", help="comma-separated classes")
    p.add_argument("--prompts", default=None,
                   help="YAML: a list of templates with {instrument}, or {templates: [...], instruments: {class: word}}; "
                        f"default {list(DEFAULT_TEMPLATES)}")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 200; 10 with --tiny)")
    p.add_argument("--samples-per-class", type=int, default=None, help="samples per class (default 8; 2 with --tiny)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the backend's")
    p.add_argument("--seconds", type=float, default=None, help="clip length (default: the backend's)")
    p.add_argument("--seed", type=int, default=0, help="sample k uses seed + k (default 0)")
    p.add_argument("--out", default=None, help="run directory (default runs/BACKEND[-tiny])")
    p.add_argument("--gt", choices=GT_KINDS, default="data", help="ground truth (default data)")
    p.add_argument("--pool", choices=("mean", "max", "softmax", "subset"), default="mean",
                   help="text-token pooling (default mean over the prompt's words)")
    p.add_argument("--aggregate", choices=("mean", "max"), default="mean", help="spatial aggregator (default mean)")
    p.add_argument("--weights", choices=("uniform", "late", "learned"), default="uniform",
                   help="aggregation weights; learned: NNLS layer weights fitted on a held-out split")
    p.add_argument("--gamma", type=float, default=0.9, help="decay of --weights late (default 0.9)")
    p.add_argument("--kinds", choices=("cross", "all"), default="cross", help="cross-attention only, or cross + self")
    p.add_argument("--streams", default=None, help="comma-separated streams to score (default: the word streams)")
    p.add_argument("--grid", type=_grid, default=(128, 64), help="T x F grid (default 128x64)")
    p.add_argument("--fit-fraction", type=float, default=0.25, help="share of samples that fit learned weights")
    p.add_argument("--threshold", type=float, default=0.5, help="operating point after max-normalisation")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--step-maps", type=int, default=4, help="per-step maps kept per sample (default 4)")
    p.add_argument("--render-tracks", type=int, default=4, help="tracks of the default mini-Slakh (default 4)")
    p.add_argument("--render-seconds", type=float, default=4.0, help="seconds per default mini-Slakh track")
    p.add_argument("--shard", default=None, help="i/n: run shard i of n (default: RANK/WORLD_SIZE, else 0/1)")
    p.add_argument("--merge", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="combine the shard files of RUN_DIR (or --out) and build tables and figures")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd)
