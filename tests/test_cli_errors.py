"""Every user mistake ends in one `aiba: error:` line, a distinct exit status, no traceback,
and leaves the results already in the run directory untouched."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aiba.cli import main
from aiba.errors import EXIT_CODES

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

INPUT, IO, MISSING, LOCKED, INTERRUPTED = (EXIT_CODES[k] for k in ("input", "io", "missing", "locked", "interrupted"))
# the settings of the finished run below; each case adds one bad value
RUN_ARGS = ["--tiny", "--classes", "bass,drums", "--samples-per-class", "1", "--steps", "1", "--grid", "16x16",
            "--gt", "knowledge", "--n-boot", "10", "--no-figures", "-q"]


def tree_hashes(root: Path) -> dict:
    """Every file's hash and every folder (an empty folder left behind counts too)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real finished tiny run (records, maps, tables) that every bad command must leave alone."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["eval", *RUN_ARGS, "--out", str(run)]) == 0
    assert (run / "records.jsonl").read_text().count("\n") == 2 and (run / "table1.md").is_file()
    return run


def files(tmp: Path) -> dict:
    """Bad input files named by the cases."""
    out = {}

    def put(name, data):
        p = tmp / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        out[name] = str(p)

    put("artist.yaml", "- 'a {instrument} solo by {artist}'\n")
    put("positional.yaml", "- 'a {instrument} solo {0}'\n")
    put("malformed.yaml", "templates: [a {instrument}\n  - : :\n")
    put("inst_list.yaml", "templates: ['a {instrument} solo']\ninstruments: [bass, drums]\n")
    put("binary.yaml", bytes(range(256)) * 4)
    put("not_a_dir", "x")
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "manifest.json").write_text(json.dumps({"name": "some other tool", "version": 3}))
    out["foreign"] = str(tmp / "foreign")
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "manifest.json").write_bytes(b'{"tool": "aiba eval", "config": {"out"\x00\xff')
    out["corrupt"] = str(tmp / "corrupt")
    (tmp / "jsondir").mkdir()
    out["jsondir"] = str(tmp / "jsondir")
    put("sf.sf2", b"RIFF\x10\x00\x00\x00sfbkLIST" + bytes(64))  # an SF2 header, no soundfont in it
    put("hostname.sf2", "not a soundfont at all\n")
    # metadata.yaml holding 42
    track = tmp / "slakh42" / "train" / "Track00001"
    track.mkdir(parents=True)
    (track / "metadata.yaml").write_text("42\n")
    out["slakh42"] = str(tmp / "slakh42")
    # --model factories
    (tmp / "factories.py").write_text(
        "def raises():\n    raise RuntimeError('weights file corrupt')\n\n"
        "def garbage():\n    return (42, 43)\n\n"
        "def not_a_tuple():\n    return 'model'\n")
    return out


