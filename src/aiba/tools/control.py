"""The positive control: does aiba recover an alignment that is really there?

A model whose instrument words steer where energy goes on the mel axis (the trained
``reference`` backend) must show it in its attention; the same architecture at its
initial weights must not. Two scores per instrument class, each against its own null:

- **single prompts** ("a solo bass recording"): the instrument word's map scored against
  the class's band (matched), and the map of the same word position in a prompt of
  another class scored against the same band (the *shuffled-class null*: item i's band vs
  the map of a random item of another class, :func:`aiba.align.tables.null_maps`);
- **two-instrument prompts** ("bass and strings playing together"): word a's map scored
  against band a (matched), and word b's map *from the same generation* scored against
  band a (the *other-word null*); every generation gives one item per word.

Score: average precision of the map's frequency profile (mean over time, ``(F,)``)
ranking the mel rows of the band (:func:`aiba.align.metrics.tf_ap` on a ``(1, F)`` map), and
the pointing game (is the profile's peak row inside the band). Confidence intervals:
percentile bootstrap over the items of each class (paired: the null is resampled with the
matched items). The control *holds* for a class when the matched score's CI lies above the
null's CI (no overlap) for both kinds of prompt.

Also reported: for each two-instrument item, whether the difference of the two words'
profiles correlates positively with the difference of their bands (sign agreement).

``aiba eval --backend reference`` runs it on the shipped weights (``--model-id seed1``
picks another) and on the untrained weights, writes ``control.json``, ``control.md``,
figures and audio, and prints the table. ``--tiny`` runs the untrained model only.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import AibaError
from ..settings import device as usable_device, integer, number

__all__ = ["RUN_FLAGS", "ControlSettings", "WordItems", "score_items", "paired_bootstrap", "class_summary",
           "generate_word_maps", "run_control", "run_from_args", "format_markdown"]


@dataclass(frozen=True)
class ControlSettings:
    samples_per_class: int = 8  # single-prompt generations per class
    pair_samples: int = 4  # generations per unordered class pair (word order alternates)
    steps: int = 10  # DDIM steps (the maps are averaged over them)
    guidance_scale: float = 3.0
    seed: int = 0
    n_boot: int = 1000
    level: float = 0.95
    batch: int = 24  # prompts per sampler call
    audio_seconds: float = 2.0  # length of the per-class audio examples (0: none)

    def __post_init__(self):
        for name, lo in (("samples_per_class", 2), ("pair_samples", 1), ("steps", 1), ("batch", 1), ("n_boot", 0),
                         ("seed", 0)):
            integer(name, getattr(self, name), lo=lo)
        number("guidance_scale", self.guidance_scale)
        number("audio_seconds", self.audio_seconds, lo=0, hi=600)
        number("level", self.level, lo=0, hi=1, lo_open=True, hi_open=True)


@dataclass
class WordItems:
    """Scored items: one per (generation, instrument word)."""

    kind: list = field(default_factory=list)  # "single" | "pair"
    cls: list = field(default_factory=list)  # the word's class
    other: list = field(default_factory=list)  # pair: the other word's class; single: ""
    prompt: list = field(default_factory=list)
    maps: list = field(default_factory=list)  # (T, F) map of the word
    other_maps: list = field(default_factory=list)  # pair: (T, F) map of the other word; single: None


# ------------------------------------------------------------------ scoring
def profile_ap(map, band) -> float:
    """AP of the time-averaged map ``(F,)`` ranking the band's rows."""
    from ..align.metrics import tf_ap

    prof = np.asarray(map, dtype=np.float64).reshape(-1, np.shape(band)[-1]).mean(0)  # (F,)
    return tf_ap(prof[None], np.asarray(band, dtype=bool)[None])


def profile_pointing(map, band) -> float:
    """1 when the time-averaged map's peak row lies in the band (ties: expected hit rate)."""
    from ..align.metrics import pointing_game

    prof = np.asarray(map, dtype=np.float64).reshape(-1, np.shape(band)[-1]).mean(0)
    return float(pointing_game(prof[None], np.asarray(band, dtype=bool)[None], ties="expected"))


def score_items(maps, bands_for_items) -> np.ndarray:
    """``(N, 2)`` [profile AP, profile pointing] of each map against its band ``(F,)``."""
    return np.array([[profile_ap(m, b), profile_pointing(m, b)] for m, b in zip(maps, bands_for_items)])


