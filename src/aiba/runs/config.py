"""A run's settings (EvalConfig) and its plan of samples: one source for every choice and default.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..align.metrics import NORMALIZATIONS
from ..errors import AibaError
from ..maps.mapping import AGGREGATES, POOLS
from ..settings import dtype_name, fill_template, integer, number

__all__ = [
    "CHOICES",
    "DEFAULT_TEMPLATES",
    "EvalConfig",
    "GT_KINDS",
    "INSTRUMENT_WORDS",
    "Sample",
    "canonical_class",
    "load_prompts",
    "plan",
    "run_setting",
]


GT_KINDS = ("knowledge", "data", "generated")

# EvalConfig's fields that take one of a few values, and those values (the CLI offers the same).
CHOICES = {"gt": GT_KINDS, "pool": tuple(p for p in POOLS if p is not None), "aggregate": AGGREGATES,
           "weights": ("uniform", "late", "learned"), "kinds": ("cross", "all"), "normalize": NORMALIZATIONS}

# Prompt templates cycled over a class's samples; {instrument} is the class's instrument word.
DEFAULT_TEMPLATES = ("a solo {instrument} recording", "the sound of {instrument} playing alone")

# Paper class -> the word(s) the prompt names it with; subset pooling keeps these tokens.
INSTRUMENT_WORDS = {"Bass": "bass", "Drums": "drums", "Guitars": "guitar", "Piano": "piano",
                    "Strings": "strings", "Organ": "organ"}

# Settings that do not change a record: a rerun may change them freely.
_FREE_FIELDS = ("out", "dataset", "n_boot", "device", "progress", "figures")


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
        for what, allowed in CHOICES.items():
            if getattr(self, what) not in allowed:
                raise AibaError(f"eval: {what} must be one of {allowed}, got {getattr(self, what)!r}")
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

    def check_run(self) -> None:
        """What only a run that is about to start needs (a manifest read back for a report or
        a merge is not checked again): the dtype's name, and no --device/--dtype with --tiny
        (the offline models run on the CPU in float32). The device itself is checked where
        it is resolved (:func:`aiba.tools.eval.run_eval`)."""
        if self.dtype is not None:
            dtype_name("eval --dtype", self.dtype)
        if self.tiny:
            given = []
            if self.device is not None and str(self.device).split(":")[0] != "cpu":
                given.append(f"--device {self.device}")
            if self.dtype not in (None, "float32"):
                given.append(f"--dtype {self.dtype}")
            if given:
                many = len(given) > 1
                raise AibaError(f"eval --tiny runs the offline model on the CPU in float32; {', '.join(given)} "
                                f"{'apply' if many else 'applies'} to the real checkpoint: drop --tiny, or "
                                f"{'those flags' if many else 'that flag'}")

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


def run_setting(cfg, scored: int | None = None) -> str:
    """A run's settings in one line, as the tables and the figures caption them."""
    s = (f"backend {cfg.backend}{' (tiny)' if cfg.tiny else ''}, gt={cfg.gt}, pool={cfg.pool}, "
         f"aggregate={cfg.aggregate}, weights={cfg.weights}, kinds={cfg.kinds}, steps={cfg.steps}")
    return s if scored is None else f"{s}, {scored} scored samples"
