"""aiba eval / aiba report on the tiny AudioLDM2: tables, figures, resume, corruption, shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aiba.errors import AibaError, AibaWarning

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from aiba.runs.config import EvalConfig, plan
from aiba.custom import instrument_token_indices
from aiba.tools.eval import merge, run_eval
from aiba.tools.report import build_report as report
from aiba.runs.records import load_records

FIGURES = ("attention_vs_gt.png", "freq_profiles.png", "layers_bass.png", "layers_drums.png", "steps.png")


@pytest.fixture(scope="module")
def backend():
    from aiba.backends import get

    return get("audioldm2", tiny=True, seed=0)  # what `aiba eval --tiny --seed 0` builds


def small(out, **kw) -> EvalConfig:
    base = dict(out=str(out), tiny=True, classes=("Bass", "Drums"), samples_per_class=2, steps=2, grid=(32, 32),
                n_boot=40, gt="knowledge", progress=False, figures=False)
    base.update(kw)
    return EvalConfig(**base)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def data_cfg(mini_slakh):
    return lambda out, **kw: small(out, gt="data", dataset=str(mini_slakh), **kw)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, backend, data_cfg):
    """A complete uninterrupted run (2 classes x 2 samples, data-driven GT, figures)."""
    return run_eval(data_cfg(tmp_path_factory.mktemp("eval") / "baseline", figures=True), backend=backend)


def copy_run(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_tiny_run_writes_tables_figures_and_report_regenerates(tmp_path, baseline):
    run = copy_run(baseline, tmp_path / "run")
    man = json.loads((run / "manifest.json").read_text())
    assert man["versions"]["torch"] and man["versions"]["aiba"] and "diffusers" in man["versions"]
    assert man["config"]["steps"] == 2 and man["config"]["gt"] == "data" and man["backend"]["tiny"] is True
    assert man["samples"] == 4 and "git_revision" in man
    recs = lines(run / "records.jsonl")
    assert [r["id"] for r in recs] == ["bass-0000", "bass-0001", "drums-0000", "drums-0001"]
    for r in recs:
        assert r["streams"] == ["t5"] and r["steps"] == 2 and r["layers"] == 7
        assert 0 <= r["metrics"]["precision"] <= 1 and 0 <= r["metrics"]["iou"] <= 1
        with np.load(run / r["maps"]) as z:
            assert z["map"].shape == z["gt"].shape == (32, 32) and z["gt"].dtype == bool
            assert z["layer_maps"].shape == (7, 32, 32) and z["step_profiles"].shape == (2, 32)
    assert (run / "data_templates.npz").is_file()
    for f in ("table1.csv", "table1.md", "table3.csv", "table3.md", "tables.json"):
        assert (run / f).stat().st_size > 0
    t1 = (run / "table1.md").read_text()
    assert "Null baseline (uniform)" in t1 and "Null baseline (shuffled)" in t1 and "| Precision |" in t1
    t3 = (run / "table3.md").read_text()
    assert "| Bass |" in t3 and "| Drums |" in t3 and "| Macro-avg |" in t3
    for f in FIGURES:
        assert (run / "figures" / f).stat().st_size > 5000, f
    before = {f: (run / f).read_bytes() for f in ("table1.md", "table1.csv", "table3.md", "table3.csv")}
    for f in before:
        (run / f).unlink()
    from aiba.cli import main

    assert main(["report", str(run), "--no-figures"]) == 0  # from the records alone, no model
    assert {f: (run / f).read_bytes() for f in before} == before


def test_resume_after_interruption_loses_and_duplicates_nothing(tmp_path, backend, baseline, data_cfg):
    class Stop(Exception):
        pass

    seen = []

    def stop_after_two(rec):
        seen.append(rec["id"])
        if len(seen) == 2:
            raise Stop

    cfg = data_cfg(tmp_path / "run")
    with pytest.raises(Stop):
        run_eval(cfg, backend=backend, on_record=stop_after_two)
    first = lines(tmp_path / "run" / "records.jsonl")
    assert [r["id"] for r in first] == seen == ["bass-0000", "bass-0001"]
    assert not (tmp_path / "run" / "table1.md").exists()
    resumed = []
    run_eval(cfg, backend=backend, on_record=lambda r: resumed.append(r["id"]))
    assert resumed == ["drums-0000", "drums-0001"]  # only what was missing
    recs = lines(tmp_path / "run" / "records.jsonl")
    assert [r["id"] for r in recs] == [s.id for s in plan(cfg)]
    assert recs[:2] == first
    assert [r["metrics"] for r in lines(baseline / "records.jsonl")] == [r["metrics"] for r in recs]
    assert (baseline / "table1.md").read_text() == (tmp_path / "run" / "table1.md").read_text()


def test_corrupt_records_are_reported_and_redone(tmp_path, backend, baseline, data_cfg):
    run = copy_run(baseline, tmp_path / "run")
    path = run / "records.jsonl"
    text = path.read_text().splitlines(keepends=True)
    # a half-written last line, and a record whose maps file is gone
    path.write_bytes("".join(text[:3]).encode() + text[3].encode()[:40])
    (run / json.loads(text[1])["maps"]).unlink()
    cut = run / json.loads(text[2])["maps"]  # and one whose maps archive was cut in half
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    redone = []
    with pytest.warns(AibaWarning) as w:
        run_eval(data_cfg(run), backend=backend, on_record=lambda r: redone.append(r["id"]))
    msgs = " ".join(str(x.message) for x in w)
    assert "incomplete last line" in msgs and msgs.count("unreadable") == 2
    assert sorted(redone) == ["bass-0001", "drums-0000", "drums-0001"]
    recs = lines(path)
    assert sorted(r["id"] for r in recs) == ["bass-0000", "bass-0001", "drums-0000", "drums-0001"]
    assert {r["id"]: r["metrics"] for r in recs} == {r["id"]: r["metrics"] for r in map(json.loads, text)}


def test_rerun_with_other_settings_is_refused(tmp_path, backend, baseline, data_cfg):
    run = copy_run(baseline, tmp_path / "run")
    with pytest.raises(AibaError, match="other settings.*steps"):
        run_eval(data_cfg(run, steps=4), backend=backend)
    run_eval(data_cfg(run, n_boot=10), backend=backend)  # table settings may change: nothing regenerated
    assert lines(run / "records.jsonl") == lines(baseline / "records.jsonl")


def test_two_process_shards_merge_to_the_single_process_result(tmp_path, baseline, mini_slakh):
    out = tmp_path / "sharded"
    args = [sys.executable, "-m", "aiba", "eval", "--tiny", "--dataset", str(mini_slakh), "--classes", "bass,drums",
            "--samples-per-class", "2", "--steps", "2", "--grid", "32x32", "--n-boot", "40", "--out", str(out),
            "--no-figures", "-q"]
    env = [dict(os.environ, RANK=str(r), WORLD_SIZE="2", PYTHONWARNINGS="ignore") for r in (0, 1)]
    procs = [subprocess.Popen(args, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for e in env]
    for p in procs:
        log = p.communicate(timeout=300)[0].decode()
        assert p.returncode == 0, log[-3000:]
    s0, s1 = lines(out / "records.rank0-of-2.jsonl"), lines(out / "records.rank1-of-2.jsonl")
    assert [r["index"] for r in s0] == [0, 2] and [r["index"] for r in s1] == [1, 3]  # i % world
    assert not (out / "table1.md").exists()
    merge(out)
    merged, ref = lines(out / "records.jsonl"), lines(baseline / "records.jsonl")
    assert [r["id"] for r in merged] == [r["id"] for r in ref]
    for a, b in zip(merged, ref):
        for k, v in b["metrics"].items():
            assert a["metrics"][k] == (pytest.approx(v, rel=1e-5, abs=1e-6) if isinstance(v, float) else v), k
    assert (out / "table1.md").read_text() == (baseline / "table1.md").read_text()
    # a conflicting duplicate is reported, not silently kept
    bad = dict(s1[0], metrics=dict(s1[0]["metrics"], iou=-1.0))
    with open(out / "records.rank1-of-2.jsonl", "a") as f:
        f.write(json.dumps(bad) + "\n")
    with pytest.warns(AibaWarning, match="conflict"):
        recs, problems = load_records(out)
    assert len(recs) == 4 and any("conflict" in p for p in problems)


def test_learned_layer_weights_fit_on_held_out_samples(tmp_path, backend):
    cfg = small(tmp_path / "run", weights="learned", fit_fraction=0.25)
    run = run_eval(cfg, backend=backend)
    lw = json.loads((run / "learned_weights.json").read_text())
    w = np.array(list(lw["weights"].values()))
    assert len(w) == 7 and np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    recs = lines(run / "records.jsonl")
    fit = sorted(r["id"] for r in recs if r["role"] == "fit")
    assert fit == sorted(lw["fit_ids"]) and len(fit) == 2 and {f.split("-")[0] for f in fit} == {"bass", "drums"}
    assert not set(fit) & set(lw["test_ids"])
    tables = json.loads((run / "tables.json").read_text())
    assert tables["table1"]["settings"]["n_items"] == 2


def test_all_attention_and_subset_pooling(tmp_path, backend):
    run = run_eval(small(tmp_path / "run", kinds="all", pool="subset", samples_per_class=1), backend=backend)
    recs = lines(run / "records.jsonl")
    assert all(r["streams"] == ["t5", "self"] and r["layers"] == 7 + 28 for r in recs)
    assert report(run, figures=False)["table3"]["values"]["Bass"]["Precision"] >= 0


def test_instrument_tokens_prompts_and_plan(tmp_path):
    from aiba.runs.config import load_prompts

    (tmp_path / "p.yaml").write_text("templates: ['{instrument} solo']\ninstruments: {guitars: electric guitar}\n")
    templates, words = load_prompts(tmp_path / "p.yaml")
    assert templates == ("{instrument} solo",) and dict(words)["Guitars"] == "electric guitar"
    (tmp_path / "bad.yaml").write_text("- no placeholder\n")
    with pytest.raises(AibaError, match="instrument"):
        EvalConfig(templates=load_prompts(tmp_path / "bad.yaml")[0])
    assert instrument_token_indices(["a", "solo", "bass", "recording", "</s>"], "bass") == [2]
    assert instrument_token_indices(["▁an", "▁electric", "▁vio", "lin", "</s>"], "violin") == [2, 3]
    assert instrument_token_indices(["Ġbass", "Ġguitar"], "bass guitar") == [0, 1]
    with pytest.raises(AibaError, match="not found"):
        instrument_token_indices(["a", "piano"], "organ")
    cfg = EvalConfig(classes=("Bass", "Organ"), samples_per_class=3, seed=5)
    p = plan(cfg)
    assert [s.id for s in p] == ["bass-0000", "bass-0001", "bass-0002", "organ-0000", "organ-0001", "organ-0002"]
    assert [s.seed for s in p] == [5, 6, 7, 5, 6, 7] and p[1].prompt == "the sound of bass playing alone"
    with pytest.raises(AibaError, match="gt"):
        EvalConfig(gt="nope")


@pytest.mark.parametrize("field, bad", [("pool", "sum"), ("aggregate", "median"), ("weights", "equal"), ("kinds", "self"),
                                        ("normalize", "zscore"), ("gt", "stems")])
def test_config_choices_are_checked_and_offered_by_the_cli(field, bad):
    """Each choice field refuses a value outside its list (named in the error); the CLI offers
    exactly the values the config takes, and the values the library's functions take."""
    import argparse

    from aiba.align.metrics import normalize_map
    from aiba.runs.config import CHOICES
    from aiba.tools.eval import register

    with pytest.raises(AibaError, match=rf"{field} must be one of .*got '{bad}'"):
        EvalConfig(**{field: bad})
    for value in CHOICES[field]:
        assert getattr(EvalConfig(**{field: value}), field) == value
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    sub = ap._subparsers._group_actions[0].choices["eval"]
    flags = {a.dest: a for a in sub._actions}
    if field in flags:
        assert tuple(flags[field].choices) == CHOICES[field] and flags[field].default == getattr(EvalConfig(), field)
    if field == "normalize":  # every listed value works on a map
        for value in CHOICES[field]:
            assert normalize_map(np.array([[0.0, 2.0]]), value).shape == (1, 2)


def test_local_rank_that_is_not_an_integer_is_named(tmp_path, monkeypatch):
    """With CUDA and no --device, the device comes from LOCAL_RANK (torchrun/accelerate)."""
    import torch

    monkeypatch.setenv("LOCAL_RANK", "abc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = EvalConfig(out=str(tmp_path / "r"), backend="audioldm2", classes=("Bass",), samples_per_class=1, steps=1,
                     gt="knowledge", progress=False, figures=False)
    with pytest.raises(AibaError, match="LOCAL_RANK='abc' is not an integer"):
        run_eval(cfg)
