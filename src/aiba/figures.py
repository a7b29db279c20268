"""Figures of an ``aiba eval`` run (AIBA Figs. 2/3 style), drawn from the records' ``.npz`` files.

Every map is drawn time on x (seconds), mel rows on y with the lowest band at the bottom
and the y ticks labelled in Hz (:func:`aiba.audio.grid_row_hz`); the ground truth is
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
from pathlib import Path

import numpy as np

__all__ = ["make_figures", "short_layer"]

_HZ_TICKS = (50, 100, 250, 500, 1000, 2000, 4000, 8000)


def short_layer(name: str) -> str:
    """``down_blocks.1.attentions.2.transformer_blocks.0.attn2`` -> ``down1.att2.attn2``."""
    s = re.sub(r"(down|up)_blocks\.(\d+)", r"\1\2", name)
    s = s.replace("mid_block", "mid").replace("transformer_blocks.0.", "")
    s = re.sub(r"attentions\.(\d+)", r"att\1", s)
    return re.sub(r"transformer_blocks\.(\d+)\.", r"tb\1.", s)


def _hz_axis(ax, F: int, axis: str = "y") -> None:
    from .audio import grid_row_hz

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


def make_figures(run, cfg, recs: list[dict], maps: np.ndarray, arrays: dict) -> list[Path]:
    """Write the figures of a run; ``maps`` are the scored maps (N, T, F) in record order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    out = run / "figures"
    out.mkdir(exist_ok=True)
    gts, mels = arrays["gt"], arrays["mel"]
    labels = np.array([r["class"] for r in recs])
    roles = np.array([r["role"] for r in recs])
    classes = [c for c in cfg.classes if c in set(labels)]
    N, T, F = maps.shape
    files = []
    setting = f"{cfg.backend}{' tiny' if cfg.tiny else ''}, gt={cfg.gt}, pool={cfg.pool}, kinds={cfg.kinds}, " \
              f"weights={cfg.weights}, {cfg.steps} steps"

    def pick(c):  # scored (test) records of a class, else all of them
        idx = np.flatnonzero((labels == c) & (roles == "test"))
        return idx if idx.size else np.flatnonzero(labels == c)

    # ---- attention vs ground truth (Fig. 2/3)
    fig, axes = plt.subplots(len(classes), 4, figsize=(17, 2.9 * len(classes)), squeeze=False)
    for row, c in enumerate(classes):
        idx = pick(c)
        i = idx[0]
        r = recs[i]
        sec = float(r.get("seconds") or T)
        _show(axes[row, 0], _norm(maps[i]), sec, f"{c}: \"{r['prompt']}\" (seed {r['seed']})", gts[i])
        _show(axes[row, 1], _norm(maps[idx].mean(0)), sec, f"{c}: mean attention over {idx.size} samples",
              gts[idx].mean(0) >= 0.5, label_y=False)
        _show(axes[row, 2], gts[i].astype(float), sec, f"{c}: ground truth ({cfg.gt}; white = in band)", cmap="gray", label_y=False)
        _show(axes[row, 3], 10 * np.log10(mels[i] + 1e-10), sec, f"{c}: generated clip, mel energy (dB)",
              gts[i], cmap="viridis", label_y=False)
    fig.suptitle(f"Attention vs ground truth (white outline) — {setting}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    files.append(out / "attention_vs_gt.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)

    # ---- frequency profiles
    ncol = min(3, len(classes))
    nrow = int(np.ceil(len(classes) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.4 * nrow), squeeze=False)
    x = np.arange(F)
    for k, c in enumerate(classes):
        ax = axes[k // ncol, k % ncol]
        idx = pick(c)
        prof = _minmax(maps[idx].mean(axis=1))  # (n, F): mean over time, each min-max normalised
        gtp = gts[idx].mean(axis=1).mean(0)  # (F,): share of frames in band
        mu, sd = prof.mean(0), prof.std(0)
        ax.fill_between(x, mu - sd, mu + sd, color="C0", alpha=0.25)
        ax.plot(x, mu, color="C0", label="attention (min-max norm., mean ± sd)")
        ax.plot(x, gtp, color="C3", ls="--", label=f"ground truth ({cfg.gt})")
        with np.errstate(invalid="ignore", divide="ignore"):
            rr = np.corrcoef(mu, gtp)[0, 1] if mu.std() > 0 and gtp.std() > 0 else np.nan
        ax.set_title(f"{c} (n={idx.size}), Pearson r = {rr:.2f}", fontsize=10)
        _hz_axis(ax, F, axis="x")
        ax.set_ylabel("profile (0 = min, 1 = max)")
        ax.set_ylim(-0.05, 1.1)
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8, loc="upper right")
    for k in range(len(classes), nrow * ncol):
        axes[k // ncol, k % ncol].axis("off")
    fig.suptitle(f"Frequency profiles (mean over time), low to high — {setting}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    files.append(out / "freq_profiles.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)

    # ---- per-layer panels
    names = arrays.get("layer_names") or []
    if names:
        lm = arrays["layer_maps"]  # (N, L, T, F)
        L = len(names)
        ncol = min(7, L)
        nrow = int(np.ceil(L / ncol))
        for c in classes:
            idx = pick(c)
            g = gts[idx].mean(0) >= 0.5
            sec = float(recs[idx[0]].get("seconds") or T)
            fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.5 * nrow + 0.6), squeeze=False)
            for li, n in enumerate(names):
                ax = axes[li // ncol, li % ncol]
                m = lm[idx, li].mean(0)
                pm, pg = m.sum(0), g.sum(0).astype(float)
                with np.errstate(invalid="ignore", divide="ignore"):
                    rr = np.corrcoef(pm, pg)[0, 1] if pm.std() > 0 and pg.std() > 0 else np.nan
                _show(ax, _norm(m), sec, f"{short_layer(n)}\nr = {rr:.2f}", g, label_y=li % ncol == 0)
                ax.title.set_fontsize(8)
                if li // ncol != nrow - 1:
                    ax.set_xlabel("")
            for k in range(L, nrow * ncol):
                axes[k // ncol, k % ncol].axis("off")
            fig.suptitle(f"{c}: per-layer attention, mean over {idx.size} samples "
                         f"(each panel scaled to its max; r: profile correlation with GT) — {setting}", fontsize=10)
            fig.tight_layout(rect=(0, 0, 1, 0.95))
            files.append(out / f"layers_{c.lower()}.png")
            fig.savefig(files[-1], dpi=80)
            plt.close(fig)

    # ---- per-step panels
    steps = None
    per: dict = {}
    for i, r in enumerate(recs):
        with np.load(run / r["maps"]) as z:
            if "step_maps" not in z.files:
                continue
            steps = z["steps"]
            per.setdefault(r["class"], []).append((i, z["step_index"], z["step_maps"], z["step_profiles"]))
    if per:
        K = max(len(v[0][1]) for v in per.values())
        fig, axes = plt.subplots(len(classes), K + 1, figsize=(3.0 * (K + 1), 2.7 * len(classes)), squeeze=False)
        for row, c in enumerate(classes):
            items = [v for v in per.get(c, []) if roles[v[0]] == "test"] or per.get(c, [])
            if not items:
                continue
            sidx = items[0][1]
            sm = np.mean([v[2] for v in items], axis=0)  # (K, T, F)
            sp = np.mean([v[3] for v in items], axis=0)  # (S, F)
            g = gts[[v[0] for v in items]].mean(0) >= 0.5
            sec = float(recs[items[0][0]].get("seconds") or T)
            for j in range(K):
                ax = axes[row, j]
                if j < len(sidx):
                    _show(ax, _norm(sm[j]), sec, f"{c}: step {int(sidx[j]) + 1} of {len(steps)}", g, label_y=j == 0)
                else:
                    ax.axis("off")
            ax = axes[row, K]
            ax.imshow(_minmax(sp).T, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                      extent=(0.5, sp.shape[0] + 0.5, -0.5, F - 0.5))
            ax.set_title(f"{c}: frequency profile per step\n(each step min-max normalised)", fontsize=9)
            ax.set_xlabel("denoising step")
            _hz_axis(ax, F)
        fig.suptitle(f"Attention across denoising steps (mean over samples; GT outlined) — {setting}", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        files.append(out / "steps.png")
        fig.savefig(files[-1], dpi=90)
        plt.close(fig)
    return files
