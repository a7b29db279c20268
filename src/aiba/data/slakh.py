"""Read Slakh2100 trees: tracks, stems and their classes (AIBA Sec. 3; Manilow et al. 2019).

Supported layouts, found automatically under ``root``:
- split folders ``{train,validation,test,omitted}/TrackXXXXX`` (slakh2100_flac, the
  ``redux`` release, and the offline mini-Slakh written by ``aiba make-dataset``);
- a flat folder of ``TrackXXXXX`` (babyslakh_16k, or a split folder itself); the split is
  then inferred from the original numbering (train 1-1500, validation 1501-1875, test
  1876-2100) unless ``splits`` says otherwise;
- any re-split (e.g. "split2"): pass ``splits={"train": [...], ...}`` or a YAML/JSON file
  mapping split names to track names.

Each track's ``metadata.yaml`` lists its stems (``S01``...) with ``inst_class``,
``program_num``, ``is_drum``. Stem audio is ``stems/Sxx.flac`` (or ``.wav`` in
babyslakh_16k); its presence is checked on disk, ``audio_rendered`` is not trusted.
Missing or unreadable files raise :class:`AibaError` naming the track and stem, or, with
``on_missing="warn"``, are reported with a warning and left out of :meth:`stems` (they stay
listed in :attr:`SlakhDataset.problems`): nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AibaError, AibaWarning

__all__ = [
    "PAPER_CLASSES",
    "SLAKH_TO_PAPER",
    "GM_CLASS_RANGES",
    "inst_class_for_program",
    "Stem",
    "Track",
    "SlakhDataset",
    "read_track",
    "ORIG_SPLIT_RANGES",
]

# The paper's six instrument classes (Sec. 3, Table 3).
PAPER_CLASSES = ("Bass", "Drums", "Guitars", "Piano", "Strings", "Organ")

# Slakh ``inst_class`` -> paper class. Slakh groups GM programs 40-47 as "Strings" and
# 48-55 (ensembles, synth strings, choir) as "Strings (continued)"; both count as Strings.
# Classes not listed (Brass, Reed, Synth Pad, ...) map to None: read, but not one of the six.
# Override with ``SlakhDataset(..., class_map={...})``.
SLAKH_TO_PAPER = {
    "Bass": "Bass",
    "Drums": "Drums",
    "Guitar": "Guitars",
    "Piano": "Piano",
    "Strings": "Strings",
    "Strings (continued)": "Strings",
    "Organ": "Organ",
}

# Slakh's inst_class by 0-based General MIDI program (Slakh2100's metadata); 128 = drums.
GM_CLASS_RANGES = (
    (0, 7, "Piano"), (8, 15, "Chromatic Percussion"), (16, 23, "Organ"), (24, 31, "Guitar"),
    (32, 39, "Bass"), (40, 47, "Strings"), (48, 55, "Strings (continued)"), (56, 63, "Brass"),
    (64, 71, "Reed"), (72, 79, "Pipe"), (80, 87, "Synth Lead"), (88, 95, "Synth Pad"),
    (96, 103, "Sound Effects"), (104, 111, "Ethnic"), (112, 118, "Percussive"),
    (119, 127, "Sound effects"), (128, 128, "Drums"),
)

ORIG_SPLIT_RANGES = {"train": (1, 1500), "validation": (1501, 1875), "test": (1876, 2100)}
SPLIT_DIRS = ("train", "validation", "test", "omitted")
AUDIO_EXTS = (".flac", ".wav")
_TRACK_RE = re.compile(r"^Track(\d+)$")


def inst_class_for_program(program: int, is_drum: bool = False) -> str:
    """Slakh ``inst_class`` of a 0-based GM program (drums: ``is_drum`` or program 128)."""
    if is_drum or program == 128:
        return "Drums"
    for lo, hi, name in GM_CLASS_RANGES:
        if lo <= program <= hi:
            return name
    raise AibaError(f"GM program must be in 0..128, got {program}")


@dataclass(frozen=True)
class Stem:
    """One source of a track, as listed in metadata.yaml and found on disk."""

    track: str  # e.g. "Track00001"
    stem_id: str  # e.g. "S01"
    inst_class: str  # Slakh's class name
    program: int  # 0-based GM program (128 for drums)
    is_drum: bool
    paper_class: str | None  # one of PAPER_CLASSES, or None
    audio_path: Path | None  # None when the file is missing
    midi_path: Path | None
    midi_program_name: str = ""
    plugin_name: str = ""

    @property
    def name(self) -> str:
        """``Track00001/S01``: how errors and tables name the stem."""
        return f"{self.track}/{self.stem_id}"

    def load_audio(self, sr: int | None = 16000):
        """Mono float32 audio at ``sr`` (AibaError naming the stem when missing or corrupt)."""
        from ..align.audio import load_audio

        if self.audio_path is None:
            raise AibaError(f"{self.name}: stem audio missing (no stems/{self.stem_id}.flac or .wav)")
        return load_audio(self.audio_path, sr, what=f"{self.name} ({self.inst_class})")


@dataclass(frozen=True)
class Track:
    """A Slakh track folder."""

    name: str
    path: Path
    split: str | None
    stems: tuple[Stem, ...]
    mix_path: Path | None
    all_src_midi: Path | None
    metadata: dict = field(repr=False, compare=False, default_factory=dict)

    def stem(self, stem_id: str) -> Stem:
        for s in self.stems:
            if s.stem_id == stem_id:
                return s
        raise AibaError(f"{self.name}: no stem {stem_id!r}; has {[s.stem_id for s in self.stems]}")


def _find_audio(folder: Path, stem: str) -> Path | None:
    for ext in AUDIO_EXTS:
        p = folder / f"{stem}{ext}"
        if p.is_file() and p.stat().st_size > 0:
            return p
    return None


def _check_audio(path: Path, what: str) -> str | None:
    """None if soundfile can read the header, else the reason."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as e:
        return f"{what}: cannot decode {path}: {e}"
    if info.frames == 0:
        return f"{what}: empty audio file {path}"
    return None