def paired_bootstrap(matched, null, n_boot: int, rng: np.random.Generator, level: float = 0.95) -> dict:
    """Means of ``matched`` and ``null`` (same items) with percentile bootstrap CIs over items."""
    a, b = np.asarray(matched, dtype=np.float64), np.asarray(null, dtype=np.float64)
    n = a.size
    out = {"n": int(n), "matched": float(np.mean(a)), "null": float(np.mean(b))}
    if n_boot > 0 and n > 0:
        idx = rng.integers(0, n, (n_boot, n))
        lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
        ma, mb = a[idx].mean(1), b[idx].mean(1)
        out["matched_ci"] = [float(np.quantile(ma, lo)), float(np.quantile(ma, hi))]
        out["null_ci"] = [float(np.quantile(mb, lo)), float(np.quantile(mb, hi))]
    else:
        out["matched_ci"] = out["null_ci"] = [float("nan"), float("nan")]
    out["separated"] = bool(out["matched_ci"][0] > out["null_ci"][1])
    return out


def class_summary(items: WordItems, bands: dict, *, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict:
    """Per class: single prompts vs the shuffled-class null, pair prompts vs the other-word null.

    ``bands``: class -> ``(F,)`` bool band. Returns ``{class: {"single": {"ap": ..., "pointing":
    ...}, "pair": {...}, "coverage": ..., "holds": bool}, "_sign_agreement": ...}``.
    """
    from ..align.tables import shuffled_index

    rng = np.random.default_rng(seed)
    kind = np.asarray(items.kind)
    cls = np.asarray(items.cls)
    out: dict = {}
    single = np.flatnonzero(kind == "single")
    shuffled_src = {}
    if single.size:
        src = shuffled_index(cls[single], rng)  # (S,) an item of another class for each item
        shuffled_src = {int(single[j]): items.maps[single[src[j]]] for j in range(single.size)}
    missing = sorted(set(cls) - set(bands))
    if missing:
        raise AibaError(f"no band for class(es) {missing}; have {sorted(bands)}")
    F = len(next(iter(bands.values())))
    for c in [c for c in bands if c in set(cls)]:
        band = np.asarray(bands[c], dtype=bool)
        res: dict = {"coverage": float(band.mean())}
        s_idx = single[cls[single] == c]
        if s_idx.size:
            m = score_items([items.maps[i] for i in s_idx], [band] * s_idx.size)
            nl = score_items([shuffled_src[int(i)] for i in s_idx], [band] * s_idx.size)
            res["single"] = {k: paired_bootstrap(m[:, j], nl[:, j], n_boot, rng, level)
                             for j, k in enumerate(("ap", "pointing"))}
        p_idx = np.flatnonzero((kind == "pair") & (cls == c))
        if p_idx.size:
            m = score_items([items.maps[i] for i in p_idx], [band] * p_idx.size)
            nl = score_items([items.other_maps[i] for i in p_idx], [band] * p_idx.size)
            res["pair"] = {k: paired_bootstrap(m[:, j], nl[:, j], n_boot, rng, level)
                           for j, k in enumerate(("ap", "pointing"))}
        res["holds"] = bool(all(res[k]["ap"]["separated"] for k in ("single", "pair") if k in res))
        out[c] = res
    pairs = np.flatnonzero(kind == "pair")
    if pairs.size:
        agree = []
        for i in pairs:
            d_map = (np.asarray(items.maps[i]) - np.asarray(items.other_maps[i])).reshape(-1, F).mean(0)
            d_band = np.asarray(bands[items.cls[i]], float) - np.asarray(bands[items.other[i]], float)
            if d_map.std() > 0 and d_band.std() > 0:
                agree.append(float(np.corrcoef(d_map, d_band)[0, 1] > 0))
        out["_sign_agreement"] = {"fraction": float(np.mean(agree)) if agree else float("nan"), "n": len(agree)}
    return out


# ------------------------------------------------------------------ generation
def control_prompts(classes, s: ControlSettings) -> list[tuple]:
    """``[(kind, prompt, words (classes), seed)]`` of the control, in a fixed order."""
    from ..backends.reference import PAIR_TEMPLATES, SINGLE_TEMPLATES, WORDS

    out = []
    for c in classes:
        for k in range(s.samples_per_class):
            t = SINGLE_TEMPLATES[k % len(SINGLE_TEMPLATES)]
            out.append(("single", t.format(instrument=WORDS[c]), (c,)))
    for a, b in combinations(classes, 2):
        for k in range(s.pair_samples):
            x, y = (a, b) if k % 2 == 0 else (b, a)
            out.append(("pair", PAIR_TEMPLATES[k % len(PAIR_TEMPLATES)].format(a=WORDS[x], b=WORDS[y]), (x, y)))
    return [(kind, p, w, s.seed + i) for i, (kind, p, w) in enumerate(out)]


def generate_word_maps(backend, prompts, words, *, steps: int = 25, guidance_scale: float = 3.0,
                       seed: int = 0, frames: int | None = None):
    """Generate ``prompts`` in one batch under capture; per prompt ``{word: (T, F) map}`` of the
    cross-attention to that word (mean over its key positions), and the generated features.

    ``words[b]``: the words of prompt b whose maps are wanted (e.g. ``["bass"]``).
    """
    from .. import AttnTap

    T = frames or backend.frames
    decode, backend.audio = backend.audio, False  # maps only: no vocoder
    tap = AttnTap(target_T=T, target_F=backend.model.cfg.n_mels, pool=None)
    try:
        res = backend.generate(list(prompts), tap=tap, steps=steps, guidance_scale=guidance_scale, seed=seed,
                               seconds=T / 100)
    finally:
        backend.audio = decode
    per_token = res.maps["words"].overall.numpy()  # (B, Lk, T, F)
    out = []
    for b, (p, ws) in enumerate(zip(prompts, words)):
        out.append({w: per_token[b, backend.tokenizer.index(p, w)].mean(0) for w in ws})
    return out, backend.last_features


def collect_items(backend, classes, s: ControlSettings, progress: bool = True):
    """Run every control prompt; returns (WordItems, mean generated feature per class)."""
    from ..backends.reference import WORDS

    plan = control_prompts(classes, s)
    items = WordItems()
    feats: dict = {c: [] for c in classes}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc=f"control {backend.name}", unit="clip", dynamic_ncols=True)
    for start in range(0, len(plan), s.batch):
        chunk = plan[start:start + s.batch]
        maps, gen = generate_word_maps(backend, [p for _, p, _, _ in chunk],
                                       [[WORDS[c] for c in w] for _, _, w, _ in chunk],
                                       steps=s.steps, guidance_scale=s.guidance_scale, seed=chunk[0][3])
        for (kind, p, w, _), m, g in zip(chunk, maps, gen):
            if kind == "single":
                items.kind.append("single"), items.cls.append(w[0]), items.other.append("")
                items.prompt.append(p), items.maps.append(m[WORDS[w[0]]]), items.other_maps.append(None)
                feats[w[0]].append(g)
            else:
                for x, y in (w, w[::-1]):
                    items.kind.append("pair"), items.cls.append(x), items.other.append(y)
                    items.prompt.append(p), items.maps.append(m[WORDS[x]]), items.other_maps.append(m[WORDS[y]])
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return items, {c: np.mean(v, axis=0) for c, v in feats.items() if v}


