"""The paper's summary tables with null baselines and bootstrap confidence intervals.

Table 1 (AIBA Sec. 3): rows Precision, Recall, F1, IoU (optionally AP, Pearson, Spearman,
Pointing) x columns Micro, Macro, Pos.-weighted. Table 3 (Appendix A.3): one row per
instrument class plus Macro-avg x columns Precision, Recall, F1, IoU.

Inputs are per-item arrays: ``maps`` ``(N, T, F)`` attention maps, ``gts`` ``(N, T, F)``
binary ground truth, ``labels`` ``(N,)`` class names. Each map is binarised at one
operating point (``threshold`` after ``normalize``, :func:`aiba.align.metrics.binarize`), cell
counts are pooled as in :func:`aiba.align.metrics.average_scores`.

Every table carries null baselines, evaluated against the same ground truth:
- ``uniform``: a constant map (binarises to every cell; precision = GT density, recall 1);
- ``shuffled``: the maps with their class labels shuffled, i.e. item i's ground truth is
  scored against the map of a random other item (a seeded permutation), the "shuffled
  prompts" baseline (docs/method.md, "Tables").
Confidence intervals: percentile bootstrap (95 % by default) over items, resampled with
replacement within each class (so every class stays present), with a seeded generator;
the baselines use the same resamples (paired).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import AibaError, AibaWarning
from .metrics import (as_array, average_scores, binarize, confusion_counts, profile_correlation,
                      pointing_game, scores_from_counts, tf_ap)

__all__ = ["AlignmentTable", "class_table", "class_coverage", "flagged_classes", "templates_to_gts",
           "item_counts", "item_extras", "null_maps", "shuffled_index", "build_table1",
           "build_table3", "bootstrap_indices", "NULLS"]

NULLS = ("uniform", "shuffled")
T1_ROWS = ("Precision", "Recall", "F1", "IoU")
T1_COLS = ("Micro", "Macro", "Pos.-weighted")
EXTRA_ROWS = ("AP", "Pearson", "Spearman", "Pointing")
_KEYS = ("precision", "recall", "f1", "iou")
_AVG = ("micro", "macro", "weighted")


@dataclass
class AlignmentTable:
    """A table of point estimates with CIs, and the same table for each null baseline."""

    title: str
    rows: tuple
    columns: tuple
    values: np.ndarray  # (R, C)
    ci: np.ndarray  # (R, C, 2) lower, upper
    null: dict = field(default_factory=dict)  # baseline -> (R, C)
    null_ci: dict = field(default_factory=dict)  # baseline -> (R, C, 2)
    settings: dict = field(default_factory=dict)  # threshold, normalize, n_items, n_boot, seed, level

    def value(self, row: str, column: str, baseline: str | None = None) -> float:
        """One cell, e.g. ``table.value("F1", "Micro")`` or with ``baseline="uniform"``."""
        v = self.values if baseline is None else self.null[baseline]
        try:
            return float(v[self.rows.index(row), self.columns.index(column)])
        except ValueError:
            raise AibaError(f"{self.title}: no cell ({row!r}, {column!r}); rows {self.rows}, "
                            f"columns {self.columns}") from None

    def to_dict(self) -> dict:
        """JSON-ready: values, CIs and baselines keyed by row then column."""
        def grid(a):
            return {r: {c: float(a[i, j]) for j, c in enumerate(self.columns)} for i, r in enumerate(self.rows)}

        def grid_ci(a):
            return {r: {c: [float(a[i, j, 0]), float(a[i, j, 1])] for j, c in enumerate(self.columns)}
                    for i, r in enumerate(self.rows)}
        return {"title": self.title, "values": grid(self.values), "ci": grid_ci(self.ci),
                "null": {k: grid(v) for k, v in self.null.items()},
                "null_ci": {k: grid_ci(v) for k, v in self.null_ci.items()},
                "settings": dict(self.settings)}

    def to_markdown(self, digits: int = 3) -> str:
        """Markdown table: ``value [lo, hi]`` per cell, then one line per null baseline."""
        f = f"{{:.{digits}f}}"

        def cell(v, ci=None):
            if np.isnan(v):
                return "n/a"
            return f.format(v) if ci is None else f"{f.format(v)} [{f.format(ci[0])}, {f.format(ci[1])}]"
        first = "Metric" if self.columns == T1_COLS else "Instrument"
        lines = [f"**{self.title}**", "", "| " + " | ".join((first,) + tuple(self.columns)) + " |",
                 "|" + "---|" * (len(self.columns) + 1)]
        for i, r in enumerate(self.rows):
            lines.append("| " + " | ".join([r] + [cell(self.values[i, j], self.ci[i, j])
                                                 for j in range(len(self.columns))]) + " |")
        for name, v in self.null.items():
            lines.append("")
            lines.append(f"Null baseline ({name}):")
            lines.append("| " + " | ".join((first,) + tuple(self.columns)) + " |")
            lines.append("|" + "---|" * (len(self.columns) + 1))
            for i, r in enumerate(self.rows):
                lines.append("| " + " | ".join([r] + [cell(v[i, j], self.null_ci[name][i, j])
                                                     for j in range(len(self.columns))]) + " |")
        s = self.settings
        cov = s.get("coverage") or {}
        if cov:
            from .templates import COVERAGE_FLAG

            lines += ["", "Ground-truth coverage (share of cells): " + ", ".join(
                f"{c} {v:.0%}" + (" (FLAGGED: covers nearly every cell, any map scores near 1)" if v >= COVERAGE_FLAG else "")
                for c, v in cov.items())]
        lines += ["", f"{s.get('level', 0.95):.0%} bootstrap CIs over {s.get('n_items')} items "
                      f"({s.get('n_boot')} resamples, seed {s.get('seed')}); threshold "
                      f"{s.get('threshold')} after '{s.get('normalize')}' normalisation."]
        return "\n".join(lines)


def _inputs(maps, gts, labels):
    m = as_array(maps, "maps", dtype=np.float64, min_ndim=3)
    g = as_array(gts, "gts", min_ndim=3)
    lab = np.asarray(labels).astype(str)
    if m.ndim != 3 or m.shape != g.shape or lab.shape != (m.shape[0],):
        raise AibaError(f"expected maps (N, T, F), gts (N, T, F), labels (N,); got {m.shape}, "
                        f"{g.shape}, {lab.shape}")
    if m.shape[0] == 0:
        raise AibaError("no items to tabulate")
    return m, g, lab


def class_coverage(gts, labels) -> dict:
    """``{class: mean share of cells its ground truth marks}`` over the class's items."""
    g = np.asarray(gts).astype(bool)
    lab = np.asarray(labels).astype(str)
    return {str(c): float(g[lab == c].mean()) for c in np.unique(lab)}


