"""The offline mini-Slakh renderer: layout, schema, determinism, resume, bands on rendered audio."""

import argparse
import hashlib

import numpy as np
import pytest
import soundfile as sf
import yaml

from aiba import AibaError
from aiba.align.audio import grid_row_hz, mel_grid
from aiba.data import render
from aiba.data.slakh import PAPER_CLASSES, SlakhDataset

TOP_KEYS = {"UUID", "audio_dir", "lmd_midi_dir", "midi_dir", "normalization_factor", "normalized",
            "overall_gain", "stems", "target_peak"}
STEM_KEYS = {"audio_rendered", "inst_class", "integrated_loudness", "is_drum", "midi_program_name",
             "midi_saved", "plugin_name", "program_num"}


def digest(path):
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_layout_and_metadata_schema(mini_slakh):
    tracks = sorted((mini_slakh / "train").iterdir())
    assert [t.name for t in tracks] == ["Track00001", "Track00002"]
    for t in tracks:
        meta = yaml.safe_load((t / "metadata.yaml").read_text())
        assert set(meta) == TOP_KEYS
        assert all(set(s) == STEM_KEYS for s in meta["stems"].values())
        for sid in meta["stems"]:
            assert (t / "stems" / f"{sid}.flac").is_file() and (t / "MIDI" / f"{sid}.mid").is_file()
        assert (t / "mix.flac").is_file() and (t / "all_src.mid").is_file()
        info = sf.info(str(t / "mix.flac"))
        assert (info.samplerate, info.channels, info.frames) == (16000, 1, 48000)
        assert meta["stems"]["S02"]["is_drum"] and meta["stems"]["S02"]["program_num"] == 128


def test_reader_reads_the_rendered_tree(mini_slakh):
    ds = SlakhDataset(mini_slakh)
    assert len(ds) == 2 and all(t.split == "train" for t in ds)
    assert ds.class_counts() == {c: 2 for c in PAPER_CLASSES}
    stems = ds.stems()
    assert len(stems) == 12 and not ds.problems
    # stems sum to the mix (same normalisation factor), up to 16-bit quantisation
    t = ds.tracks[0]
    total = sum(s.load_audio() for s in t.stems)
    mix = sf.read(str(t.mix_path))[0]
    assert np.max(np.abs(total - mix)) < 1e-3
    assert 0.85 < np.abs(mix).max() < 0.9  # -1 dBFS peak = 0.891


def profile(stem):
    g = mel_grid(stem.load_audio(16000))  # (128, 64) energy
    p = g.sum(0)
    return p / p.sum()


def test_rendered_stems_land_in_their_bands(mini_slakh):
    hz = grid_row_hz(64)
    ds = SlakhDataset(mini_slakh)
    for t in ds:
        prof = {s.paper_class: profile(s) for s in t.stems}
        median = {c: hz[np.searchsorted(np.cumsum(p), 0.5)] for c, p in prof.items()}  # 50 % energy
        assert prof["Bass"][hz < 250].sum() > 0.6, t.name  # bass energy mostly below 250 Hz
        assert median["Bass"] < 250, t.name
        assert prof["Strings"][hz < 250].sum() < 0.05, t.name  # strings voiced high
        for high in ("Guitars", "Piano", "Strings"):
            assert median[high] > median["Bass"], (t.name, high, median)
        assert median["Strings"] > 500, t.name
        # drums are broadband: energy both below 150 Hz (kick) and above 2 kHz (hats)
        assert prof["Drums"][hz < 150].sum() > 0.2 and prof["Drums"][hz > 2000].sum() > 1e-3


def test_deterministic_and_resumes(mini_slakh, tmp_path):
    cfg = render.RenderConfig(tracks=1, seconds=3.0, seed=0, synth="fluidsynth")
    render.make_dataset(tmp_path, cfg, progress=False)
    a, b = tmp_path / "train" / "Track00001", mini_slakh / "train" / "Track00001"
    for rel in ("metadata.yaml", "stems/S01.flac", "MIDI/S03.mid", "all_src.mid"):
        assert digest(a / rel) == digest(b / rel), rel
    # resume: complete tracks are not touched, missing ones are written
    before = (a / "mix.flac").stat().st_mtime_ns
    render.make_dataset(tmp_path, render.RenderConfig(tracks=2, seconds=3.0, seed=0, synth="fluidsynth"),
                        progress=False)
    assert (a / "mix.flac").stat().st_mtime_ns == before
    assert digest(tmp_path / "train" / "Track00002" / "stems" / "S04.flac") == \
        digest(mini_slakh / "train" / "Track00002" / "stems" / "S04.flac")
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left behind
    # an incomplete track is rendered again
    (a / "stems" / "S05.flac").unlink()
    with pytest.warns(UserWarning, match="incomplete"):
        render.make_dataset(tmp_path, cfg, progress=False)
    assert digest(a / "stems" / "S05.flac") == digest(b / "stems" / "S05.flac")
    # other settings in the same folder are refused
    with pytest.raises(AibaError, match="other settings"):
        render.make_dataset(tmp_path, render.RenderConfig(tracks=1, seconds=3.0, seed=1), progress=False)