def cases(run: str, f: dict) -> list:
    """(id, argv, exit status, a fragment the error line must contain)."""
    ev = ["eval", *RUN_ARGS, "--out", run]
    return [
        ("steps-0", ev + ["--steps", "0"], INPUT, "--steps"),
        ("steps-neg", ev + ["--steps", "-3"], INPUT, "--steps"),
        ("seconds-nan", ev + ["--seconds", "nan"], INPUT, "--seconds"),
        ("seconds-neg", ev + ["--seconds", "-1"], INPUT, "--seconds"),
        ("seconds-inf", ev + ["--seconds", "inf"], INPUT, "--seconds"),
        ("threshold-2", ev + ["--threshold", "2"], INPUT, "--threshold"),
        ("threshold-nan", ev + ["--threshold", "nan"], INPUT, "--threshold"),
        ("guidance-nan", ev + ["--guidance-scale", "nan"], INPUT, "--guidance-scale"),
        ("step-maps-0", ev + ["--step-maps", "0"], INPUT, "--step-maps"),
        ("n-boot-0", ev + ["--n-boot", "0"], INPUT, "--n-boot"),
        ("gamma-0", ev + ["--gamma", "0"], INPUT, "--gamma"),
        ("fit-fraction-nan", ev + ["--fit-fraction", "nan"], INPUT, "--fit-fraction"),
        ("samples-0", ev + ["--samples-per-class", "0"], INPUT, "--samples-per-class"),
        ("unknown-class", ev + ["--classes", "bass,kazoo"], INPUT, "kazoo"),
        ("prompt-artist", ev + ["--prompts", f["artist.yaml"]], INPUT, "{artist}"),
        ("prompt-positional", ev + ["--prompts", f["positional.yaml"]], INPUT, "{0}"),
        ("prompt-malformed", ev + ["--prompts", f["malformed.yaml"]], INPUT, "malformed YAML"),
        ("prompt-instruments-list", ev + ["--prompts", f["inst_list.yaml"]], INPUT, "instruments"),
        ("prompt-binary", ev + ["--prompts", f["binary.yaml"]], INPUT, "not a UTF-8 text file"),
        ("prompt-missing", ev + ["--prompts", run + "/nope.yaml"], INPUT, "not found"),
        ("other-settings", ev + ["--seed", "5"], INPUT, "other settings"),
        ("out-is-file", ["eval", *RUN_ARGS, "--out", f["not_a_dir"]], IO, "is a file"),
        ("dataset-missing", ev + ["--gt", "data", "--dataset", run + "/nope"], INPUT, "--dataset"),
        ("diagnose-steps-0", ["diagnose", "--backend", "audioldm2", "--tiny", "--steps", "0"], INPUT, "--steps"),
        ("factory-raises", ["diagnose", "--model", "factories:raises"], INPUT, "weights file corrupt"),
        ("factory-garbage", ["diagnose", "--model", "factories:garbage"], INPUT, "torch.nn.Module"),
        ("factory-not-tuple", ["diagnose", "--model", "factories:not_a_tuple"], INPUT, "(model, run_callable"),
        ("latent-shape-zero", ["diagnose", "--model", "factories:raises", "--latent-shape", "0x4"], INPUT,
         "--latent-shape must be T x F or T with positive sizes"),  # checked before the factory runs
        ("report-foreign", ["report", f["foreign"]], INPUT, "not a manifest written by aiba eval"),
        ("report-corrupt", ["report", f["corrupt"]], INPUT, "corrupt manifest"),
        ("report-n-boot-0", ["report", run, "--n-boot", "0"], INPUT, "--n-boot"),
        ("report-missing", ["report", run + "/nope"], INPUT, "no such run directory"),
        ("merge-missing", ["eval", "--merge", run + "/nope"], INPUT, "no such run directory"),
        ("sr-huge", ["make-dataset", run + "/ds", "--tracks", "1", "--sr", "10000000"], INPUT, "sr must be"),
        ("soundfont-text", ["make-dataset", run + "/ds", "--tracks", "1", "--seconds", "1", "--synth", "fluidsynth",
                            "--soundfont", f["hostname.sf2"]], INPUT, "not a SoundFont 2 file"),
        ("soundfont-empty-sf2", ["make-dataset", run + "/ds", "--tracks", "1", "--seconds", "1", "--synth",
                                 "fluidsynth", "--soundfont", f["sf.sf2"]], INPUT, "FluidSynth cannot load it"),
        ("make-dataset-into-file", ["make-dataset", f["not_a_dir"], "--tracks", "1"], IO, "is a file"),
        ("bench-json-dir", ["bench", "--size", "tiny", "--json", f["jsondir"]], IO, "is a folder"),
        ("demo-out-missing-dir", ["demo", "--out", run + "/no/such/dir/demo.png"], IO, "does not exist"),
        ("demo-out-not-an-image", ["demo", "--out", run + "/demo.txt"], INPUT, "end the name in one of"),
        ("train-seed-neg", ["train-reference", "--data", run, "--out", run + "/t", "--seed", "-2"], INPUT, "--seed"),
        ("train-device-absent", ["train-reference", "--data", run, "--out", run + "/t", "--device", "cuda:7"], INPUT,
         "'cuda:7' is not usable here"),
        ("train-no-tracks", ["train-reference", "--data", run, "--out", run + "/t", "--steps", "1"], INPUT,
         "no TrackXXXXX folders"),
        ("train-steps-0", ["train-reference", "--data", run, "--out", run + "/t", "--steps", "0"], INPUT, "--steps"),
        ("tiny-device", ev + ["--device", "cuda"], INPUT, "--device cuda applies to the real checkpoint"),
        ("tiny-dtype", ev + ["--dtype", "float16"], INPUT, "--dtype float16 applies"),
        ("dtype-unknown", ["eval", "--out", run, "--dtype", "float17"], INPUT, "--dtype must be one of"),
        ("device-absent", ["eval", "--out", run, "--device", "cuda:7"], INPUT, "'cuda:7' is not usable here"),
        ("device-garbage", ["eval", "--out", run, "--device", "tpu"], INPUT, "a torch device such as"),
        ("bench-device-absent", ["bench", "--size", "tiny", "--device", "cuda:7"], INPUT, "'cuda:7' is not usable here"),
        ("reference-unused-flags", ["eval", "--backend", "reference", "--out", run, "--grid", "8x8", "--shard", "3/2"],
         INPUT, "does not use --grid, --shard"),
        ("reference-seed-neg", ["eval", "--backend", "reference", "--out", run, "--seed", "-1"], INPUT, "seed"),
        ("reference-guidance-nan", ["eval", "--backend", "reference", "--out", run, "--guidance-scale", "nan"], INPUT,
         "guidance_scale"),
        ("reference-device-absent", ["eval", "--backend", "reference", "--out", run, "--device", "cuda:7"], INPUT,
         "'cuda:7' is not usable here"),
        ("reference-no-class", ["eval", "--backend", "reference", "--out", run + "/ref", "--classes", " , "], INPUT,
         "no class named"),
        ("reference-one-class", ["eval", "--backend", "reference", "--out", run + "/ref", "--classes", "bass"], INPUT,
         "at least two classes"),
        ("reference-device-meta", ["eval", "--backend", "reference", "--out", run + "/ref", "--device", "meta"], INPUT,
         "'meta' is not usable here"),
        ("tiny-device-meta", ev + ["--device", "meta"], INPUT, "--device meta applies to the real checkpoint"),
        ("reference-weights-unknown", ["eval", "--backend", "reference", "--out", run + "/ref", "--model-id", "nope"],
         INPUT, "no shipped reference weights 'nope'"),
    ]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    return files(tmp_path_factory.mktemp("bad"))


