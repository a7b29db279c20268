"""Offline mini-Slakh: generated multi-instrument tracks rendered with a GM soundfont.

``aiba make-dataset OUT --tracks N`` writes a tree that :class:`aiba.data.slakh.SlakhDataset`
reads like the real Slakh2100 (Manilow et al. 2019; schema in :mod:`aiba.data.slakh`)::

    OUT/mini_slakh.yaml                        generator settings (checked on resume)
    OUT/{train,validation,test}/TrackXXXXX/
        metadata.yaml  all_src.mid  mix.flac  MIDI/Sxx.mid  stems/Sxx.flac

Music: every track has one part of each of the paper's six classes, generated from a seeded
random key, tempo and a common four-chord progression, with plausible registers (bass
E1-E2 roots, guitar arpeggios E3-C5, piano block chords around middle C, organ pads
C3-G4, strings voiced high C5-E6, a drum kit on MIDI channel 10). GM programs are drawn
per track from each class's range. Each part is rendered alone with FluidSynth and the
General MIDI soundfont pretty-midi ships (TimGM6mb.sf2), gain-staged to a random level,
summed to the mix, and mix and stems are scaled together to a -1 dBFS mix peak.

Deterministic for a seed: track ``i`` uses ``numpy.random.default_rng([seed, i])``, so a
resumed or partial run writes the same files. Writes are atomic: each track is built in a
hidden temporary folder and moved into place with ``os.replace``; complete tracks are
skipped on a rerun. Without FluidSynth the renderer falls back to pretty-midi's sine
synthesis (and noise drums) with a loud warning, recorded as ``plugin_name``.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, pid_alive
from ..errors import AibaError, AibaWarning
from .slakh import inst_class_for_program

__all__ = ["RenderConfig", "PART_SPECS", "generate_track", "render_track", "make_dataset",
           "default_soundfont", "fluidsynth_available", "register"]

SOUNDFONT_NAME = "TimGM6mb.sf2"
TARGET_PEAK_DB = -1.0


@dataclass(frozen=True)
class RenderConfig:
    """Settings of ``aiba make-dataset``; the folder's mini_slakh.yaml records them."""

    tracks: int = 10
    seconds: float = 10.0
    seed: int = 0
    sr: int = 16000
    soundfont: str | None = None  # None: pretty-midi's TimGM6mb.sf2
    synth: str = "auto"  # "auto" (FluidSynth, else sine with a warning), "fluidsynth", "sine"

    def __post_init__(self):
        from ..settings import integer, number

        integer("make-dataset --tracks", self.tracks, lo=1, hi=100_000)
        number("make-dataset --seconds", self.seconds, lo=0.5, hi=600)
        integer("make-dataset --seed", self.seed, lo=0)
        integer("make-dataset --sr", self.sr, lo=8000, hi=192_000)
        if self.synth not in ("auto", "fluidsynth", "sine"):
            raise AibaError(f"synth must be 'auto', 'fluidsynth' or 'sine', got {self.synth!r}")


# Per class: GM programs to draw from (0-based) and the MIDI note register of the part.
PART_SPECS = {
    "Bass": {"programs": (32, 33, 34, 35, 38), "low": 28, "high": 40},  # E1-E2
    "Drums": {"programs": (0,), "low": 35, "high": 57},  # GM percussion keys, channel 10
    "Guitars": {"programs": (24, 25, 26, 27), "low": 52, "high": 72},  # E3-C5
    "Piano": {"programs": (0, 1, 2, 4), "low": 55, "high": 76},  # G3-E5
    "Strings": {"programs": (40, 48, 49), "low": 72, "high": 88},  # C5-E6
    "Organ": {"programs": (16, 17, 19), "low": 48, "high": 67},  # C3-G4
}

# scale degree (semitones above the key) and chord quality
_PROGRESSIONS = (
    ((0, "maj"), (7, "maj"), (9, "min"), (5, "maj")),  # I V vi IV
    ((0, "maj"), (5, "maj"), (7, "maj"), (0, "maj")),  # I IV V I
    ((9, "min"), (5, "maj"), (0, "maj"), (7, "maj")),  # vi IV I V
    ((0, "maj"), (9, "min"), (5, "maj"), (7, "maj")),  # I vi IV V
    ((2, "min"), (7, "maj"), (0, "maj"), (0, "maj")),  # ii V I I
)
_TRIADS = {"maj": (0, 4, 7), "min": (0, 3, 7)}


