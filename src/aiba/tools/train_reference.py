"""``aiba train-reference``: train the reference text-to-mel model on mini-Slakh stems.

Data: every stem of the six classes in the dataset's ``train`` split, as log-mel features
on aiba's 64-mel grid (:func:`aiba.backends.reference.mel_to_feature`), cached in
``OUT/features.npz``. Each batch item is a random ``frames``-long crop where the sound is
active; 30 % of the items are single stems with a single-instrument prompt ("a solo bass
recording"), 70 % are two-stem mixtures of one track (mel power summed) with a
two-instrument prompt ("bass and strings playing together", the words in random order).
10 % of prompts are dropped to the empty prompt (classifier-free guidance).

Training: epsilon objective on a cosine schedule, AdamW (lr 1e-3 after a 100-step warm-up),
an exponential moving average of the weights (what is exported). Every random draw is
seeded by ``(seed, step)``, so a run interrupted and resumed gives the same weights as one
that was not. ``OUT/checkpoint.pt`` is written atomically every ``--checkpoint-every``
steps; the loss curve goes to ``OUT/loss.json`` and ``OUT/loss.png``; at the end
``OUT/weights.safetensors`` and ``OUT/provenance.json`` (command, seed, steps, data, final
loss, sha256 of the weights).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import AibaError
from ..settings import device as usable_device, integer, number

__all__ = ["TrainSettings", "load_features", "train", "register"]


@dataclass(frozen=True)
class TrainSettings:
    data: str
    out: str
    seed: int = 0
    steps: int = 1500
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.999
    mix_fraction: float = 0.7
    drop_prompt: float = 0.1
    checkpoint_every: int = 100
    device: str = "cpu"
    split: str = "train"

    def __post_init__(self):
        """Every setting checked (named as its flag) before any data is read or folder made."""
        for flag, lo in (("--seed", 0), ("--steps", 1), ("--batch", 1), ("--checkpoint-every", 1), ("--warmup", 0)):
            integer(flag, getattr(self, flag[2:].replace("-", "_")), lo=lo)
        number("lr", self.lr, lo=0, lo_open=True)
        number("ema", self.ema, lo=0, hi=1, hi_open=True)
        number("mix_fraction", self.mix_fraction, lo=0, hi=1)
        number("drop_prompt", self.drop_prompt, lo=0, hi=1)
        object.__setattr__(self, "device", usable_device("--device", self.device))
        if not Path(self.data).is_dir():
            raise AibaError(f"--data {self.data}: not a folder; render one with `aiba make-dataset {self.data} "
                            "--tracks 40 --seconds 15`")


# ------------------------------------------------------------------ data
def load_features(data, out: Path | None = None, split: str = "train", progress: bool = True) -> dict:
    """Per-stem log-mel features and active frames of the six classes, grouped by track.

    Returns ``{"stems": [(track, class, feature (frames, 64) float32, active (frames,) bool)],
    "fingerprint": {...}}``; cached in ``out/features.npz`` when ``out`` is given.
    """
    from ..align.audio import AUDIOLDM2_MEL, mel_spectrogram
    from ..backends.reference import CLASSES, mel_to_feature
    from ..data.slakh import SlakhDataset
    from ..align.templates import active_frames

    cache = None if out is None else Path(out) / "features.npz"
    if cache is not None and cache.is_file():
        z = np.load(cache, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        stems = [(t, c, z[f"f{i}"], z[f"a{i}"]) for i, (t, c) in enumerate(meta["stems"])]
        return {"stems": stems, "fingerprint": meta["fingerprint"]}
    items = SlakhDataset(data, split).stems(CLASSES)
    if not items:
        raise AibaError(f"{data}: no stems of the classes {CLASSES} in split {split!r}")
    it = items
    if progress:
        from tqdm import tqdm

        it = tqdm(items, desc="features", unit="stem")
    stems = []
    for s in it:
        S = mel_spectrogram(s.load_audio(AUDIOLDM2_MEL.sr), AUDIOLDM2_MEL)  # (frames, 64) power
        stems.append((s.track, s.paper_class, mel_to_feature(S), active_frames(S)))
    counts = {c: sum(1 for s in stems if s[1] == c) for c in CLASSES}
    fp = {"root": str(data), "split": split, "stems": len(stems),
          "tracks": len({s[0] for s in stems}), "stems_per_class": counts,
          "frames": int(sum(s[2].shape[0] for s in stems))}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"f{i}": s[2] for i, s in enumerate(stems)}
        arrays.update({f"a{i}": s[3] for i, s in enumerate(stems)})
        meta = json.dumps({"stems": [(s[0], s[1]) for s in stems], "fingerprint": fp})
        atomic_write(cache, lambda p: np.savez(p, meta=np.array(meta), **arrays))
    return {"stems": stems, "fingerprint": fp}


class _Sampler:
    """Random crops and prompts, drawn from ``np.random.default_rng([seed, step])``."""

    def __init__(self, feats: dict, frames: int, mix_fraction: float, drop_prompt: float):
        from ..backends.reference import CLASSES

        self.stems = feats["stems"]
        self.frames = frames
        self.mix = mix_fraction
        self.drop = drop_prompt
        self.by_class = {c: [i for i, s in enumerate(self.stems) if s[1] == c] for c in CLASSES}
        self.classes = [c for c in CLASSES if self.by_class[c]]
        missing = [c for c in CLASSES if not self.by_class[c]]
        if missing:
            raise AibaError(f"training data has no stems of class(es) {missing}")
        by_track: dict = {}
        for i, s in enumerate(self.stems):
            by_track.setdefault(s[0], []).append(i)
        # pairs of stems of different classes in one track, listed per class
        self.pairs = {c: [] for c in CLASSES}
        for idx in by_track.values():
            for a in idx:
                for b in idx:
                    if self.stems[a][1] != self.stems[b][1]:
                        self.pairs[self.stems[a][1]].append((a, b))

    def _crop(self, rng, idx: tuple) -> np.ndarray | None:
        n = min(self.stems[i][2].shape[0] for i in idx)
        if n < self.frames:
            return None
        for _ in range(20):
            s = int(rng.integers(0, n - self.frames + 1))
            if all(self.stems[i][3][s:s + self.frames].mean() >= 0.5 for i in idx):
                if len(idx) == 1:
                    return self.stems[idx[0]][2][s:s + self.frames]
                from ..backends.reference import feature_to_mel, mel_to_feature

                p = sum(feature_to_mel(self.stems[i][2][s:s + self.frames]) for i in idx)
                return mel_to_feature(p)
        return None

    def batch(self, rng, size: int):
        from ..backends.reference import PAIR_TEMPLATES, SINGLE_TEMPLATES, WORDS

        xs, prompts = [], []
        while len(xs) < size:
            c = self.classes[int(rng.integers(len(self.classes)))]
            if rng.random() < self.mix and self.pairs[c]:
                a, b = self.pairs[c][int(rng.integers(len(self.pairs[c])))]
                x = self._crop(rng, (a, b))
                wa, wb = WORDS[self.stems[a][1]], WORDS[self.stems[b][1]]
                if rng.random() < 0.5:
                    wa, wb = wb, wa
                prompt = PAIR_TEMPLATES[int(rng.integers(len(PAIR_TEMPLATES)))].format(a=wa, b=wb)
            else:
                i = self.by_class[c][int(rng.integers(len(self.by_class[c])))]
                x = self._crop(rng, (i,))
                prompt = SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))].format(instrument=WORDS[c])
            if x is None:
                continue
            xs.append(x)
            prompts.append("" if rng.random() < self.drop else prompt)
        return np.stack(xs), prompts  # (B, frames, 64), B prompts


# ------------------------------------------------------------------ training
def _plot_loss(path: Path, steps, losses) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="batch loss")
    if len(losses) >= 50:
        k = 50
        sm = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], sm, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=100))
    plt.close(fig)


def _save_checkpoint(out: Path, step, model, ema, opt, losses, s: TrainSettings) -> None:
    import torch

    state = {"step": step, "model": model.state_dict(), "ema": ema, "opt": opt.state_dict(),
             "losses": losses, "settings": s.__dict__, "config": model.cfg.to_json()}
    atomic_write(out / "checkpoint.pt", lambda p: torch.save(state, p))
    steps = list(range(1, len(losses) + 1))
    atomic_write(out / "loss.json", json.dumps({"step": steps, "loss": losses}) + "\n")
    _plot_loss(out / "loss.png", np.array(steps), np.array(losses))


def _train_step(model, opt, params, sampler: _Sampler, alphas, s: TrainSettings, step: int) -> float:
    """One optimiser step on a fresh batch (seeded by ``(seed, step)``); returns the loss."""
    import torch

    rng = np.random.default_rng([s.seed, step])
    x0, prompts = sampler.batch(rng, s.batch)
    gen = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
    x0 = torch.from_numpy(x0)[:, None].to(model.device)  # (B, 1, frames, 64)
    noise = torch.randn(x0.shape, generator=gen).to(model.device)
    t = torch.randint(0, model.cfg.train_timesteps, (x0.shape[0],), generator=gen).to(model.device)
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    for g in opt.param_groups:
        g["lr"] = s.lr * min(1.0, (step + 1) / max(1, s.warmup))
    pred = model.denoise(xt, t, model.encode(prompts))
    loss = torch.nn.functional.mse_loss(pred, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.item())


def _ema_update(model, ema: dict, d: float) -> None:
    """``ema = d * ema + (1 - d) * weights`` for float tensors; others copied."""
    import torch

    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                ema[k].copy_(v)


def _export(out: Path, model, ema: dict, losses: list, step: int, s: TrainSettings, data, seconds: float,
            command: str | None) -> dict:
    """Write the EMA weights and their provenance; returns the provenance."""
    import torch

    from ..backends.reference import ReferenceModel, sha256_file

    # export the EMA weights
    final = ReferenceModel(model.cfg, device="cpu")
    final.load_state_dict({k: v.cpu() for k, v in ema.items()})
    tail = losses[-100:] if losses else [float("nan")]
    prov = {
        "command": command or "aiba train-reference " + f"--data {s.data} --out {s.out} --seed {s.seed} --steps {s.steps}",
        "seed": s.seed, "steps": step, "batch": s.batch, "lr": s.lr, "ema": s.ema,
        "mix_fraction": s.mix_fraction, "drop_prompt": s.drop_prompt, "device": s.device,
        "data": data,
        "final_loss_mean_last_100": float(np.mean(tail)),
        "parameters": final.n_params(), "train_seconds_this_run": round(seconds, 1),
        "torch": torch.__version__,
    }
    final.save(out / "weights.safetensors", meta={k: prov[k] for k in ("seed", "steps", "final_loss_mean_last_100")})
    prov["sha256"] = sha256_file(out / "weights.safetensors")
    atomic_write(out / "provenance.json", json.dumps(prov, indent=2) + "\n")
    return prov


def train(s: TrainSettings, *, progress: bool = True, command: str | None = None) -> dict:
    """Train (or resume) into ``s.out``; returns the provenance dict."""
    import torch

    from ..backends.reference import ReferenceModel

    out = Path(s.out)
    if out.exists() and not out.is_dir():
        raise AibaError(f"--out {out}: is a file, not a folder; choose another output folder", kind="io")
    feats = load_features(s.data, out, s.split, progress)  # makes ``out`` once the data is found
    model = ReferenceModel(seed=s.seed, device=s.device)
    sampler = _Sampler(feats, model.cfg.frames, s.mix_fraction, s.drop_prompt)
    sched = model.train_scheduler()
    params = model.parameters()
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses: list = []
    step = 0
    ck = out / "checkpoint.pt"
    if ck.is_file():
        st = torch.load(ck, map_location=model.device, weights_only=False)
        if st["config"] != model.cfg.to_json() or st["settings"]["seed"] != s.seed:
            raise AibaError(f"{ck}: written with another seed or architecture; use another --out")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        ema, losses, step = st["ema"], list(st["losses"]), int(st["step"])
    alphas = sched.alphas_cumprod.to(model.device)
    bar = None
    if progress and step < s.steps:
        from tqdm import tqdm

        bar = tqdm(total=s.steps, initial=step, desc=f"train seed {s.seed}", unit="step")
    t0 = time.time()
    while step < s.steps:
        loss = _train_step(model, opt, params, sampler, alphas, s, step)
        step += 1
        _ema_update(model, ema, min(s.ema, (1 + step) / (10 + step)))
        losses.append(loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % s.checkpoint_every == 0 or step == s.steps:
            _save_checkpoint(out, step, model, ema, opt, losses, s)
    if bar is not None:
        bar.close()
    prov = _export(out, model, ema, losses, step, s, feats["fingerprint"], time.time() - t0, command)
    return prov


# ------------------------------------------------------------------ CLI
def register(sub) -> None:
    p = sub.add_parser("train-reference", help="train the reference text-to-mel model on mini-Slakh",
                       description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/mini-slakh",
                   help="an `aiba make-dataset` folder (default data/mini-slakh)")
    p.add_argument("--out", required=True, help="output folder (resumes a run found there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps in total (default 1500)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    s = TrainSettings(data=args.data, out=args.out, seed=args.seed, steps=args.steps, batch=args.batch,
                      device=args.device, checkpoint_every=args.checkpoint_every)
    prov = train(s, progress=not args.quiet, command="aiba " + " ".join(sys.argv[1:]))
    print(json.dumps({k: prov[k] for k in ("seed", "steps", "final_loss_mean_last_100", "sha256")}))
    return 0