CASE_IDS = [c[0] for c in cases("RUN", {k: k for k in ("artist.yaml", "positional.yaml", "malformed.yaml",
                                                        "inst_list.yaml", "binary.yaml", "not_a_dir", "foreign",
                                                        "corrupt", "jsondir", "sf.sf2", "hostname.sf2")})]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, fragment: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("aiba: error:")]
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_gives_one_line_and_leaves_results(case_id, finished_run, bad_inputs, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(bad_inputs["not_a_dir"]).parent))  # the --model factories
    _, argv, status, fragment = next(c for c in cases(str(finished_run), bad_inputs) if c[0] == case_id)
    before = tree_hashes(finished_run)
    code, out, err = run_cli(argv, capsys)
    assert code == status, (code, err)
    assert_one_error_line(err, fragment)
    assert tree_hashes(finished_run) == before  # nothing of the finished run changed, nothing added


def test_failed_validation_writes_no_manifest(tmp_path, capsys):
    out = tmp_path / "fresh"
    code, _, err = run_cli(["eval", *RUN_ARGS, "--out", out, "--steps", "0"], capsys)
    assert code == INPUT
    assert_one_error_line(err, "--steps")
    assert not (out / "manifest.json").exists()


def test_metadata_holding_a_number(tmp_path, bad_inputs, capsys):
    code, _, err = run_cli(["eval", *RUN_ARGS, "--out", tmp_path / "r", "--gt", "data", "--dataset",
                            bad_inputs["slakh42"]], capsys)
    assert code == INPUT
    assert_one_error_line(err, "must be a mapping with 'stems:', got a int")


def test_manifest_of_a_run_without_records_is_taken_over(tmp_path, capsys):
    """A run that failed before its first record (here: an unknown stream, found once the
    model is loaded) leaves no manifest; a manifest of another record-less run is replaced."""
    from aiba.runs.config import EvalConfig
    from aiba.runs.manifest import check_manifest, manifest_for as _manifest

    out = tmp_path / "r"
    code, _, err = run_cli(["eval", *RUN_ARGS, "--out", out, "--streams", "nosuch"], capsys)
    assert code == INPUT and not (out / "manifest.json").exists()
    assert_one_error_line(err, "nosuch")
    # a manifest with other settings and no record: replaced by the next run's
    old = EvalConfig(out=str(out), tiny=True, seed=9, classes=("Bass", "Drums"))
    (out / "manifest.json").write_text(json.dumps(_manifest(old, 4, 1)))
    new = EvalConfig(out=str(out), tiny=True, seed=1, classes=("Bass", "Drums"))
    check_manifest(out, new, 4, 1)
    assert json.loads((out / "manifest.json").read_text())["identity"]["seed"] == 1
    # ... but never once a record exists
    (out / "records.jsonl").write_text('{"id": "bass-0000"}\n')
    from aiba.errors import AibaError

    with pytest.raises(AibaError, match="other settings"):
        check_manifest(out, old, 4, 1)


