"""Instrument-band ground truth on the T x F grid (AIBA Sec. 2.2 "Templates").

Three kinds, all boolean ``(T, F)`` masks on the grid of :mod:`aiba.align.audio` (axis 0 time,
axis 1 mel rows low to high; Hz -> row through :func:`aiba.align.audio.grid_row_hz`, i.e. the
same Slaney mel scale, fmin/fmax and bilinear resize as the mel features; defaults
AudioLDM2's 16 kHz / 64 mels / 0-8000 Hz):

- knowledge-driven: per-class Hz bands (:data:`KNOWLEDGE_BANDS`), the rows whose centre
  lies in a band, over every frame;
- data-driven: per-class frequency profiles of stem mel energy, each frame normalised to
  sum 1 (silent frames skipped), averaged over the stems of a split, then thresholded to a
  band (:class:`DataTemplates`, saved as a small ``.npz``);
- time-aligned: a band x the frames where the stem (or a generated clip) is active.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import AUDIOLDM2_MEL, MelConfig, grid_row_hz
from ..errors import AibaError

__all__ = [
    "KNOWLEDGE_BANDS",
    "COVERAGE_FLAG",
    "band_coverage",
    "band_rows",
    "knowledge_template",
    "knowledge_templates",
    "frame_normalized_profile",
    "threshold_profile",
    "DataTemplates",
    "build_data_templates",
    "active_frames",
    "time_aligned_mask",
]

# Per-class frequency bands in Hz (lo, hi), narrowed to what separates the classes on a
# 64-row mel grid: the range of the fundamentals a part of that class usually plays, not
# the instrument's full compass with every harmonic (which covers 77-100 % of the rows for
# every class but bass, so any map, even a shuffled one, scores near 1 against it).
# Sources (pitch -> Hz in equal temperament, A4 = 440 Hz):
# - Bass: E1 = 41 Hz (a 4-string bass's lowest string) to C4 = 262 Hz; the paper (Sec. 3)
#   finds bass attention in the "low bands (<250 Hz)".
# - Drums: the two regions no pitched class occupies: kick-drum fundamentals 40-120 Hz and
#   hi-hats/cymbals 3-8 kHz (the mixing "frequency charts", e.g. B. Owsinski, The Mixing
#   Engineer's Handbook, ch. on EQ); the snare/tom body (150-400 Hz) is left out because
#   it sits under every pitched class.
# - Guitars: E2 = 82 Hz (open low E) to E6 = 1319 Hz (the 24th fret of the high E).
# - Piano: C3 = 131 Hz to C6 = 1047 Hz, the usual range of accompaniment and melody parts
#   (the full A0-C8 keyboard would cover the grid).
# - Strings: G3 = 196 Hz (the violin's lowest string; section writing sits mostly above it)
#   to E7 = 2637 Hz (the violin's practical top).
# - Organ: C2 = 65 Hz to C6 = 1047 Hz, an 8' manual stop's range (the pedal's 16' reaches
#   lower but carries a small share of the energy).
# Override by passing ``bands=`` to the functions below. Every table reports each class's
# band coverage; a band covering at least COVERAGE_FLAG of the rows is flagged.
KNOWLEDGE_BANDS = {
    "Bass": ((41.0, 262.0),),
    "Drums": ((40.0, 120.0), (3000.0, 8000.0)),
    "Guitars": ((82.0, 1319.0),),
    "Piano": ((131.0, 1047.0),),
    "Strings": ((196.0, 2637.0),),
    "Organ": ((65.0, 1047.0),),
}

# A template covering at least this share of the grid's rows cannot discriminate: any map
# scores close to 1 against it. Tables flag such classes.
COVERAGE_FLAG = 0.9


def band_coverage(template) -> float:
    """Share of grid cells a ``(F,)`` band or ``(T, F)`` template marks (0..1)."""
    t = np.asarray(template, dtype=bool)
    if t.size == 0:
        raise AibaError("band_coverage: empty template")
    return float(t.mean())


def band_rows(bands, F: int = 64, cfg: MelConfig = AUDIOLDM2_MEL) -> np.ndarray:
    """Boolean ``(F,)``: grid rows whose centre frequency lies in any ``(lo, hi)`` Hz band.

    A band narrower than a row still marks the row nearest its centre, so no class is empty.
    """
    hz = grid_row_hz(F, cfg)  # (F,)
    rows = np.zeros(F, dtype=bool)
    for lo, hi in bands:
        if not (0 <= lo < hi):
            raise AibaError(f"band must satisfy 0 <= lo < hi Hz, got ({lo}, {hi})")
        inside = (hz >= lo) & (hz <= hi)
        if not inside.any():
            if hi < hz[0] or lo > hz[-1]:
                raise AibaError(
                    f"band ({lo}, {hi}) Hz lies outside the grid ({hz[0]:.1f}-{hz[-1]:.1f} Hz row centres)"
                )
            centre = np.sqrt(lo * hi) if lo > 0 else hi / 2  # geometric centre of the band
            inside[np.argmin(np.abs(hz - centre))] = True
        rows |= inside
    return rows


def knowledge_template(cls: str, T: int = 128, F: int = 64, cfg: MelConfig = AUDIOLDM2_MEL,
                       bands: dict | None = None) -> np.ndarray:
    """Knowledge-driven template of one class: its Hz band over all ``T`` frames, ``(T, F)`` bool."""
    table = KNOWLEDGE_BANDS if bands is None else bands
    if cls not in table:
        raise AibaError(f"no knowledge band for class {cls!r}; known: {sorted(table)}")
    return np.broadcast_to(band_rows(table[cls], F, cfg), (T, F)).copy()


def knowledge_templates(T: int = 128, F: int = 64, cfg: MelConfig = AUDIOLDM2_MEL,
                        bands: dict | None = None) -> dict:
    """:func:`knowledge_template` for every class of the table."""
    table = KNOWLEDGE_BANDS if bands is None else bands
    return {c: knowledge_template(c, T, F, cfg, table) for c in table}


def _grid(x, what: str) -> np.ndarray:
    from .metrics import as_array

    return as_array(x, what, dtype=np.float64)


def frame_normalized_profile(grid, silence_db: float = -60.0) -> tuple[np.ndarray, int]:
    """Mean over active frames of a ``(T, F)`` energy grid with each frame scaled to sum 1.

    Frames more than ``silence_db`` below the loudest frame are skipped. Returns the
    ``(F,)`` profile (sums to 1; zeros when every frame is silent) and the frame count used.
    """
    g = _grid(grid, "energy grid")
    if g.ndim != 2 or np.any(g < 0):
        raise AibaError(f"energy grid: expected non-negative (T, F), got shape {g.shape}, min {g.min():.3g}")
    e = g.sum(axis=1)  # (T,)
    if e.max() <= 0:
        return np.zeros(g.shape[1]), 0
    keep = e >= e.max() * 10 ** (silence_db / 10)
    prof = (g[keep] / e[keep, None]).mean(axis=0)  # (F,)
    return prof, int(keep.sum())


def threshold_profile(profile, method: str = "mass", value: float = 0.9) -> np.ndarray:
    """Band mask ``(F,)`` from a profile: ``"mass"`` keeps the fewest rows (largest first)
    holding ``value`` of the total; ``"relative"`` keeps rows ``>= value * max``."""
    p = np.asarray(profile, dtype=np.float64)
    if p.ndim != 1 or np.any(p < 0) or not np.all(np.isfinite(p)):
        raise AibaError(f"profile: expected a finite non-negative (F,) array, got shape {p.shape}")
    if p.sum() <= 0:
        raise AibaError("profile is all zeros (every stem silent?): no band to threshold")
    if method == "relative":
        return p >= value * p.max()
    if method == "mass":
        if not 0 < value <= 1:
            raise AibaError(f"mass threshold must be in (0, 1], got {value}")
        order = np.argsort(-p, kind="mergesort")
        cum = np.cumsum(p[order]) / p.sum()
        n = int(np.searchsorted(cum, value - 1e-12)) + 1
        mask = np.zeros(p.size, dtype=bool)
        mask[order[:n]] = True
        return mask
    raise AibaError(f"threshold method must be 'mass' or 'relative', got {method!r}")


@dataclass
class DataTemplates:
    """Data-driven class profiles on the grid's F rows, and their band masks."""

    classes: tuple  # class names, in row order of ``profiles``
    profiles: np.ndarray  # (C, F), each row sums to 1
    counts: np.ndarray  # (C,) stems averaged per class
    method: str = "mass"
    value: float = 0.9
    meta: dict = field(default_factory=dict)  # mel settings, split, ...

    def band(self, cls: str) -> np.ndarray:
        """Boolean ``(F,)`` band of a class."""
        if cls not in self.classes:
            raise AibaError(f"no data template for class {cls!r}; have {list(self.classes)}")
        return threshold_profile(self.profiles[self.classes.index(cls)], self.method, self.value)

    def mask(self, cls: str, T: int = 128) -> np.ndarray:
        """Boolean ``(T, F)`` template: the class band over all frames."""
        return np.broadcast_to(self.band(cls), (T, self.profiles.shape[1])).copy()

    def save(self, path) -> Path:
        """Write a small ``.npz`` (profiles, counts, classes, threshold, meta as strings)."""
        import json

        path = Path(path)
        np.savez(path, profiles=self.profiles, counts=self.counts, classes=np.array(self.classes),
                 method=np.array(self.method), value=np.array(self.value),
                 meta=np.array(json.dumps(self.meta, sort_keys=True)))
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path) -> "DataTemplates":
        """Read what :meth:`save` wrote."""
        import json

        path = Path(path)
        if not path.is_file():
            raise AibaError(f"data templates file not found: {path}")
        try:
            z = np.load(path, allow_pickle=False)
            return cls(tuple(str(c) for c in z["classes"]), z["profiles"], z["counts"],
                       str(z["method"]), float(z["value"]), json.loads(str(z["meta"])))
        except (KeyError, ValueError, OSError) as e:
            raise AibaError(f"{path}: not a data-templates file ({e})") from None