def default_soundfont() -> Path:
    """The General MIDI soundfont bundled with pretty-midi."""
    import pretty_midi

    return Path(pretty_midi.__file__).parent / SOUNDFONT_NAME


def fluidsynth_available() -> bool:
    """True when pyfluidsynth imports and finds the FluidSynth shared library."""
    try:
        import fluidsynth  # noqa: F401
    except Exception:  # ImportError, or OSError when libfluidsynth is missing
        return False
    return True


def check_soundfont(path) -> None:
    """Raise AibaError unless FluidSynth loads ``path`` as a soundfont (SF2: a RIFF 'sfbk' file)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(12)
    except OSError as e:
        raise AibaError(f"soundfont {p}: cannot read it ({e.strerror})") from None
    if not (head[:4] == b"RIFF" and head[8:12] == b"sfbk"):
        raise AibaError(f"soundfont {p}: not a SoundFont 2 file (no RIFF 'sfbk' header); give a General MIDI .sf2")
    import fluidsynth

    synth = fluidsynth.Synth()
    try:
        if synth.sfload(str(p)) == -1:
            raise AibaError(f"soundfont {p}: FluidSynth cannot load it; give a valid General MIDI .sf2")
    finally:
        synth.delete()


def check_stem_audio(y: np.ndarray, sr: int, what: str) -> None:
    """Refuse a render that is not audio: silence, a few clicks, or a constant offset.

    Rendered parts play notes for much of the clip: at least 10% of its 50 ms frames must
    lie within 50 dB of its loudest frame, and its samples must take many distinct
    magnitudes (a FluidSynth without a usable soundfont gives a few levels of clicks).
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if not np.isfinite(peak):
        raise AibaError(f"{what}: the render holds NaN or inf samples; check the soundfont")
    if peak < 1e-5:
        raise AibaError(f"{what}: rendered silence (peak {peak:.1e}); check the soundfont and the synthesizer")
    hop = max(1, int(0.05 * sr))
    n = y.size // hop
    frames = y[: n * hop].reshape(n, hop) if n else y[None]
    rms = np.sqrt(np.mean(frames ** 2, axis=1))  # (frames,)
    active = float(np.mean(rms > rms.max() * 10 ** (-50 / 20)))
    levels = np.unique(np.round(np.abs(y[y != 0]) / peak, 6)).size  # distinct magnitudes
    if levels < 32:
        raise AibaError(f"{what}: the render is not audio (its samples take only {levels} distinct levels: "
                        "clicks or noise); check the soundfont is a General MIDI .sf2")
    if active < 0.1:
        raise AibaError(f"{what}: the render is not audio of notes (only {active:.0%} of its 50 ms frames within "
                        "50 dB of the loudest); check the soundfont is a General MIDI .sf2")


def _voice(pcs, low, high):
    """All MIDI notes in [low, high] whose pitch class is in pcs, ascending."""
    return [n for n in range(low, high + 1) if n % 12 in pcs]