def read_track(track_dir, split: str | None = None, class_map: dict | None = None,
               verify_audio: bool = False) -> tuple[Track, list[str]]:
    """Read one track folder; returns the track and a list of problems (missing/corrupt files).

    Raises AibaError when metadata.yaml is missing or malformed (then nothing of the track
    is usable).
    """
    import yaml

    track_dir = Path(track_dir)
    name = track_dir.name
    meta_path = track_dir / "metadata.yaml"
    if not meta_path.is_file():
        raise AibaError(f"{name}: metadata.yaml not found in {track_dir}")
    try:
        meta = yaml.safe_load(meta_path.read_text())
    except Exception as e:
        raise AibaError(f"{name}: cannot parse {meta_path}: {e}") from None
    if not isinstance(meta, dict):
        raise AibaError(f"{name}: {meta_path} must be a mapping with 'stems:', got a {type(meta).__name__} "
                        f"({str(meta)[:60]!r})")
    if not isinstance(meta.get("stems"), dict):
        raise AibaError(f"{name}: metadata.yaml has no 'stems' mapping (keys: {list(meta)})")
    cmap = SLAKH_TO_PAPER if class_map is None else class_map
    audio_dir = track_dir / str(meta.get("audio_dir") or "stems")
    midi_dir = track_dir / str(meta.get("midi_dir") or "MIDI")
    stems, problems = [], []
    for sid in sorted(meta["stems"]):
        info = meta["stems"][sid] or {}
        what = f"{name}/{sid}"
        try:
            is_drum = bool(info.get("is_drum", False))
            program = int(info.get("program_num", 128 if is_drum else -1))
            inst_class = info.get("inst_class") or inst_class_for_program(program, is_drum)
        except (TypeError, ValueError, AibaError) as e:
            raise AibaError(f"{what}: bad stem entry in metadata.yaml ({info}): {e}") from None
        audio = _find_audio(audio_dir, sid)
        if audio is None:
            problems.append(f"{what} ({inst_class}): stem audio missing in {audio_dir}")
        elif verify_audio:
            bad = _check_audio(audio, f"{what} ({inst_class})")
            if bad:
                problems.append(bad)
                audio = None
        midi = midi_dir / f"{sid}.mid"
        stems.append(Stem(
            track=name, stem_id=sid, inst_class=inst_class, program=program, is_drum=is_drum,
            paper_class=cmap.get(inst_class), audio_path=audio,
            midi_path=midi if midi.is_file() else None,
            midi_program_name=str(info.get("midi_program_name", "")),
            plugin_name=str(info.get("plugin_name", "")),
        ))
    mix = _find_audio(track_dir, "mix")
    src = track_dir / "all_src.mid"
    return Track(name, track_dir, split, tuple(stems), mix, src if src.is_file() else None, meta), problems


