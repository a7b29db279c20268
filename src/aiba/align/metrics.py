"""Band-alignment metrics between an attention map and instrument-band ground truth (AIBA Sec. 2.2).

Maps and masks are ``(T, F)`` arrays (numpy, or torch tensors, which are copied to host
numpy): axis 0 time frames, axis 1 mel rows, low to high. Functions that say so accept
leading batch axes ``(..., T, F)`` and return one value per map.

Conventions (documented once, used everywhere):
- NaN or inf anywhere in an input is an :class:`AibaError`, never a silent NaN result.
- A ratio with a zero denominator (precision with no predicted cell, recall with an empty
  ground truth, IoU of two empty masks) is ``zero_division`` (0.0 by default, as
  scikit-learn's ``zero_division=0``).
- A constant map normalises to all ones: every cell ties with the maximum.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import AibaError, AibaWarning

__all__ = [
    "NORMALIZATIONS",
    "as_array",
    "normalize_map",
    "binarize",
    "confusion_counts",
    "scores_from_counts",
    "tf_iou",
    "precision_recall_f1",
    "tf_ap",
    "SweepResult",
    "iou_sweep",
    "frequency_profile",
    "profile_correlation",
    "pointing_game",
    "average_scores",
    "AVERAGES",
]

AVERAGES = ("micro", "macro", "weighted")
DEFAULT_THRESHOLDS = np.round(np.linspace(0.05, 0.95, 19), 2)


def as_array(x, name: str = "map", *, dtype=None, min_ndim: int = 2) -> np.ndarray:
    """Host numpy copy of an array or tensor; errors on NaN/inf or too few axes."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    a = np.asarray(x)
    if dtype is not None:
        a = a.astype(dtype, copy=False)
    if a.ndim < min_ndim:
        raise AibaError(f"{name}: expected at least {min_ndim} axes (..., T, F), got shape {a.shape}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise AibaError(f"{name}: {bad} NaN/inf value(s) in array of shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise AibaError(f"{name}: expected a numeric or boolean array, got dtype {a.dtype}")
    return a


def _mask(x, name: str) -> np.ndarray:
    a = as_array(x, name)
    if a.dtype != bool:
        if not np.all((a == 0) | (a == 1)):
            raise AibaError(f"{name}: expected a binary mask (0/1 or bool), got values outside {{0, 1}}")
        a = a.astype(bool)
    return a


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise AibaError(f"{what}: shapes differ: map/pred {a.shape} vs ground truth {b.shape}")


NORMALIZATIONS = ("max", "minmax", "none")


def normalize_map(map, normalize: str = "max") -> np.ndarray:
    """Normalise each ``(T, F)`` map over its last two axes (Sec. 2.2 threshold sweep).

    ``"max"``: ``M / max M`` (M must be non-negative); ``"minmax"``:
    ``(M - min) / (max - min)``; ``"none"``: unchanged. Constant maps become all ones.
    """
    m = as_array(map, "map", dtype=np.float64)
    if normalize == "none":
        return m
    hi = m.max(axis=(-2, -1), keepdims=True)
    lo = m.min(axis=(-2, -1), keepdims=True)
    const = hi == lo
    if normalize == "max":
        if np.any(lo < 0):
            raise AibaError(
                f"normalize='max' expects a non-negative map, got min {float(lo.min()):.4g}; "
                "use normalize='minmax'"
            )
        return np.where(const, 1.0, m / np.where(hi > 0, hi, 1.0))
    if normalize == "minmax":
        return np.where(const, 1.0, (m - lo) / np.where(const, 1.0, hi - lo))
    raise AibaError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


def binarize(map, threshold: float, normalize: str = "max") -> np.ndarray:
    """Boolean mask of cells ``>= threshold`` after :func:`normalize_map`; batch axes allowed."""
    if not np.isfinite(threshold):
        raise AibaError(f"binarize: threshold must be finite, got {threshold}")
    return normalize_map(map, normalize) >= threshold


def confusion_counts(pred_mask, gt_mask) -> np.ndarray:
    """Cell counts ``[tp, fp, fn, tn]`` per map: shape ``(..., 4)`` for ``(..., T, F)`` inputs."""
    p, g = _mask(pred_mask, "pred_mask"), _mask(gt_mask, "gt_mask")
    _same_shape(p, g, "confusion_counts")
    tp = np.sum(p & g, axis=(-2, -1))
    fp = np.sum(p & ~g, axis=(-2, -1))
    fn = np.sum(~p & g, axis=(-2, -1))
    tn = np.sum(~p & ~g, axis=(-2, -1))
    return np.stack([tp, fp, fn, tn], axis=-1).astype(np.int64)


def _ratio(num, den, zero_division):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), zero_division)