def generate_track(rng: np.random.Generator, seconds: float):
    """A pretty_midi.PrettyMIDI with one instrument per paper class, named by class."""
    import pretty_midi

    bpm = float(rng.integers(90, 131))
    beat = 60.0 / bpm
    key = int(rng.integers(0, 12))
    prog = _PROGRESSIONS[int(rng.integers(len(_PROGRESSIONS)))]
    pm = pretty_midi.PrettyMIDI(initial_tempo=bpm)
    end = seconds - 0.05
    n_beats = int(np.floor(end / beat))
    insts = {}
    for cls, spec in PART_SPECS.items():
        program = int(rng.choice(spec["programs"]))
        inst = pretty_midi.Instrument(program=program, is_drum=cls == "Drums", name=cls)
        insts[cls] = inst
        pm.instruments.append(inst)

    def add(cls, pitch, start, dur, vel):
        stop = min(start + dur, end)
        if stop - start > 0.02:
            insts[cls].notes.append(pretty_midi.Note(int(vel), int(pitch), float(start), float(stop)))

    for b in range(n_beats):
        t = b * beat
        bar, pos = divmod(b, 4)
        degree, quality = prog[bar % len(prog)]
        root_pc = (key + degree) % 12
        pcs = {(root_pc + i) % 12 for i in _TRIADS[quality]}
        # Bass: the chord root in its low register, eighth notes, a fifth on beat 4
        bass_notes = _voice({root_pc}, PART_SPECS["Bass"]["low"], PART_SPECS["Bass"]["high"])
        bn = bass_notes[0]
        if pos == 3:
            bn = bn + 7 if bn + 7 <= PART_SPECS["Bass"]["high"] else bn - 5
        for h in (0, 0.5):
            add("Bass", bn, t + h * beat, 0.45 * beat, rng.integers(85, 111))
        # Drums: kick on 1 and 3, snare on 2 and 4, closed hi-hat eighths, crash on bar start
        add("Drums", 36 if pos in (0, 2) else 38, t, 0.1, rng.integers(90, 121))
        for h in (0, 0.5):
            add("Drums", 42, t + h * beat, 0.05, rng.integers(60, 91))
        if pos == 0 and bar % 2 == 0:
            add("Drums", 49, t, 0.2, 90)
        # Guitars: arpeggiated chord tones, eighth notes
        gt = _voice(pcs, PART_SPECS["Guitars"]["low"], PART_SPECS["Guitars"]["high"])
        for h in (0, 0.5):
            add("Guitars", gt[int(rng.integers(len(gt)))], t + h * beat, 0.5 * beat, rng.integers(70, 101))
        # Piano: block triads on beats 1 and 3
        if pos in (0, 2):
            pn = _voice(pcs, PART_SPECS["Piano"]["low"], PART_SPECS["Piano"]["high"])
            lo = int(rng.integers(0, max(1, len(pn) - 3)))
            for n in pn[lo:lo + 3]:
                add("Piano", n, t, 1.9 * beat, rng.integers(65, 96))
        # Organ and strings: sustained chords, one per bar
        if pos == 0:
            for cls in ("Organ", "Strings"):
                notes = _voice(pcs, PART_SPECS[cls]["low"], PART_SPECS[cls]["high"])
                for n in notes[:4] if cls == "Organ" else notes[-4:]:
                    add(cls, n, t, 4 * beat - 0.02, rng.integers(60, 91))
    return pm


def _sine_render(inst, sr: int) -> np.ndarray:
    """Fallback synthesis: pretty-midi sines for pitched parts, noise and thumps for drums."""
    if not inst.is_drum:
        return inst.synthesize(fs=sr)
    n = int(np.ceil((inst.get_end_time() + 0.5) * sr))
    out = np.zeros(n)
    rng = np.random.default_rng(0)
    for note in inst.notes:
        i = int(note.start * sr)
        k = np.arange(int(0.15 * sr))
        env = np.exp(-k / (0.03 * sr))
        if note.pitch in (35, 36):
            sig = np.sin(2 * np.pi * 60 * k / sr) * env
        else:
            sig = rng.standard_normal(k.size) * env * (0.3 if note.pitch == 42 else 0.6)
        j = min(n, i + k.size)
        out[i:j] += sig[: j - i] * note.velocity / 127
    return out


def _render_inst(inst, sr: int, soundfont: Path, synth: str) -> np.ndarray:
    if synth == "sine":
        return _sine_render(inst, sr)
    try:
        return inst.fluidsynth(fs=sr, synthesizer=str(soundfont))
    except TypeError:  # pretty-midi < 0.2.11
        return inst.fluidsynth(fs=sr, sf2_path=str(soundfont))


def _fit(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64).ravel()[:n]
    return np.pad(y, (0, n - y.size))


def _db(x: float) -> float:
    return float(20 * np.log10(max(x, 1e-12)))