def _orig_split(name: str) -> str | None:
    m = _TRACK_RE.match(name)
    if not m:
        return None
    n = int(m.group(1))
    for split, (lo, hi) in ORIG_SPLIT_RANGES.items():
        if lo <= n <= hi:
            return split
    return None


def _load_splits(splits) -> dict[str, str]:
    """{track name: split} from a mapping split -> names, or a YAML/JSON file of one."""
    if splits is None:
        return {}
    if isinstance(splits, (str, Path)):
        import yaml

        p = Path(splits)
        if not p.is_file():
            raise AibaError(f"splits file not found: {p}")
        text = p.read_text()
        splits = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(splits, dict):
        raise AibaError(f"splits must map split names to track lists, got {type(splits).__name__}")
    out = {}
    for split, names in splits.items():
        for n in names:
            out[str(n)] = str(split)
    return out


class SlakhDataset:
    """A Slakh2100-layout tree (see the module docstring for the layouts).

    ``split``: keep only tracks of that split (None: all). ``on_missing``: ``"error"``
    raises on the first missing/corrupt stem file, naming track and stem; ``"warn"`` warns
    once per problem and leaves the stem out of :meth:`stems`. ``verify_audio`` opens each
    audio header (slower; catches corrupt files at load time rather than on first read).
    """

    def __init__(self, root, split: str | None = None, *, on_missing: str = "error",
                 class_map: dict | None = None, splits=None, verify_audio: bool = False):
        if on_missing not in ("error", "warn"):
            raise AibaError(f"on_missing must be 'error' or 'warn', got {on_missing!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise AibaError(f"Slakh root not found: {self.root}")
        self.on_missing = on_missing
        self.class_map = dict(SLAKH_TO_PAPER if class_map is None else class_map)
        self.problems: list[str] = []
        overrides = _load_splits(splits)
        tracks = []
        for tdir, folder_split in self._discover():
            tsplit = overrides.get(tdir.name, folder_split or _orig_split(tdir.name))
            if split is not None and tsplit != split:
                continue
            track, problems = read_track(tdir, tsplit, self.class_map, verify_audio)
            for msg in problems:
                if on_missing == "error":
                    raise AibaError(msg + " (pass on_missing='warn' to skip it)")
                warnings.warn(msg + "; skipped", AibaWarning, stacklevel=2)
            self.problems.extend(problems)
            tracks.append(track)
        self.tracks: list[Track] = tracks

    def _discover(self):
        """(track dir, split from its folder or None), sorted by split then name."""
        found = []
        for sd in SPLIT_DIRS:
            d = self.root / sd
            if d.is_dir():
                found += [(p, sd) for p in sorted(d.iterdir()) if p.is_dir() and _TRACK_RE.match(p.name)]
        flat = [(p, None) for p in sorted(self.root.iterdir()) if p.is_dir() and _TRACK_RE.match(p.name)]
        if _TRACK_RE.match(self.root.name) and (self.root / "metadata.yaml").is_file():
            flat.append((self.root, None))  # the root is itself a track
        found += flat
        if not found:
            raise AibaError(
                f"no TrackXXXXX folders under {self.root} (looked in {', '.join(SPLIT_DIRS)} and the root)"
            )
        return found

    def __len__(self) -> int:
        return len(self.tracks)

    def __iter__(self):
        return iter(self.tracks)

    def __getitem__(self, name: str) -> Track:
        for t in self.tracks:
            if t.name == name:
                return t
        raise AibaError(f"no track {name!r} under {self.root}")

    def stems(self, classes=PAPER_CLASSES, require_audio: bool = True) -> list[Stem]:
        """Stems whose paper class is in ``classes`` (None: every stem), with audio present."""
        keep = None if classes is None else set(classes)
        out = []
        for t in self.tracks:
            for s in t.stems:
                if keep is not None and s.paper_class not in keep:
                    continue
                if require_audio and s.audio_path is None:
                    continue  # already reported in self.problems (or raised)
                out.append(s)
        return out

    def class_counts(self) -> dict:
        """Stems per paper class (None: not one of the six), audio present or not."""
        counts: dict = {}
        for t in self.tracks:
            for s in t.stems:
                counts[s.paper_class] = counts.get(s.paper_class, 0) + 1
        return counts