def test_second_writer_is_refused_with_the_holder(finished_run, capsys):
    import socket

    from aiba.runs.lock import RunLock

    before = tree_hashes(finished_run)
    with RunLock(finished_run, what="aiba eval"):
        code, _, err = run_cli(["eval", *RUN_ARGS, "--out", finished_run], capsys)
        line = assert_one_error_line(err, f"pid {os.getpid()} on host {socket.gethostname()}")
        assert "in use by aiba eval" in line and "started" in line
        assert code == LOCKED
        code, _, err = run_cli(["report", finished_run], capsys)
        assert code == LOCKED
    assert tree_hashes(finished_run) == {k: v for k, v in before.items()}


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    """A killed holder's lock (flock released by the OS) does not block the next run."""
    from aiba.runs.lock import RunLock

    code = ("import sys, os; sys.path[:0] = sys.argv[2:]; from aiba.runs.lock import RunLock; "
            "RunLock(sys.argv[1], what='aiba eval').acquire(); os.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)] + sys.path, capture_output=True)
    assert r.returncode == -9
    assert '"pid"' in (tmp_path / ".aiba.lock").read_text()  # the dead holder's note is still there
    with RunLock(tmp_path, what="aiba eval"):
        assert json.loads((tmp_path / ".aiba.lock").read_text())["pid"] == os.getpid()


def test_stale_temporaries_of_a_dead_writer_are_removed(tmp_path):
    from aiba.atomic import remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [tmp_path / f".bass-0000.{dead}.tmp.npz", tmp_path / f".table1.{dead}.tmp.csv"]
    live = [tmp_path / f".table1.{os.getpid()}.tmp.csv", tmp_path / f".table3.{os.getppid()}.tmp.md"]
    other = [tmp_path / "table1.csv", tmp_path / f".notes.{dead}.txt"]
    for p in stale + live + other:
        p.write_text("x")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in live + other) and not any(p.exists() for p in stale)


def test_ctrl_c_is_one_line(monkeypatch, tmp_path, capsys):
    import aiba.tools.eval as ev

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "run_eval", interrupted)
    code, _, err = run_cli(["eval", *RUN_ARGS, "--out", tmp_path / "r"], capsys)
    assert code == INTERRUPTED
    assert_one_error_line(err, "interrupted")


@pytest.mark.parametrize("err_no, fragment", [(errno.ENOSPC, "No space left on device"),
                                              (errno.EROFS, "read-only"), (errno.EACCES, "Permission denied")])
def test_io_faults_are_one_line(monkeypatch, tmp_path, capsys, err_no, fragment):
    """An OSError from the file system (disk full, read-only, permissions) mid-run."""
    import aiba.atomic as atomic

    real = atomic.atomic_write

    def failing(path, data):
        if str(path).endswith("table1.csv"):
            raise OSError(err_no, os.strerror(err_no), str(path))
        return real(path, data)

    import aiba.tools.report as rep

    monkeypatch.setattr(atomic, "atomic_write", failing)
    run = tmp_path / "r"
    code, _, err = run_cli(["eval", *RUN_ARGS, "--out", run], capsys)
    assert code == IO
    line = assert_one_error_line(err, fragment)
    assert "table1.csv" in line
    assert (run / "records.jsonl").read_text().count("\n") == 2  # the samples are kept; a rerun resumes
    monkeypatch.setattr(atomic, "atomic_write", real)
    assert rep is not None
    code, _, err = run_cli(["eval", *RUN_ARGS, "--out", run], capsys)
    assert code == 0 and (run / "table1.csv").is_file()