def render_track(index: int, cfg: RenderConfig, dest: Path, synth: str) -> None:
    """Generate and render track ``index`` (1-based) into the folder ``dest`` (created)."""
    import pretty_midi
    import soundfile as sf
    import yaml

    rng = np.random.default_rng([cfg.seed, index])
    pm = generate_track(rng, cfg.seconds)
    soundfont = Path(cfg.soundfont) if cfg.soundfont else default_soundfont()
    n = int(round(cfg.seconds * cfg.sr))
    (dest / "stems").mkdir(parents=True)
    (dest / "MIDI").mkdir()
    stems, meta_stems = [], {}
    for k, inst in enumerate(pm.instruments):
        y = _fit(_render_inst(inst, cfg.sr, soundfont, synth), n)
        check_stem_audio(y, cfg.sr, f"Track{index:05d}/S{k + 1:02d} ({inst.name}, {synth})")
        rms = float(np.sqrt(np.mean(y ** 2)))
        level_db = float(rng.uniform(-24.0, -18.0))  # per-stem mix level (RMS dBFS)
        stems.append(y * 10 ** (level_db / 20) / rms)
    mix = np.sum(stems, axis=0)
    factor = 10 ** (TARGET_PEAK_DB / 20) / max(np.abs(mix).max(), 1e-12)
    plugin = soundfont.name if synth == "fluidsynth" else "sine-fallback"
    for k, (inst, y) in enumerate(zip(pm.instruments, stems)):
        sid = f"S{k + 1:02d}"
        y = y * factor
        sf.write(str(dest / "stems" / f"{sid}.flac"), y.astype(np.float32), cfg.sr, format="FLAC", subtype="PCM_16")
        single = pretty_midi.PrettyMIDI(initial_tempo=pm.get_tempo_changes()[1][0])
        single.instruments.append(inst)
        single.write(str(dest / "MIDI" / f"{sid}.mid"))
        program = 128 if inst.is_drum else inst.program
        meta_stems[sid] = {
            "audio_rendered": True,
            "inst_class": inst_class_for_program(program, inst.is_drum),
            "integrated_loudness": round(_db(float(np.sqrt(np.mean(y ** 2)))), 3),  # RMS dBFS, not BS.1770
            "is_drum": bool(inst.is_drum),
            "midi_program_name": "Drums" if inst.is_drum else pretty_midi.program_to_instrument_name(inst.program),
            "midi_saved": True,
            "plugin_name": plugin,
            "program_num": int(program),
        }
    sf.write(str(dest / "mix.flac"), (mix * factor).astype(np.float32), cfg.sr, format="FLAC", subtype="PCM_16")
    pm.write(str(dest / "all_src.mid"))
    meta = {
        "UUID": str(uuid.UUID(int=int(rng.integers(0, 2 ** 63)) << 64 | int(rng.integers(0, 2 ** 63)), version=4)),
        "audio_dir": "stems",
        "lmd_midi_dir": f"generated/seed{cfg.seed}/Track{index:05d}",
        "midi_dir": "MIDI",
        "normalization_factor": float(factor),
        "normalized": True,
        "overall_gain": 1.0,
        "stems": meta_stems,
        "target_peak": TARGET_PEAK_DB,
    }
    (dest / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=True))


def split_of(index: int) -> str:
    """Split of track ``index`` (1-based): 8 of every 10 train, then validation, test."""
    r = (index - 1) % 10
    return "train" if r < 8 else "validation" if r == 8 else "test"


def _complete(track_dir: Path) -> bool:
    import yaml

    meta = track_dir / "metadata.yaml"
    if not meta.is_file():
        return False
    try:
        stems = yaml.safe_load(meta.read_text())["stems"]
    except Exception:
        return False
    files = [track_dir / "mix.flac", track_dir / "all_src.mid"]
    files += [track_dir / "stems" / f"{s}.flac" for s in stems] + [track_dir / "MIDI" / f"{s}.mid" for s in stems]
    return all(f.is_file() and f.stat().st_size > 0 for f in files)