def flagged_classes(table: "AlignmentTable") -> list:
    """Classes whose ground truth covers at least :data:`aiba.align.templates.COVERAGE_FLAG` of the cells."""
    from .templates import COVERAGE_FLAG

    return [c for c, v in (table.settings.get("coverage") or {}).items() if v >= COVERAGE_FLAG]


def templates_to_gts(templates, labels, shape) -> np.ndarray:
    """``(N, T, F)`` ground truth: each item's class template, broadcast over time.

    ``templates``: ``{class: (F,) band or (T, F) mask}`` (e.g. :func:`aiba.align.templates.knowledge_templates`
    or ``{c: data_templates.band(c)}``); ``shape``: the maps' ``(N, T, F)``.
    """
    N, T, F = shape
    lab = np.asarray(labels).astype(str)
    missing = sorted(set(lab) - set(templates))
    if missing:
        raise AibaError(f"no template for class(es) {missing}; templates have {sorted(templates)}")
    out = np.empty((N, T, F), dtype=bool)
    for c in set(lab):
        t = np.asarray(templates[c]).astype(bool)
        if t.shape not in ((F,), (T, F)):
            raise AibaError(f"template of {c!r} has shape {t.shape}; expected ({F},) or ({T}, {F}) to match the maps")
        out[lab == c] = np.broadcast_to(t, (T, F))
    return out