def test_real_bug_keeps_its_traceback(monkeypatch, tmp_path):
    import aiba.tools.eval as ev

    def bug(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(ev, "run_eval", bug)
    with pytest.raises(ZeroDivisionError):
        main(["eval", *RUN_ARGS, "--out", str(tmp_path / "r")])


def test_debug_shows_the_traceback(tmp_path):
    from aiba.errors import AibaError

    with pytest.raises(AibaError, match="--steps"):
        main(["--debug", "eval", *RUN_ARGS, "--out", str(tmp_path / "r"), "--steps", "0"])


def test_exit_codes_are_documented(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, code in EXIT_CODES.items():
        assert re.search(rf"^\s*{code} {name}\s", out, re.M), out


def test_offline_real_checkpoint_names_model_cache_and_fetch(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-m", "aiba", "eval", "--out", str(tmp_path / "r"), "--classes",
                        "bass,drums", "--steps", "1", "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == MISSING, r.stderr
    line = assert_one_error_line(r.stderr, "cvssp/audioldm2-music")
    assert str(tmp_path / "cache") in line and "huggingface-cli download cvssp/audioldm2-music" in line
    assert r.stdout == ""
    assert not (tmp_path / "r" / "manifest.json").exists()  # the model is loaded before the manifest is written


@pytest.mark.parametrize("backend, freq", [("stable-audio", False), ("audioldm2", True),
                                           ("stable-audio-diffusers", False)])
def test_diagnose_json_is_clean(backend, freq):
    """stable-audio-tools prints 'No module named flash_attn' when imported, libraries log and
    draw progress bars: none of it reaches stdout, which holds the JSON alone."""
    if backend == "stable-audio":
        pytest.importorskip("stable_audio_tools")
    r = subprocess.run([sys.executable, "-m", "aiba", "diagnose", "--backend", backend, "--tiny", "--json",
                        "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)  # what `| python -m json.tool` and `| jq` need
    assert d["exposes_cross_attention"] is True and d["frequency_resolved"] is freq
    assert "WARNING[XFORMERS]" not in r.stderr and "FutureWarning" not in r.stderr


def test_ctrl_c_mid_run_keeps_records_and_resumes(tmp_path):
    """A real SIGINT while samples are generated: one line, status 130, every written record
    kept, and the same command finishes the run."""
    import signal
    import time

    run = tmp_path / "r"
    args = [sys.executable, "-m", "aiba", "eval", *RUN_ARGS, "--out", str(run), "--samples-per-class", "3"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rec = run / "records.jsonl"
    t0 = time.time()
    while not (rec.is_file() and rec.read_text().count("\n") >= 1) and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    if p.poll() is not None:
        pytest.skip("the run finished before it could be interrupted")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert p.returncode == INTERRUPTED, err
    assert_one_error_line(err, "interrupted")
    kept = [json.loads(x)["id"] for x in rec.read_text().splitlines()]
    assert kept and len(kept) == len(set(kept))
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ids = [json.loads(x)["id"] for x in rec.read_text().splitlines()]
    assert ids[:len(kept)] == kept and len(ids) == len(set(ids)) == 6


def test_make_dataset_disk_full_is_one_line(tmp_path, monkeypatch, capsys):
    """libsndfile reports a full disk as "System error." (no errno): the line says what failed
    and where, the track is not left half-written, and complete tracks are kept."""
    sf = pytest.importorskip("soundfile")
    import shutil

    from aiba.data import render

    out = tmp_path / "ds"
    assert main(["make-dataset", str(out), "--tracks", "1", "--seconds", "1", "--synth", "sine", "-q"]) == 0
    capsys.readouterr()
    before = tree_hashes(out)

    def full(*a, **k):
        raise sf.LibsndfileError(2, "Error opening 'S01.flac': ")

    monkeypatch.setattr(sf, "write", full)
    monkeypatch.setattr(render.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100 << 30, 100 << 30, 0))
    code, _, err = run_cli(["make-dataset", out, "--tracks", "2", "--seconds", "1", "--synth", "sine", "-q"], capsys)
    assert code == IO
    line = assert_one_error_line(err, "No space left on device")
    assert "System error" in line and ".Track00002.partial" in line
    assert tree_hashes(out) == before and not list(out.rglob(".Track*"))


def test_single_class_skips_the_shuffled_baseline_with_a_note(tmp_path, capsys):
    run = tmp_path / "one"
    code, out, err = run_cli(["eval", *RUN_ARGS, "--out", run, "--classes", "bass", "--samples-per-class", "2"],
                             capsys)
    assert code == 0, err
    assert "shuffled null baseline skipped" in err
    info = json.loads((run / "tables.json").read_text())
    assert any("shuffled" in n for n in info["notes"])
    assert set(info["table1"]["null"]) == {"uniform"}
    assert "shuffled" not in (run / "table1.md").read_text() and "nan" not in (run / "table1.md").read_text()


def test_runs_written_before_the_device_checks_still_report(finished_run, tmp_path, capsys):
    """Older versions stored --device/--dtype of a --tiny run (ignored then) and dtype names
    such as 'half': reading such a manifest back (report, merge) is not refused; only a run
    about to start checks them."""
    import shutil

    run = tmp_path / "old"
    shutil.copytree(finished_run, run)
    (run / ".aiba.lock").unlink(missing_ok=True)
    m = json.loads((run / "manifest.json").read_text())
    m["config"].update(device="cuda", dtype="half")
    (run / "manifest.json").write_text(json.dumps(m))
    code, out, err = run_cli(["report", run, "--no-figures", "--n-boot", "10"], capsys)
    assert code == 0, err
    assert "Traceback" not in err and (run / "table1.md").is_file()