# ------------------------------------------------------------------ bands
def control_bands(classes) -> dict:
    """``{"data": {class: (F,) band}, "knowledge": {...}}``: the shipped data-driven
    templates (mini-Slakh training stems) and the narrowed knowledge bands."""
    from ..backends.reference import shipped_templates
    from ..align.templates import knowledge_templates

    dt = shipped_templates()
    know = knowledge_templates(T=1, F=64)
    return {"data": {c: dt.band(c) for c in classes}, "knowledge": {c: know[c][0] for c in classes}}


# ------------------------------------------------------------------ report
def _fmt(d: dict, key: str = "ap") -> tuple[str, str]:
    r = d[key]
    return (f"{r['matched']:.2f} [{r['matched_ci'][0]:.2f}, {r['matched_ci'][1]:.2f}]",
            f"{r['null']:.2f} [{r['null_ci'][0]:.2f}, {r['null_ci'][1]:.2f}]")


def format_markdown(results: dict) -> str:
    """One table per (model, template): per class, matched vs null with CIs."""
    from ..align.templates import COVERAGE_FLAG

    lines = []
    for model, by_gt in results["models"].items():
        for gt, summ in by_gt.items():
            lines += [f"**{model}, {gt} templates** (profile AP, mean [95 % CI])", "",
                      "| class | band rows | single: matched | single: shuffled-class null | "
                      "pair: matched | pair: other-word null | holds |",
                      "|---|---|---|---|---|---|---|"]
            for c, r in summ.items():
                if c.startswith("_"):
                    continue
                cov = f"{r['coverage']:.0%}" + (" (flagged: covers nearly every row)" if r["coverage"] >= COVERAGE_FLAG else "")
                s_m, s_n = _fmt(r["single"]) if "single" in r else ("-", "-")
                p_m, p_n = _fmt(r["pair"]) if "pair" in r else ("-", "-")
                lines.append(f"| {c} | {cov} | {s_m} | {s_n} | {p_m} | {p_n} | {'yes' if r['holds'] else 'no'} |")
            sa = summ.get("_sign_agreement")
            n_hold = sum(1 for c, r in summ.items() if not c.startswith("_") and r["holds"])
            lines += ["", f"Control holds for {n_hold} of {sum(1 for c in summ if not c.startswith('_'))} classes."
                      + (f" Pairs whose map difference agrees in sign with the band difference: "
                         f"{sa['fraction']:.0%} of {sa['n']}." if sa else ""), ""]
    s = results["settings"]
    lines.append(f"{s['samples_per_class']} single-prompt clips per class, {s['pair_samples']} clips per class pair, "
                 f"{s['steps']} DDIM steps, guidance {s['guidance_scale']}, {s['n_boot']} bootstrap resamples, "
                 f"seed {s['seed']}.")
    return "\n".join(lines) + "\n"