def build_data_templates(stems, T: int = 128, F: int = 64, cfg: MelConfig = AUDIOLDM2_MEL,
                         method: str = "mass", value: float = 0.9, progress: bool = False,
                         meta: dict | None = None) -> DataTemplates:
    """Average frame-normalised mel profiles per class over ``stems`` (Sec. 2.2 data-driven).

    ``stems``: :class:`aiba.data.slakh.Stem` objects (their ``paper_class`` groups them;
    stems without one are skipped) or ``(class, (T, F) energy grid)`` pairs.
    """
    from .audio import mel_grid

    sums: dict = {}
    counts: dict = {}
    items = stems
    if progress:
        from tqdm import tqdm

        items = tqdm(stems, desc="templates", unit="stem")
    for item in items:
        if isinstance(item, tuple):
            cls, grid = item
        else:
            cls = item.paper_class
            if cls is None:
                continue
            grid = mel_grid(item.load_audio(cfg.sr), cfg, T, F)
        prof, n = frame_normalized_profile(grid)
        if n == 0:
            continue  # silent stem: nothing to average
        if prof.shape != (F,):
            raise AibaError(f"class {cls}: profile has {prof.shape[0]} rows, expected F={F}")
        sums[cls] = sums.get(cls, 0) + prof
        counts[cls] = counts.get(cls, 0) + 1
    if not sums:
        raise AibaError("build_data_templates: no non-silent stem of a known class")
    classes = tuple(sorted(sums))
    profiles = np.stack([sums[c] / counts[c] for c in classes])  # (C, F)
    info = {"sr": cfg.sr, "n_mels": cfg.n_mels, "hop_length": cfg.hop_length, "fmin": cfg.fmin,
            "fmax": cfg.fmax, "htk": cfg.htk, "power": cfg.power, "T": T, "F": F, **(meta or {})}
    return DataTemplates(classes, profiles, np.array([counts[c] for c in classes]), method, value, info)


def active_frames(grid, rel_db: float = -30.0, floor: float = 1e-10) -> np.ndarray:
    """Boolean ``(T,)``: frames whose energy is within ``rel_db`` dB of the loudest frame
    and above the absolute ``floor`` (so a silent stem has no active frame)."""
    g = _grid(grid, "energy grid")
    if g.ndim != 2:
        raise AibaError(f"energy grid: expected (T, F), got shape {g.shape}")
    e = g.sum(axis=1)  # (T,)
    return (e > floor) & (e >= e.max() * 10 ** (rel_db / 10))


def time_aligned_mask(band, grid, rel_db: float = -30.0) -> np.ndarray:
    """Band x active frames: ``(T, F)`` bool, for audio aligned with the map (Sec. 2.2).

    ``band``: ``(F,)`` rows (e.g. :func:`band_rows` or :meth:`DataTemplates.band`);
    ``grid``: the ``(T, F)`` mel energy of the stem or generated clip.
    """
    b = np.asarray(band, dtype=bool)
    active = active_frames(grid, rel_db)
    if b.shape != (np.shape(grid)[1],):
        raise AibaError(f"band has shape {b.shape}, expected ({np.shape(grid)[1]},) to match the grid's F")
    return active[:, None] & b[None, :]
