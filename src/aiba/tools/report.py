"""``aiba report runs/NAME``: tables and figures of an ``aiba eval`` run, from its records alone.

Reads ``manifest.json``, the records (``records.jsonl`` and any shard files) and each
record's ``maps/{id}.npz``; no model is loaded. Writes ``table1.{csv,md}``,
``table3.{csv,md}``, ``tables.json`` and ``figures/*.png`` (see :mod:`aiba.tools.figures`).

With ``weights=learned`` the per-layer maps of the ``fit`` records give non-negative layer
weights summing to 1 (:func:`aiba.maps.mapping.fit_layer_weights`, NNLS against their ground
truth); the ``test`` records' maps are recombined with them (weighted mean of the layer
maps for ``aggregate=mean``, max over the layers with positive weight for ``max``, as
:meth:`aiba.AttnTap.maps` does) and only test records enter the tables. The weights and
the ids used to fit them are written to ``learned_weights.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

from ..errors import AibaError
from ..runs.records import load_arrays

__all__ = ["build_report", "learned_maps", "register"]


def learned_maps(layer_maps_fit, gts_fit, layer_maps_test, names, aggregate: str = "mean"):
    """Fit layer weights on held-out maps and recombine the test maps: ``(weights, (N, T, F))``."""
    import torch

    from ..maps.mapping import fit_layer_weights

    w = fit_layer_weights({n: torch.from_numpy(layer_maps_fit[:, i]) for i, n in enumerate(names)},
                          torch.from_numpy(gts_fit.astype(np.float32)))
    v = np.array([w[n] for n in names])  # (L,)
    if aggregate == "max":
        maps = layer_maps_test[:, v > 0].max(axis=1)  # (N, T, F)
    else:
        maps = np.einsum("nltf,l->ntf", layer_maps_test, v) / v.sum()  # (N, T, F)
    return w, maps.astype(np.float32)


def _table_csv(table) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["baseline", "row", "column", "value", "ci_low", "ci_high"])
    sets = [("model", table.values, table.ci)] + [(k, table.null[k], table.null_ci[k]) for k in table.null]
    for name, vals, ci in sets:
        for i, r in enumerate(table.rows):
            for j, c in enumerate(table.columns):
                wr.writerow([name, r, c] + [f"{x:.6f}" for x in (vals[i, j], ci[i, j, 0], ci[i, j, 1])])
    return buf.getvalue()


def _learned_test_maps(run: Path, recs: list[dict], arrays: dict, roles: np.ndarray, aggregate: str):
    """weights=learned: layer weights fitted on the fit records, applied to the test records.
    Returns (maps with the test rows replaced, test mask, the weights' record), and writes
    ``learned_weights.json``."""
    from ..atomic import atomic_write

    fit, test = roles == "fit", roles == "test"
    if not fit.any() or not test.any():
        raise AibaError(f"weights=learned needs fit and test records; have {int(fit.sum())} fit, "
                        f"{int(test.sum())} test")
    gts = arrays["gt"]
    w, test_maps = learned_maps(arrays["layer_maps"][fit], gts[fit], arrays["layer_maps"][test],
                                arrays["layer_names"], aggregate)
    maps = arrays["map"].copy()
    maps[test] = test_maps
    lw = {"weights": w, "fit_ids": [r["id"] for r, f in zip(recs, fit) if f],
          "test_ids": [r["id"] for r, t in zip(recs, test) if t], "method": "NNLS, normalised to sum 1"}
    atomic_write(run / "learned_weights.json", json.dumps(lw, indent=2))
    return maps, test, lw


def build_report(run_dir, *, n_boot: int | None = None, figures: bool | None = None) -> dict:
    """Write the tables (and figures) of a run; returns ``tables.json``'s content."""
    from ..atomic import atomic_write
    from ..runs.config import run_setting
    from ..runs.manifest import config_from_manifest, read_manifest
    from ..runs.records import load_records
    from ..settings import integer
    from ..align.tables import NULLS, build_table1, build_table3

    run = Path(run_dir)
    manifest = read_manifest(run)
    cfg = config_from_manifest(manifest)
    n_boot = cfg.n_boot if n_boot is None else integer("n_boot", n_boot, lo=1)
    figures = cfg.figures if figures is None else figures
    recs, problems = load_records(run)
    if not recs:
        raise AibaError(f"{run}: no good records to tabulate")
    learned = cfg.weights == "learned"
    arrays = load_arrays(run, recs, layers=learned)
    roles = np.array([r["role"] for r in recs])
    labels = np.array([r["class"] for r in recs])
    maps, gts = arrays["map"], arrays["gt"]
    info: dict = {"run": str(run), "records": len(recs), "problems": problems, "weights": cfg.weights}
    test = np.ones(len(recs), dtype=bool)
    if learned:
        maps, test, info["learned_weights"] = _learned_test_maps(run, recs, arrays, roles, cfg.aggregate)
    classes = [c for c in cfg.classes if c in set(labels[test])]
    nulls = NULLS
    if len(classes) < 2:  # the shuffled baseline pairs maps across classes
        nulls = tuple(n for n in NULLS if n != "shuffled")
        note = (f"shuffled null baseline skipped: it needs samples of at least two classes, "
                f"have {classes}")
        info["notes"] = [note]
        print(f"aiba report: {note}", file=sys.stderr)
    t1 = build_table1(maps[test], gts[test], labels[test], cfg.threshold, cfg.normalize, n_boot=n_boot,
                      seed=cfg.seed, extras=True, nulls=nulls)
    t3 = build_table3(maps[test], gts[test], labels[test], cfg.threshold, cfg.normalize, classes=classes,
                      n_boot=n_boot, seed=cfg.seed, nulls=nulls)
    setting = run_setting(cfg, int(test.sum()))
    for name, t in (("table1", t1), ("table3", t3)):
        atomic_write(run / f"{name}.md", t.to_markdown() + f"\n\nRun: {setting}.\n")
        atomic_write(run / f"{name}.csv", _table_csv(t))
    info.update({"setting": setting, "table1": t1.to_dict(), "table3": t3.to_dict()})
    atomic_write(run / "tables.json", json.dumps(info, indent=2, default=float))
    if figures:
        from .figures import make_figures

        if not learned:
            arrays = load_arrays(run, recs, layers=True)
        make_figures(run, cfg, recs, maps, arrays)
    return info


def _cmd(args: argparse.Namespace) -> int:
    import contextlib

    from ..atomic import remove_stale_temps
    from ..runs.manifest import read_manifest
    from ..runs.lock import RunLock
    from ..settings import integer

    if args.n_boot is not None:
        integer("--n-boot", args.n_boot, lo=1)
    read_manifest(args.run)  # a foreign or corrupt manifest is refused before anything is written
    with RunLock(args.run, what="aiba report"), contextlib.redirect_stdout(sys.stderr):
        remove_stale_temps(args.run)
        info = build_report(args.run, n_boot=args.n_boot, figures=not args.no_figures)
    run = Path(args.run)
    print((run / "table1.md").read_text())
    print((run / "table3.md").read_text())
    if info["problems"]:
        print(f"{len(info['problems'])} problem(s) with records, left out: see the warnings above")
    return 0


def register(subparsers) -> None:
    """Add ``aiba report``."""
    p = subparsers.add_parser("report", help="rebuild the tables and figures of an aiba eval run from its records",
                              description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory written by aiba eval")
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (default: the run's)")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.set_defaults(func=_cmd)