def _figures(run: Path, items_by_model: dict, feats_by_model: dict, bands: dict) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from ..align.audio import grid_row_hz

    hz = grid_row_hz(64)
    classes = list(bands["data"])
    models = list(items_by_model)
    fig, axes = plt.subplots(len(models), len(classes), figsize=(2.6 * len(classes), 2.6 * len(models)),
                             squeeze=False, sharey=True)
    for r, model in enumerate(models):
        items = items_by_model[model]
        for j, c in enumerate(classes):
            ax = axes[r, j]
            sel = [i for i, (k, cc) in enumerate(zip(items.kind, items.cls)) if cc == c]
            prof = np.mean([np.asarray(items.maps[i]).mean(0) for i in sel], axis=0)
            prof = (prof - prof.min()) / ((prof.max() - prof.min()) or 1)  # min-max: the shape, not the level
            ax.plot(prof, hz, label="attention to the word (min-max)", color="C3")
            if c in feats_by_model[model]:
                e = feats_by_model[model][c].mean(0)
                e = (e - e.min()) / ((e.max() - e.min()) or 1)
                ax.plot(e, hz, label="generated log-mel", color="C0", lw=0.8)
            band = bands["data"][c]
            ax.fill_betweenx(hz, 0, 1, where=band, color="C2", alpha=0.2, step="mid", label="data band")
            ax.set_yscale("log")
            ax.set_title(f"{Path(model).stem if '/' in model else model}: {c.lower()}", fontsize=9)
            if j == 0:
                ax.set_ylabel("Hz")
    axes[0, 0].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    (run / "figures").mkdir(parents=True, exist_ok=True)
    path = run / "figures" / "control_profiles.png"
    atomic_write(path, lambda p: fig.savefig(p, dpi=100))
    plt.close(fig)
    return [path]


def _audio(run: Path, backend, classes, s: ControlSettings, tag: str) -> list[Path]:
    if s.audio_seconds <= 0:
        return []
    import soundfile as sf

    from ..backends.reference import SINGLE_TEMPLATES, WORDS

    prompts = [SINGLE_TEMPLATES[0].format(instrument=WORDS[c]) for c in classes]
    res = backend.generate(prompts, steps=s.steps, guidance_scale=s.guidance_scale, seed=s.seed,
                           seconds=s.audio_seconds)
    (run / "audio").mkdir(parents=True, exist_ok=True)
    paths = []
    for c, y in zip(classes, res.audio):
        y = np.asarray(y, dtype=np.float32)
        y = y / max(1e-6, np.abs(y).max()) * 0.8
        p = run / "audio" / f"{tag}_{c.lower()}.wav"
        atomic_write(p, lambda t, y=y: sf.write(str(t), y, res.sample_rate, format="WAV"))
        paths.append(p)
    return paths