def _resolve_synth(cfg: RenderConfig) -> str:
    if cfg.synth == "sine":
        return "sine"
    sf2 = Path(cfg.soundfont) if cfg.soundfont else default_soundfont()
    if fluidsynth_available() and sf2.is_file():
        check_soundfont(sf2)
        return "fluidsynth"
    why = "pyfluidsynth/libfluidsynth not loadable" if not fluidsynth_available() else f"soundfont {sf2} not found"
    if cfg.synth == "fluidsynth":
        raise AibaError(f"FluidSynth rendering unavailable: {why} (apt-get install libfluidsynth3; pip install pyfluidsynth)")
    msg = (f"!!! FluidSynth rendering unavailable ({why}): falling back to SINE-WAVE synthesis. "
           "The stems will not sound like the instruments; install libfluidsynth3 and pyfluidsynth. !!!")
    print(msg, file=sys.stderr)
    warnings.warn(msg, AibaWarning, stacklevel=3)
    return "sine"


def make_dataset(out, cfg: RenderConfig, progress: bool = True) -> list[Path]:
    """Write (or complete) a mini-Slakh tree under ``out``; returns the track folders."""
    import yaml
    from tqdm import tqdm

    out = Path(out)
    synth = _resolve_synth(cfg)  # the soundfont is checked before anything is made
    record = {"generator": "aiba make-dataset", "synth": synth, **asdict(cfg)}
    record.pop("tracks")
    cfg_file = out / "mini_slakh.yaml"
    if cfg_file.is_file():
        old = yaml.safe_load(cfg_file.read_text()) or {}
        diff = {k: (old.get(k), v) for k, v in record.items() if old.get(k) != v}
        if diff:
            raise AibaError(f"{out} was written with other settings {diff} (old, new): use another folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(cfg_file, lambda p: p.write_text(yaml.safe_dump(record, sort_keys=True)))
    for partial in out.glob("*/.Track*.partial-*"):  # folders of a writer that died mid-track
        pid = partial.name.rsplit("-", 1)[-1]
        if partial.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)
    paths = []
    with tqdm(total=cfg.tracks, desc="make-dataset", unit="track", disable=not progress) as bar:
        for i in range(1, cfg.tracks + 1):
            dest = out / split_of(i) / f"Track{i:05d}"
            paths.append(dest)
            if _complete(dest):
                bar.update(1)
                continue
            if dest.exists():
                warnings.warn(f"{dest}: incomplete track, rendering it again", AibaWarning, stacklevel=2)
                shutil.rmtree(dest)
            tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
            if tmp.exists():
                shutil.rmtree(tmp)
            try:
                render_track(i, cfg, tmp, synth)
                os.replace(tmp, dest)
            except RuntimeError as e:  # libsndfile's write errors ("System error.") carry no errno
                if type(e).__name__ != "LibsndfileError":
                    raise
                free = shutil.disk_usage(out).free
                code = errno.ENOSPC if free < (64 << 20) else errno.EIO
                raise OSError(code, f"{os.strerror(code)} while writing audio (libsndfile: {e}; {free >> 20} MiB "
                              "free)", str(tmp)) from e
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
            bar.update(1)
    return paths


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AibaError(f"make-dataset {out}: is a file, not a folder; choose another output folder", kind="io")
    cfg = RenderConfig(tracks=args.tracks, seconds=args.seconds, seed=args.seed, sr=args.sr,
                       soundfont=args.soundfont, synth=args.synth)
    paths = make_dataset(args.out, cfg, progress=not args.quiet)
    print(f"{len(paths)} tracks in {args.out}")
    return 0


def register(subparsers) -> None:
    """Add ``aiba make-dataset``."""
    p = subparsers.add_parser(
        "make-dataset", help="render an offline mini-Slakh (Slakh2100 layout) from generated MIDI",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("out", help="output folder (created; complete tracks are kept)")
    p.add_argument("--tracks", type=int, required=True, help="number of tracks")
    p.add_argument("--seconds", type=float, default=10.0, help="track length (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--sr", type=int, default=16000, help="sample rate in Hz (default 16000)")
    p.add_argument("--soundfont", default=None, help="GM .sf2 file (default: pretty-midi's TimGM6mb.sf2)")
    p.add_argument("--synth", choices=("auto", "fluidsynth", "sine"), default="auto",
                   help="auto: FluidSynth, falling back to sine waves with a warning")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