def test_other_seed_differs_and_sine_fallback_is_labelled(tmp_path):
    cfg = render.RenderConfig(tracks=1, seconds=1.0, seed=3, synth="sine")
    with pytest.warns(UserWarning, match="SINE"):
        render.make_dataset(tmp_path, render.RenderConfig(tracks=1, seconds=1.0, seed=3, synth="auto",
                                                          soundfont=str(tmp_path / "missing.sf2")),
                            progress=False)
    meta = yaml.safe_load((tmp_path / "train" / "Track00001" / "metadata.yaml").read_text())
    assert {s["plugin_name"] for s in meta["stems"].values()} == {"sine-fallback"}
    assert render.RenderConfig(seed=3) != cfg
    m1 = render.generate_track(np.random.default_rng([3, 1]), 2.0)
    m2 = render.generate_track(np.random.default_rng([4, 1]), 2.0)
    assert [n.pitch for n in m1.instruments[0].notes] != [n.pitch for n in m2.instruments[0].notes] or \
        m1.get_tempo_changes()[1][0] != m2.get_tempo_changes()[1][0]


def test_generated_parts_have_plausible_registers():
    pm = render.generate_track(np.random.default_rng([0, 7]), 8.0)
    parts = {i.name: i for i in pm.instruments}
    assert set(parts) == set(PAPER_CLASSES)
    assert parts["Drums"].is_drum and not any(parts[c].is_drum for c in PAPER_CLASSES if c != "Drums")
    for cls, spec in render.PART_SPECS.items():
        pitches = [n.pitch for n in parts[cls].notes]
        assert pitches and spec["low"] <= min(pitches) and max(pitches) <= spec["high"], cls
        assert parts[cls].program in spec["programs"]
        assert max(n.end for n in parts[cls].notes) <= 8.0


def test_cli_make_dataset(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="aiba")
    render.register(parser.add_subparsers())
    args = parser.parse_args(["make-dataset", str(tmp_path / "ds"), "--tracks", "1", "--seconds", "1",
                              "--seed", "5", "--sr", "16000", "-q", "--synth", "sine"])
    assert args.func(args) == 0  # an explicit --synth sine does not warn
    assert "1 tracks" in capsys.readouterr().out
    assert len(SlakhDataset(tmp_path / "ds").stems()) == 6
    with pytest.raises(AibaError, match="tracks must be"):
        render.RenderConfig(tracks=0)


def test_cli_main_registers_make_dataset(tmp_path, capsys, monkeypatch):
    from aiba import cli

    assert "aiba.data.render" in cli.COMMANDS
    monkeypatch.setattr(cli, "COMMANDS", ["aiba.data.render"])  # only this module's command
    out = str(tmp_path / "ds")
    assert cli.main(["make-dataset", out, "--tracks", "1", "--seconds", "1", "-q", "--synth", "sine"]) == 0
    assert cli.main(["make-dataset", out, "--tracks", "1", "--seconds", "1", "-q", "--seed", "9",
                     "--synth", "sine"]) == 3  # EXIT_CODES["input"]
    assert "other settings" in capsys.readouterr().err


def test_stem_check_refuses_what_is_not_audio():
    """Silence, the +-1 clicks FluidSynth gives without a usable soundfont, and a lone burst
    are refused; a rendered note and the sine fallback's noise drums pass."""
    sr = 16000
    t = np.arange(sr * 2) / sr
    rng = np.random.default_rng(0)
    clicks = np.where(rng.random(t.size) < 0.25, rng.choice([-1.0, 1.0], t.size), 0.0)
    burst = np.zeros(t.size)
    burst[:400] = np.sin(2 * np.pi * 440 * t[:400])
    for bad, match in ((np.zeros(t.size), "silence"), (clicks, "distinct levels"), (burst, "frames")):
        with pytest.raises(AibaError, match=match):
            render.check_stem_audio(bad, sr, "S01")
    note = np.sin(2 * np.pi * 110 * t) * np.exp(-t)
    render.check_stem_audio(note, sr, "S01")
    noise_hits = np.zeros(t.size)
    for start in range(0, t.size - 2400, 4000):
        noise_hits[start:start + 2400] = rng.standard_normal(2400) * np.exp(-np.arange(2400) / 480)
    render.check_stem_audio(noise_hits, sr, "S02")


def test_soundfont_fluidsynth_cannot_load_is_refused(tmp_path):
    pytest.importorskip("fluidsynth")
    if not render.fluidsynth_available():
        pytest.skip("libfluidsynth missing")
    text = tmp_path / "a.sf2"
    text.write_text("not a soundfont\n")
    fake = tmp_path / "b.sf2"
    fake.write_bytes(b"RIFF\x10\x00\x00\x00sfbkLIST" + bytes(64))
    for sf2, match in ((text, "not a SoundFont 2 file"), (fake, "FluidSynth cannot load it")):
        with pytest.raises(AibaError, match=match):
            render.make_dataset(tmp_path / "ds", render.RenderConfig(tracks=1, seconds=1.0, soundfont=str(sf2),
                                                                     synth="fluidsynth"), progress=False)
    assert not any((tmp_path / "ds").glob("*/Track*"))
    render.check_soundfont(render.default_soundfont())  # the bundled GM soundfont loads


def test_partial_track_of_a_dead_writer_is_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / "train" / f".Track00007.partial-{dead}"
    (stale / "stems").mkdir(parents=True)
    (stale / "stems" / "S01.flac").write_bytes(b"half")
    render.make_dataset(tmp_path, render.RenderConfig(tracks=1, seconds=1.0, synth="sine"), progress=False)
    assert not stale.exists() and (tmp_path / "train" / "Track00001" / "metadata.yaml").is_file()