def run_control(out, *, weights=("seed0",), untrained: bool = True, classes=None,
                settings: ControlSettings | None = None, progress: bool = True, figures: bool = True,
                device: str = "cpu") -> dict:
    """Score trained (each of ``weights``) and untrained reference models; write the run folder."""
    from ..backends.reference import CLASSES, ReferenceBackend, load_weights

    s = settings or ControlSettings()
    classes = tuple(classes or CLASSES)
    if len(classes) < 2:
        raise AibaError(f"the control needs at least two classes (its shuffled-class null scores a map against another "
                        f"class's band), got {list(classes)}; e.g. --classes bass,drums")
    device = usable_device("--device", device)
    models: dict = {}  # loaded before the run folder is made: unknown weights leave nothing behind
    for w in weights:
        models[f"trained {w}"] = ReferenceBackend(load_weights(w, device))
    if untrained:
        models["untrained"] = ReferenceBackend.tiny(seed=s.seed, device=device)
    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    bands = control_bands(classes)
    results = {"settings": asdict(s), "classes": list(classes), "models": {}, "bands": {
        gt: {c: np.flatnonzero(b).tolist() for c, b in bb.items()} for gt, bb in bands.items()}, "seconds": {}}
    items_by_model, feats_by_model = {}, {}
    for name, be in models.items():
        t0 = time.time()
        items, feats = collect_items(be, classes, s, progress)
        items_by_model[name], feats_by_model[name] = items, feats
        results["models"][name] = {gt: class_summary(items, bb, n_boot=s.n_boot, seed=s.seed, level=s.level)
                                   for gt, bb in bands.items()}
        if figures:
            _audio(run, be, classes, s, name.replace("trained ", "").replace(" ", "_"))
        results["seconds"][name] = round(time.time() - t0, 1)
        if hasattr(be.model, "meta") and be.model.meta:
            results.setdefault("weights", {})[name] = be.model.meta
    np.savez_compressed(run / "control_maps.npz", **{
        f"{name}/{i}": np.asarray(m, np.float32) for name, it in items_by_model.items() for i, m in enumerate(it.maps)})
    atomic_write(run / "control.json", json.dumps(results, indent=1) + "\n")
    atomic_write(run / "control.md", format_markdown(results))
    if figures:
        _figures(run, items_by_model, feats_by_model, bands)
    return results


# the ``aiba eval`` flags the control reads (any other flag given is refused before it runs)
RUN_FLAGS = ("backend", "tiny", "model_id", "device", "classes", "samples_per_class", "steps", "guidance_scale", "seed",
             "n_boot", "out", "no_figures", "quiet")


def run_from_args(args) -> int:
    """``aiba eval --backend reference``: the control from the shipped weights (reads the
    flags in :data:`RUN_FLAGS`)."""
    from ..backends.reference import CLASSES
    from ..runs.config import canonical_class

    wanted = {canonical_class(c) for c in args.classes.split(",") if c.strip()}  # unknown names raise
    if not wanted:  # run_control would take every class
        raise AibaError(f"--classes {args.classes!r}: no class named; give at least two of {[c.lower() for c in CLASSES]}")
    classes = tuple(c for c in CLASSES if c in wanted)  # fewer than two: run_control says so
    given = {k: getattr(args, k) for k in ("samples_per_class", "steps", "guidance_scale")
             if getattr(args, k) is not None}  # the rest keep ControlSettings' defaults; an explicit 0 is checked
    s = ControlSettings(seed=args.seed, n_boot=args.n_boot, **given)
    weights = () if args.tiny else tuple(w.strip() for w in (args.model_id or "seed0").split(","))
    out = args.out or ("runs/reference-untrained" if args.tiny else "runs/reference")
    res = run_control(out, weights=weights, untrained=True, classes=classes, settings=s,
                      progress=not args.quiet, figures=not args.no_figures, device=args.device or "cpu")
    print(format_markdown(res))
    print(f"{out}: control.md, control.json, figures/, audio/", file=sys.stderr)
    return 0