def class_table(maps, templates, labels, *, threshold: float = 0.5, normalize: str = "max",
                n_boot: int = 1000, seed: int = 0, nulls=NULLS, level: float = 0.95) -> "AlignmentTable":
    """Table 3 straight from maps + class templates + labels, for any model.

    ``maps`` ``(N, T, F)``; ``templates`` ``{class: (F,) or (T, F)}``; ``labels`` ``(N,)``.
    Null baselines, bootstrap CIs and each class's template coverage come with it.
    """
    m = as_array(maps, "maps", dtype=np.float64, min_ndim=3)
    if m.ndim != 3:
        raise AibaError(f"maps: expected (N, T, F), got shape {m.shape}")
    gts = templates_to_gts(templates, labels, m.shape)
    return build_table3(m, gts, labels, threshold, normalize, n_boot=n_boot, seed=seed, nulls=nulls, level=level)


def item_counts(maps, gts, threshold: float = 0.5, normalize: str = "max") -> np.ndarray:
    """Per-item cell counts ``(N, 4)`` [tp, fp, fn, tn] at the operating point."""
    return confusion_counts(binarize(maps, threshold, normalize), gts)


def item_extras(maps, gts) -> np.ndarray:
    """Per-item AP, Pearson, Spearman and pointing-game hit rate: ``(N, 4)``, NaN where undefined.

    The pointing game counts tied maxima by their expected hit rate, so a constant map
    scores the GT density rather than whatever cell comes first.
    """
    m, g = np.asarray(maps), np.asarray(gts).astype(bool)
    out = np.empty((m.shape[0], 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AibaWarning)  # undefined values become NaN here
        for i in range(m.shape[0]):
            out[i] = (tf_ap(m[i], g[i]), profile_correlation(m[i], g[i], "pearson"),
                      profile_correlation(m[i], g[i], "spearman"), pointing_game(m[i], g[i], ties="expected"))
    return out


def shuffled_index(labels, rng: np.random.Generator) -> np.ndarray:
    """``(N,)``: for each item, a random item of another class (the shuffled-class null)."""
    lab = np.asarray(labels)
    src = np.empty(lab.size, dtype=np.int64)
    for i in range(lab.size):
        others = np.flatnonzero(lab != lab[i])
        if others.size == 0:
            raise AibaError("the shuffled null baseline needs items of at least two classes")
        src[i] = others[rng.integers(others.size)]
    return src


def null_maps(maps, kind: str, rng: np.random.Generator, labels=None) -> np.ndarray:
    """Null-baseline maps: ``uniform`` (all ones) or ``shuffled`` (each item scored against
    the map of a random item of another class, so no null pair is a matched prompt; without
    ``labels``, of another item)."""
    m = np.asarray(maps)
    if kind == "uniform":
        return np.ones_like(m)
    if kind != "shuffled":
        raise AibaError(f"null baseline must be one of {NULLS}, got {kind!r}")
    return m[shuffled_index(np.arange(m.shape[0]) if labels is None else labels, rng)]


def bootstrap_indices(labels, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, N)`` item indices resampled with replacement within each class."""
    labels = np.asarray(labels)
    out = np.empty((n_boot, labels.size), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out[:, idx] = idx[rng.integers(0, idx.size, (n_boot, idx.size))]
    return out


def _weighted_mean(vals, labels, weights_per_item, how):
    """Micro: mean over items; macro: mean of class means; weighted: class means by GT positives."""
    if how == "micro":
        return np.nanmean(vals) if np.any(~np.isnan(vals)) else np.nan
    classes = np.unique(labels)
    means, w = [], []
    for c in classes:
        v = vals[labels == c]
        means.append(np.nanmean(v) if np.any(~np.isnan(v)) else np.nan)
        w.append(weights_per_item[labels == c].sum() if how == "weighted" else 1.0)
    means, w = np.array(means), np.array(w, dtype=np.float64)
    ok = ~np.isnan(means) & (w > 0)
    return float(np.sum(means[ok] * w[ok]) / np.sum(w[ok])) if ok.any() else np.nan


def _table1(counts, extras, labels):
    """(R, 3) Table 1 values for one set of items."""
    cols = [average_scores(counts, labels, a) for a in _AVG]
    rows = [[col[k] for col in cols] for k in _KEYS]
    if extras is not None:
        pos = counts[:, 0] + counts[:, 2]
        for j in range(extras.shape[1]):
            rows.append([_weighted_mean(extras[:, j], labels, pos, a) for a in _AVG])
    return np.array(rows, dtype=np.float64)


def _table3(counts, labels, classes):
    """(C + 1, 4) Table 3 values: per-class pooled scores and their macro average."""
    per = np.stack([counts[labels == c].sum(0) for c in classes])  # (C, 4)
    s = scores_from_counts(per)
    vals = np.stack([s[k] for k in _KEYS], axis=1)  # (C, 4)
    return np.vstack([vals, vals.mean(0, keepdims=True)])


def _build(which, maps, gts, labels, threshold, normalize, n_boot, seed, nulls, level, extras, classes):
    m, g, lab = _inputs(maps, gts, labels)
    if not 0 < level < 1:
        raise AibaError(f"confidence level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    sets = {"model": m}
    for kind in nulls:
        sets[kind] = null_maps(m, kind, rng, lab)
    if which == 3:
        classes = tuple(np.unique(lab)) if classes is None else tuple(classes)
        missing = sorted(set(classes) - set(lab))
        if missing:
            raise AibaError(f"Table 3: no items of class(es) {missing}; labels have {sorted(set(lab))}")

    def stat(counts, ex, idx):
        c, l_ = counts[idx], lab[idx]
        if which == 1:
            return _table1(c, None if ex is None else ex[idx], l_)
        return _table3(c, l_, classes)

    boot = bootstrap_indices(lab, n_boot, rng) if n_boot > 0 else np.empty((0, lab.size), np.int64)
    alpha = (1 - level) / 2
    results = {}
    for name, mm in sets.items():
        counts = item_counts(mm, g, threshold, normalize)
        ex = item_extras(mm, g) if (which == 1 and extras) else None
        point = stat(counts, ex, np.arange(lab.size))
        if n_boot > 0:
            reps = np.stack([stat(counts, ex, b) for b in boot])  # (n_boot, R, C)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
                ci = np.stack([np.nanquantile(reps, alpha, axis=0), np.nanquantile(reps, 1 - alpha, axis=0)], -1)
        else:
            ci = np.full(point.shape + (2,), np.nan)
        results[name] = (point, ci)
    if which == 1:
        title, rows, cols = "Table 1: band alignment", T1_ROWS + (EXTRA_ROWS if extras else ()), T1_COLS
    else:
        title, rows, cols = "Table 3: band alignment per instrument", tuple(classes) + ("Macro-avg",), T1_ROWS
    settings = {"threshold": threshold, "normalize": normalize, "n_items": int(lab.size),
                "n_boot": n_boot, "seed": seed, "level": level, "nulls": list(nulls),
                "coverage": class_coverage(g, lab)}
    point, ci = results.pop("model")
    return AlignmentTable(title, rows, cols, point, ci, {k: v[0] for k, v in results.items()},
                          {k: v[1] for k, v in results.items()}, settings)


def build_table1(maps, gts, labels, threshold: float = 0.5, normalize: str = "max", *,
                 n_boot: int = 1000, seed: int = 0, nulls=NULLS, level: float = 0.95,
                 extras: bool = False) -> AlignmentTable:
    """Table 1 (Sec. 3): P/R/F1/IoU x Micro/Macro/Pos.-weighted, with nulls and bootstrap CIs.

    ``extras=True`` adds AP, Pearson, Spearman and Pointing rows (per-item values averaged
    over items for Micro, over class means for Macro, weighted by GT positives for
    Pos.-weighted; NaN items such as AP on an empty mask are left out).
    """
    return _build(1, maps, gts, labels, threshold, normalize, n_boot, seed, tuple(nulls), level, extras, None)


def build_table3(maps, gts, labels, threshold: float = 0.5, normalize: str = "max", *,
                 classes=None, n_boot: int = 1000, seed: int = 0, nulls=NULLS,
                 level: float = 0.95) -> AlignmentTable:
    """Table 3 (Appendix A.3): per-instrument P/R/F1/IoU and Macro-avg, with nulls and CIs."""
    return _build(3, maps, gts, labels, threshold, normalize, n_boot, seed, tuple(nulls), level, False, classes)