def scores_from_counts(counts, zero_division: float = 0.0) -> dict:
    """Precision, recall, F1 and IoU from ``[tp, fp, fn, tn]`` counts (``(..., 4)``)."""
    c = np.asarray(counts, dtype=np.float64)
    if c.shape[-1:] != (4,):
        raise AibaError(f"scores_from_counts: expected (..., 4) counts [tp, fp, fn, tn], got shape {c.shape}")
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    return {
        "precision": _ratio(tp, tp + fp, zero_division),
        "recall": _ratio(tp, tp + fn, zero_division),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, zero_division),
        "iou": _ratio(tp, tp + fp + fn, zero_division),
    }


def _scalar(x):
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else x


def tf_iou(pred_mask, gt_mask, zero_division: float = 0.0):
    """T-F IoU ``|P & G| / |P | G|`` on cells (Sec. 2.2); batch axes allowed."""
    return _scalar(scores_from_counts(confusion_counts(pred_mask, gt_mask), zero_division)["iou"])


def precision_recall_f1(pred_mask, gt_mask, zero_division: float = 0.0):
    """Cell precision, recall and F1 of a binary map against a mask (Sec. 3, Table 1)."""
    s = scores_from_counts(confusion_counts(pred_mask, gt_mask), zero_division)
    return _scalar(s["precision"]), _scalar(s["recall"]), _scalar(s["f1"])


def tf_ap(map, gt_mask) -> float:
    """Average precision of ranking cells by map value against the mask (Sec. 2.2 T-F AP).

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct map values taken as thresholds
    (ties form one step), the area under the precision-recall curve of the threshold
    sweep; equal to scikit-learn's ``average_precision_score``. NaN with an
    :class:`AibaWarning` when the mask is empty (AP is undefined without positives).
    """
    m = as_array(map, "map", dtype=np.float64)
    g = _mask(gt_mask, "gt_mask")
    _same_shape(m, g, "tf_ap")
    if m.ndim != 2:
        raise AibaError(f"tf_ap: expected one (T, F) map, got shape {m.shape}")
    s, y = m.ravel(), g.ravel()
    n_pos = int(y.sum())
    if n_pos == 0:
        warnings.warn("tf_ap: empty ground-truth mask, AP undefined (NaN)", AibaWarning, stacklevel=2)
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each tie group
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@dataclass(frozen=True)
class SweepResult:
    """Scores over a threshold sweep of the normalised map, and the best-IoU point."""

    thresholds: np.ndarray  # (n,)
    precision: np.ndarray  # (n,)
    recall: np.ndarray  # (n,)
    f1: np.ndarray  # (n,)
    iou: np.ndarray  # (n,)
    best_threshold: float  # threshold of the highest IoU (the lowest one on ties)
    best_iou: float


def iou_sweep(map, gt_mask, thresholds=None, normalize: str = "max",
              zero_division: float = 0.0) -> SweepResult:
    """IoU (and P/R/F1) curve over thresholds of the normalised map (Sec. 2.2, "swept over thresholds")."""
    th = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64).ravel()
    if th.size == 0 or not np.all(np.isfinite(th)):
        raise AibaError(f"iou_sweep: thresholds must be a non-empty finite list, got {th}")
    m = normalize_map(map, normalize)
    g = _mask(gt_mask, "gt_mask")
    _same_shape(m, g, "iou_sweep")
    if m.ndim != 2:
        raise AibaError(f"iou_sweep: expected one (T, F) map, got shape {m.shape}")
    preds = m[None] >= th[:, None, None]  # (n, T, F)
    s = scores_from_counts(confusion_counts(preds, np.broadcast_to(g, preds.shape)), zero_division)
    k = int(np.argmax(s["iou"]))
    return SweepResult(th, s["precision"], s["recall"], s["f1"], s["iou"], float(th[k]), float(s["iou"][k]))


def frequency_profile(map) -> np.ndarray:
    """Frequency profile: the sum over time (axis -2) of a ``(..., T, F)`` map -> ``(..., F)``."""
    return as_array(map, "map", dtype=np.float64).sum(axis=-2)


