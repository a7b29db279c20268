"""Figures of an ``aiba eval`` run (AIBA Figs. 2/3 style), drawn from the records' ``.npz`` files.

Every map is drawn time on x (seconds), mel rows on y with the lowest band at the bottom
and the y ticks labelled in Hz (:func:`aiba.align.audio.grid_row_hz`); the ground truth is
outlined in white. Files under ``figures/``:

- ``attention_vs_gt.png``: per class, an example map (prompt and seed in the title), the
  class mean, the example's ground truth and the generated clip's mel energy;
- ``freq_profiles.png``: per class, attention frequency profile (mean +- sd over samples,
  each min-max normalised) against the GT profile (share of frames in band per row);
- ``layers_{class}.png``: per class, every scored layer's mean map with its profile
  correlation to the GT;
- ``steps.png``: per class, the class-mean map at the kept denoising steps and the
  step x frequency profile.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AibaWarning
from ..align.metrics import profile_correlation
from ..runs.config import run_setting

__all__ = [
    "make_figures",
    "short_layer",
    "figure_attention_vs_gt",
    "figure_freq_profiles",
    "figure_layers",
    "figure_steps",
]

_HZ_TICKS = (50, 100, 250, 500, 1000, 2000, 4000, 8000)


def short_layer(name: str) -> str:
    """``down_blocks.1.attentions.2.transformer_blocks.0.attn2`` -> ``down1.att2.attn2``."""
    s = re.sub(r"(down|up)_blocks\.(\d+)", r"\1\2", name)
    s = s.replace("mid_block", "mid").replace("transformer_blocks.0.", "")
    s = re.sub(r"attentions\.(\d+)", r"att\1", s)
    return re.sub(r"transformer_blocks\.(\d+)\.", r"tb\1.", s)


def _hz_axis(ax, F: int, axis: str = "y") -> None:
    from ..align.audio import grid_row_hz

    hz = grid_row_hz(F)
    ticks, labels = [], []
    for h in _HZ_TICKS[::-1]:  # from the top, so crowded low ticks are the ones dropped
        row = float(np.interp(h, hz, np.arange(F)))
        if hz[0] <= h <= hz[-1] and all(abs(row - t) >= F / 9 for t in ticks):
            ticks.append(row)
            labels.append(f"{h // 1000}k" if h >= 1000 else str(h))
    (ax.set_yticks if axis == "y" else ax.set_xticks)(ticks)
    (ax.set_yticklabels if axis == "y" else ax.set_xticklabels)(labels)
    (ax.set_ylabel if axis == "y" else ax.set_xlabel)("frequency (Hz, mel scale)")


def _show(ax, m, seconds: float, title: str, gt=None, cmap="magma", label_y=True):
    T, F = m.shape
    im = ax.imshow(m.T, origin="lower", aspect="auto", cmap=cmap, interpolation="nearest",
                   extent=(0, seconds, -0.5, F - 0.5))
    if gt is not None and gt.any() and not gt.all():
        t = (np.arange(T) + 0.5) * seconds / T
        ax.contour(t, np.arange(F), gt.T.astype(float), levels=[0.5], colors="white", linewidths=1.2)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("time (s)")
    ax.xaxis.set_major_locator(_ticker().MaxNLocator(4))
    if label_y:
        _hz_axis(ax, F)
    else:
        ax.set_yticks([])
    return im


def _ticker():
    import matplotlib.ticker as t

    return t


def _minmax(p, axis=-1):
    lo, hi = p.min(axis, keepdims=True), p.max(axis, keepdims=True)
    return (p - lo) / np.where(hi > lo, hi - lo, 1)


def _norm(m):
    hi = m.max()
    return m / hi if hi > 0 else m


def _profile_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of the frequency profiles of two ``(T, F)`` maps (NaN when one is constant)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AibaWarning)  # a constant profile is drawn as r = nan
        return profile_correlation(a, b)


@dataclass(frozen=True)
class RunView:
    """What every figure reads: the records, their scored maps, ground truth and mel energy."""

    run: Path
    recs: list
    maps: np.ndarray  # (N, T, F) scored maps, in record order
    gts: np.ndarray  # (N, T, F) bool
    mels: np.ndarray  # (N, T, F)
    gt_kind: str
    classes: list
    setting: str

    @property
    def labels(self) -> np.ndarray:
        return np.array([r["class"] for r in self.recs])

    @property
    def roles(self) -> np.ndarray:
        return np.array([r["role"] for r in self.recs])

    def pick(self, c: str) -> np.ndarray:
        """Indices of the scored (test) records of a class, else of all its records."""
        idx = np.flatnonzero((self.labels == c) & (self.roles == "test"))
        return idx if idx.size else np.flatnonzero(self.labels == c)

    def seconds(self, i: int) -> float:
        return float(self.recs[i].get("seconds") or self.maps.shape[1])


def _save(fig, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def figure_attention_vs_gt(v: RunView, out: Path) -> Path:
    """Per class: an example map, the class mean, the example's GT and its mel energy (Figs. 2/3)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(v.classes), 4, figsize=(17, 2.9 * len(v.classes)), squeeze=False)
    for row, c in enumerate(v.classes):
        idx = v.pick(c)
        i = idx[0]
        r, sec, gt = v.recs[i], v.seconds(i), v.gts[i]
        _show(axes[row, 0], _norm(v.maps[i]), sec, f"{c}: \"{r['prompt']}\" (seed {r['seed']})", gt)
        _show(axes[row, 1], _norm(v.maps[idx].mean(0)), sec, f"{c}: mean attention over {idx.size} samples",
              v.gts[idx].mean(0) >= 0.5, label_y=False)
        _show(axes[row, 2], gt.astype(float), sec, f"{c}: ground truth ({v.gt_kind}; white = in band)",
              cmap="gray", label_y=False)
        _show(axes[row, 3], 10 * np.log10(v.mels[i] + 1e-10), sec, f"{c}: generated clip, mel energy (dB)",
              gt, cmap="viridis", label_y=False)
    fig.suptitle(f"Attention vs ground truth (white outline) — {v.setting}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return _save(fig, out / "attention_vs_gt.png", 90)


def figure_freq_profiles(v: RunView, out: Path) -> Path:
    """Per class: attention frequency profile (mean +- sd over samples) against the GT profile."""
    import matplotlib.pyplot as plt

    ncol = min(3, len(v.classes))
    nrow = int(np.ceil(len(v.classes) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.4 * nrow), squeeze=False)
    F = v.maps.shape[2]
    x = np.arange(F)
    for k, c in enumerate(v.classes):
        ax = axes[k // ncol, k % ncol]
        idx = v.pick(c)
        prof = _minmax(v.maps[idx].mean(axis=1))  # (n, F): mean over time, each min-max normalised
        gtp = v.gts[idx].mean(axis=1).mean(0)  # (F,): share of frames in band
        mu, sd = prof.mean(0), prof.std(0)
        ax.fill_between(x, mu - sd, mu + sd, color="C0", alpha=0.25)
        ax.plot(x, mu, color="C0", label="attention (min-max norm., mean ± sd)")
        ax.plot(x, gtp, color="C3", ls="--", label=f"ground truth ({v.gt_kind})")
        rr = _profile_r(mu[None], gtp[None])  # (1, F) maps: their profiles are mu and gtp
        ax.set_title(f"{c} (n={idx.size}), Pearson r = {rr:.2f}", fontsize=10)
        _hz_axis(ax, F, axis="x")
        ax.set_ylabel("profile (0 = min, 1 = max)")
        ax.set_ylim(-0.05, 1.1)
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8, loc="upper right")
    for k in range(len(v.classes), nrow * ncol):
        axes[k // ncol, k % ncol].axis("off")
    fig.suptitle(f"Frequency profiles (mean over time), low to high — {v.setting}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, out / "freq_profiles.png", 90)


def figure_layers(v: RunView, out: Path, c: str, names: list, layer_maps: np.ndarray) -> Path:
    """One class: every scored layer's mean map with its profile correlation to the GT."""
    import matplotlib.pyplot as plt

    L = len(names)
    ncol = min(7, L)
    nrow = int(np.ceil(L / ncol))
    idx = v.pick(c)
    g = v.gts[idx].mean(0) >= 0.5
    sec = v.seconds(idx[0])
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.5 * nrow + 0.6), squeeze=False)
    for li, n in enumerate(names):
        ax = axes[li // ncol, li % ncol]
        m = layer_maps[idx, li].mean(0)  # (T, F)
        rr = _profile_r(m, g.astype(float))
        _show(ax, _norm(m), sec, f"{short_layer(n)}\nr = {rr:.2f}", g, label_y=li % ncol == 0)
        ax.title.set_fontsize(8)
        if li // ncol != nrow - 1:
            ax.set_xlabel("")
    for k in range(L, nrow * ncol):
        axes[k // ncol, k % ncol].axis("off")
    fig.suptitle(f"{c}: per-layer attention, mean over {idx.size} samples "
                 f"(each panel scaled to its max; r: profile correlation with GT) — {v.setting}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, out / f"layers_{c.lower()}.png", 80)


def _step_items(v: RunView) -> tuple[np.ndarray | None, dict]:
    """Per class, ``(record index, step_index, step_maps, step_profiles)`` of the records that have them."""
    steps, per = None, {}
    for i, r in enumerate(v.recs):
        with np.load(v.run / r["maps"]) as z:
            if "step_maps" not in z.files:
                continue
            steps = z["steps"]
            per.setdefault(r["class"], []).append((i, z["step_index"], z["step_maps"], z["step_profiles"]))
    return steps, per


def figure_steps(v: RunView, out: Path) -> Path | None:
    """Per class: the class-mean map at the kept steps and the step x frequency profile."""
    import matplotlib.pyplot as plt

    steps, per = _step_items(v)
    if not per:
        return None
    F = v.maps.shape[2]
    K = max(len(items[0][1]) for items in per.values())
    fig, axes = plt.subplots(len(v.classes), K + 1, figsize=(3.0 * (K + 1), 2.7 * len(v.classes)), squeeze=False)
    for row, c in enumerate(v.classes):
        items = [it for it in per.get(c, []) if v.roles[it[0]] == "test"] or per.get(c, [])
        if not items:
            continue
        sidx = items[0][1]
        sm = np.mean([it[2] for it in items], axis=0)  # (K, T, F)
        sp = np.mean([it[3] for it in items], axis=0)  # (S, F)
        g = v.gts[[it[0] for it in items]].mean(0) >= 0.5
        sec = v.seconds(items[0][0])
        for j in range(K):
            if j < len(sidx):
                _show(axes[row, j], _norm(sm[j]), sec, f"{c}: step {int(sidx[j]) + 1} of {len(steps)}", g,
                      label_y=j == 0)
            else:
                axes[row, j].axis("off")
        ax = axes[row, K]
        ax.imshow(_minmax(sp).T, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                  extent=(0.5, sp.shape[0] + 0.5, -0.5, F - 0.5))
        ax.set_title(f"{c}: frequency profile per step\n(each step min-max normalised)", fontsize=9)
        ax.set_xlabel("denoising step")
        _hz_axis(ax, F)
    fig.suptitle(f"Attention across denoising steps (mean over samples; GT outlined) — {v.setting}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, out / "steps.png", 90)


def make_figures(run, cfg, recs: list[dict], maps: np.ndarray, arrays: dict) -> list[Path]:
    """Write the figures of a run; ``maps`` are the scored maps (N, T, F) in record order."""
    import matplotlib

    matplotlib.use("Agg")
    run = Path(run)
    out = run / "figures"
    out.mkdir(exist_ok=True)
    present = {r["class"] for r in recs}
    v = RunView(run, recs, maps, arrays["gt"], arrays["mel"], cfg.gt, [c for c in cfg.classes if c in present],
                run_setting(cfg))
    files = [figure_attention_vs_gt(v, out), figure_freq_profiles(v, out)]
    names = arrays.get("layer_names") or []
    if names:
        files += [figure_layers(v, out, c, names, arrays["layer_maps"]) for c in v.classes]
    step_file = figure_steps(v, out)
    return files + ([step_file] if step_file else [])
