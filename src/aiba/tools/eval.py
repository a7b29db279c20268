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
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import settings
from ..atomic import atomic_write, remove_stale_temps
from ..errors import AibaError, AibaWarning
from ..runs.lock import LOCK_NAME, RunLock
from ..runs.config import (
    CHOICES,
    DEFAULT_TEMPLATES,
    EvalConfig,
    INSTRUMENT_WORDS,
    Sample,
    canonical_class,
    load_prompts,
    plan,
)
from ..runs.records import RECORDS, append_record, read_lines, load_records
from ..runs.manifest import check_manifest, config_from_manifest, prepare_dir, read_manifest
from ..custom import instrument_token_indices

__all__ = ["run_eval", "merge", "dist_info", "register"]


# ---------------------------------------------------------------------------- settings


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


def _device(cfg: EvalConfig, rank: int) -> str:
    """The real backend's device: --device, else cuda:LOCAL_RANK when CUDA is there, else
    cpu; checked to exist on this machine."""
    import torch

    device = cfg.device
    if device is None:
        env = os.environ.get("LOCAL_RANK")
        try:
            local = rank if env is None else int(env)
        except ValueError:
            raise AibaError(f"LOCAL_RANK={env!r} is not an integer") from None
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    return settings.device("eval --device" if cfg.device is not None else "eval's default device (cuda:LOCAL_RANK)",
                           device)


def _get_backend(cfg: EvalConfig, device: str | None):
    """The config's backend: its tiny model, or the real one on ``device`` (see :func:`_device`)."""
    from ..backends import get

    if cfg.tiny:
        return get(cfg.backend, tiny=True, seed=cfg.seed)
    import torch

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
    device = None
    if backend is None:  # settings that only a run needs, and its device, before anything is written
        cfg.check_run()
        if not cfg.tiny:
            device = _device(cfg, rank)
    samples = plan(cfg)  # every prompt filled: nothing is written before the settings hold
    run = Path(cfg.out)
    if cfg.dataset is not None and not Path(cfg.dataset).is_dir():
        raise AibaError(f"--dataset {cfg.dataset}: no such folder (a Slakh-layout root is expected)")
    if rank == 0:
        check_manifest(run, cfg, len(samples), world, write=False)  # refuse other settings before writing
    prepare_dir(run)
    lock = RunLock(run, what=f"aiba eval{f' rank {rank}/{world}' if world > 1 else ''}",
                   name=LOCK_NAME if world == 1 else f"{LOCK_NAME}.rank{rank}-of-{world}")
    with lock:
        remove_stale_temps(run)
        remove_stale_temps(run / "maps")
        return _run_locked(cfg, run, samples, rank, world, backend, on_record, device)


def _run_locked(cfg, run: Path, samples, rank: int, world: int, backend, on_record, device: str | None) -> Path:
    if rank != 0:
        _wait_for(run / "manifest.json", "the manifest")
        check_manifest(run, cfg, len(samples), world)
    mine = [s for s in samples if s.index % world == rank]
    out_file = run / (RECORDS if world == 1 else f"records.rank{rank}-of-{world}.jsonl")
    done: set = set()
    if out_file.is_file():
        good, problems = read_lines(out_file)
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
        ctx = _Ctx(backend or _get_backend(cfg, device), cfg, run)
        ctx.streams = _scored_streams(ctx.backend, cfg, todo[0].prompt)
    if rank == 0:
        check_manifest(run, cfg, len(samples), world)
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
                append_record(out_file, rec)
                bar.update(1)
                if on_record is not None:
                    on_record(rec)
        finally:
            bar.close()
    if world == 1:
        from .report import build_report

        build_report(run, n_boot=cfg.n_boot, figures=cfg.figures)
    else:
        print(f"aiba eval: rank {rank} done ({len(mine)} samples in {out_file.name}); when every rank has "
              f"finished run: aiba eval --merge {run}", file=sys.stderr)
    return run


def merge(run_dir) -> Path:
    """Combine the shard files of a run into ``records.jsonl`` (deduplicated, conflicts
    reported), check every planned sample is present, and build tables and figures."""
    run = Path(run_dir)
    manifest = read_manifest(run)
    recs, problems = load_records(run)
    for p in problems:
        print(f"aiba eval --merge: {p}", file=sys.stderr)
    expected = manifest.get("samples")
    if expected is not None and len(recs) != expected:
        have = {r["id"] for r in recs}
        cfg = config_from_manifest(manifest)
        missing = [s.id for s in plan(cfg) if s.id not in have]
        print(f"aiba eval --merge: {len(missing)} of {expected} samples missing ({missing[:6]}"
              f"{'...' if len(missing) > 6 else ''}); rerun the ranks to complete them", file=sys.stderr)
    atomic_write(run / RECORDS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    from .report import build_report

    build_report(run)
    return run


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
        from .control import RUN_FLAGS, run_from_args

        unused = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                  if k in args.defaults and k not in RUN_FLAGS and v != args.defaults[k]]
        if unused:
            raise AibaError(f"aiba eval --backend reference runs the positive control, which does not use {', '.join(unused)}; "
                            f"it takes {', '.join('--' + f.replace('_', '-') for f in RUN_FLAGS)}")
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
    d = EvalConfig()
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
    p.add_argument("--seed", type=int, default=d.seed, help=f"sample k uses seed + k (default {d.seed})")
    p.add_argument("--out", default=None, help="run directory (default runs/BACKEND[-tiny])")
    p.add_argument("--gt", choices=CHOICES["gt"], default=d.gt, help=f"ground truth (default {d.gt})")
    p.add_argument("--pool", choices=CHOICES["pool"], default=d.pool,
                   help=f"text-token pooling (default {d.pool} over the prompt's words)")
    p.add_argument("--aggregate", choices=CHOICES["aggregate"], default=d.aggregate,
                   help=f"spatial aggregator (default {d.aggregate})")
    p.add_argument("--weights", choices=CHOICES["weights"], default=d.weights,
                   help="aggregation weights; learned: NNLS layer weights fitted on a held-out split")
    p.add_argument("--gamma", type=float, default=d.gamma, help=f"decay of --weights late (default {d.gamma})")
    p.add_argument("--kinds", choices=CHOICES["kinds"], default=d.kinds, help="cross-attention only, or cross + self")
    p.add_argument("--streams", default=None, help="comma-separated streams to score (default: the word streams)")
    p.add_argument("--grid", type=_grid, default=d.grid, help=f"T x F grid (default {d.grid[0]}x{d.grid[1]})")
    p.add_argument("--fit-fraction", type=float, default=d.fit_fraction,
                   help=f"share of samples that fit learned weights (default {d.fit_fraction})")
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help=f"operating point after max-normalisation (default {d.threshold})")
    p.add_argument("--n-boot", type=int, default=d.n_boot, help=f"bootstrap resamples for the CIs (default {d.n_boot})")
    p.add_argument("--step-maps", type=int, default=d.step_maps, help=f"per-step maps kept per sample (default {d.step_maps})")
    p.add_argument("--render-tracks", type=int, default=d.render_tracks,
                   help=f"tracks of the default mini-Slakh (default {d.render_tracks})")
    p.add_argument("--render-seconds", type=float, default=d.render_seconds,
                   help=f"seconds per default mini-Slakh track (default {d.render_seconds})")
    p.add_argument("--shard", default=None, help="i/n: run shard i of n (default: RANK/WORLD_SIZE, else 0/1)")
    p.add_argument("--merge", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="combine the shard files of RUN_DIR (or --out) and build tables and figures")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd)
    p.set_defaults(defaults=vars(p.parse_args([])))  # what each flag is when not given