def profile_correlation(map, gt, method: str = "pearson") -> float:
    """Pearson or Spearman correlation of the frequency profiles of map and GT (Sec. 2.2).

    ``gt`` may be a binary mask or a real-valued template. Spearman is Pearson on average
    ranks (ties share their mean rank). NaN with an :class:`AibaWarning` when either
    profile is constant (the correlation is undefined).
    """
    a = as_array(map, "map", dtype=np.float64)
    b = as_array(gt, "gt", dtype=np.float64)
    _same_shape(a, b, "profile_correlation")
    if a.ndim != 2:
        raise AibaError(f"profile_correlation: expected one (T, F) map, got shape {a.shape}")
    x, y = a.sum(axis=0), b.sum(axis=0)  # (F,), (F,)
    if method == "spearman":
        from scipy.stats import rankdata

        x, y = rankdata(x), rankdata(y)
    elif method != "pearson":
        raise AibaError(f"profile_correlation: method must be 'pearson' or 'spearman', got {method!r}")
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt(np.sum(x * x) * np.sum(y * y))
    if den <= 1e-12 * max(1.0, np.abs(x).max() * np.abs(y).max()):
        warnings.warn("profile_correlation: constant frequency profile, correlation undefined (NaN)",
                      AibaWarning, stacklevel=2)
        return float("nan")
    return float(np.clip(np.sum(x * y) / den, -1.0, 1.0))


def pointing_game(map, gt_mask, ties: str = "first"):
    """Pointing game (Sec. 2.2): does the map's argmax cell lie inside the mask?

    ``ties="first"`` returns a bool for the first maximal cell in time-major order (NumPy's
    argmax); ``ties="expected"`` returns the fraction of maximal cells inside the mask
    (the hit rate when one of the tied cells is picked at random; use it for near-constant
    maps such as the uniform baseline). Batch axes allowed.
    """
    m = as_array(map, "map", dtype=np.float64)
    g = _mask(gt_mask, "gt_mask")
    _same_shape(m, g, "pointing_game")
    flat_m = m.reshape(m.shape[:-2] + (-1,))  # (..., T*F)
    flat_g = g.reshape(g.shape[:-2] + (-1,))
    if ties == "first":
        idx = np.argmax(flat_m, axis=-1)
        hit = np.take_along_axis(flat_g, idx[..., None], axis=-1)[..., 0]
        return bool(hit) if hit.ndim == 0 else hit
    if ties == "expected":
        top = flat_m == flat_m.max(axis=-1, keepdims=True)
        return _scalar((top & flat_g).sum(-1) / top.sum(-1))
    raise AibaError(f"pointing_game: ties must be 'first' or 'expected', got {ties!r}")


def average_scores(counts, labels, average: str = "micro", zero_division: float = 0.0) -> dict:
    """Average P/R/F1/IoU over items of several classes (Sec. 3, Table 1 columns).

    ``counts``: ``(N, 4)`` per-item ``[tp, fp, fn, tn]``; ``labels``: ``(N,)`` class of each
    item. ``micro``: scores of the counts pooled over all items; ``macro``: unweighted mean
    over classes of each class's pooled scores; ``weighted``: the same mean weighted by each
    class's ground-truth positives (``tp + fn``), as scikit-learn's ``average="weighted"``.
    """
    c = np.asarray(counts, dtype=np.float64)
    labels = np.asarray(labels)
    if c.ndim != 2 or c.shape[1] != 4 or labels.shape != (c.shape[0],):
        raise AibaError(f"average_scores: expected counts (N, 4) and labels (N,), got {c.shape} and {labels.shape}")
    if c.shape[0] == 0:
        raise AibaError("average_scores: no items")
    if average == "micro":
        return {k: float(v) for k, v in scores_from_counts(c.sum(0), zero_division).items()}
    classes = np.unique(labels)
    per = np.stack([c[labels == k].sum(0) for k in classes])  # (C, 4)
    s = scores_from_counts(per, zero_division)
    if average == "macro":
        w = np.ones(len(classes))
    elif average == "weighted":
        w = per[:, 0] + per[:, 2]
        if w.sum() == 0:
            return {k: float(zero_division) for k in s}
    else:
        raise AibaError(f"average must be one of {AVERAGES}, got {average!r}")
    return {k: float(np.sum(w * v) / np.sum(w)) for k, v in s.items()}
