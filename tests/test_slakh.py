"""aiba.data.slakh on hand-written Slakh trees (orig/redux split folders, babyslakh flat WAV)."""

import numpy as np
import pytest
import soundfile as sf
import yaml

from aiba import AibaError, AibaWarning
from aiba.data.slakh import PAPER_CLASSES, SlakhDataset, inst_class_for_program, read_track

SR = 16000


def stem_meta(program, is_drum=False, rendered=True):
    return {
        "audio_rendered": rendered, "inst_class": inst_class_for_program(program, is_drum),
        "integrated_loudness": -20.0, "is_drum": is_drum, "midi_program_name": "x",
        "midi_saved": True, "plugin_name": "test.nkm", "program_num": 128 if is_drum else program,
    }


def write_track(folder, stems, ext=".flac", skip_audio=(), corrupt=()):
    """A Slakh track: stems = {"S01": (program, is_drum)}."""
    (folder / "stems").mkdir(parents=True)
    (folder / "MIDI").mkdir()
    meta = {"UUID": "0", "audio_dir": "stems", "lmd_midi_dir": "lmd", "midi_dir": "MIDI",
            "normalization_factor": 1.0, "normalized": True, "overall_gain": 1.0,
            "target_peak": -1.0, "stems": {}}
    y = 0.1 * np.sin(2 * np.pi * 440 * np.arange(SR // 4) / SR)
    for sid, (prog, drum) in stems.items():
        # audio_rendered claims False for S02 on purpose: presence on disk decides
        meta["stems"][sid] = stem_meta(prog, drum, rendered=sid != "S02")
        (folder / "MIDI" / f"{sid}.mid").write_bytes(b"MThd")
        p = folder / "stems" / f"{sid}{ext}"
        if sid in corrupt:
            p.write_bytes(b"not audio at all")
        elif sid not in skip_audio:
            sf.write(str(p), y, SR)
    sf.write(str(folder / f"mix{ext}"), y, SR)
    (folder / "metadata.yaml").write_text(yaml.safe_dump(meta))


SIX = {"S01": (33, False), "S02": (0, True), "S03": (25, False), "S04": (0, False),
       "S05": (48, False), "S06": (16, False), "S07": (56, False)}  # + a brass stem


def test_inst_class_table_matches_gm_ranges():
    assert inst_class_for_program(0) == "Piano"
    assert inst_class_for_program(39) == "Bass"
    assert inst_class_for_program(50) == "Strings (continued)"
    assert inst_class_for_program(12, is_drum=True) == "Drums"
    assert inst_class_for_program(128) == "Drums"
    with pytest.raises(AibaError, match="0..128"):
        inst_class_for_program(200)


def test_split_folder_layout_and_class_map(tmp_path):
    write_track(tmp_path / "train" / "Track00001", SIX)
    write_track(tmp_path / "test" / "Track01900", {"S01": (34, False)})
    write_track(tmp_path / "omitted" / "Track00005", {"S01": (34, False)})
    ds = SlakhDataset(tmp_path)
    assert [t.name for t in ds] == ["Track00001", "Track01900", "Track00005"]
    assert [t.split for t in ds] == ["train", "test", "omitted"]
    t = ds["Track00001"]
    assert {s.paper_class for s in t.stems} == set(PAPER_CLASSES) | {None}
    assert t.stem("S05").inst_class == "Strings (continued)" and t.stem("S05").paper_class == "Strings"
    assert t.stem("S02").audio_path is not None  # audio_rendered: False is not trusted
    assert t.stem("S02").is_drum and t.stem("S02").program == 128
    assert t.mix_path.name == "mix.flac" and t.stem("S01").midi_path.name == "S01.mid"
    assert len(ds.stems()) == 6 + 2  # the brass stem is read but not one of the six
    assert len(ds.stems(classes=None)) == 9
    assert ds.class_counts()[None] == 1
    assert [t.name for t in SlakhDataset(tmp_path, split="test")] == ["Track01900"]
    # overriding the class table: brass counted as its own class
    ds2 = SlakhDataset(tmp_path, class_map={"Brass": "Brass", "Bass": "Bass"})
    assert {s.paper_class for s in ds2.stems(classes=("Brass",))} == {"Brass"}
    assert ds2["Track00001"].stem("S03").paper_class is None


def test_flat_babyslakh_wav_layout_infers_orig_splits(tmp_path):
    write_track(tmp_path / "Track00001", {"S01": (33, False)}, ext=".wav")
    write_track(tmp_path / "Track01600", {"S01": (33, False)}, ext=".wav")
    ds = SlakhDataset(tmp_path)
    assert [(t.name, t.split) for t in ds] == [("Track00001", "train"), ("Track01600", "validation")]
    assert ds.stems()[0].audio_path.suffix == ".wav"
    y = ds.stems()[0].load_audio(8000)
    assert y.dtype == np.float32 and y.shape == (SR // 8,)  # 0.25 s at 8 kHz
    # a re-split file ("split2" style) overrides the numbering
    (tmp_path / "splits.yaml").write_text(yaml.safe_dump({"test": ["Track00001"]}))
    assert [t.name for t in SlakhDataset(tmp_path, split="test", splits=tmp_path / "splits.yaml")] == ["Track00001"]


def test_missing_stem_errors_naming_track_and_stem(tmp_path):
    write_track(tmp_path / "train" / "Track00003", SIX, skip_audio=("S04",))
    with pytest.raises(AibaError, match=r"Track00003/S04 \(Piano\).*missing"):
        SlakhDataset(tmp_path)
    with pytest.warns(AibaWarning, match="Track00003/S04"):
        ds = SlakhDataset(tmp_path, on_missing="warn")
    assert "Piano" not in {s.paper_class for s in ds.stems()}  # left out of stems() ...
    assert len(ds.problems) == 1 and "Track00003/S04" in ds.problems[0]  # ... but reported
    assert ds["Track00003"].stem("S04").audio_path is None


def test_corrupt_stem_detected(tmp_path):
    write_track(tmp_path / "train" / "Track00004", SIX, corrupt=("S01",))
    ds = SlakhDataset(tmp_path)  # header not checked: the error comes on load
    with pytest.raises(AibaError, match=r"Track00004/S01 \(Bass\).*cannot decode"):
        ds["Track00004"].stem("S01").load_audio()
    with pytest.raises(AibaError, match=r"Track00004/S01.*cannot decode"):
        SlakhDataset(tmp_path, verify_audio=True)
    with pytest.warns(AibaWarning, match="Track00004/S01"):
        ds = SlakhDataset(tmp_path, verify_audio=True, on_missing="warn")
    assert "Bass" not in {s.paper_class for s in ds.stems()}


def test_bad_trees_raise(tmp_path):
    with pytest.raises(AibaError, match="not found"):
        SlakhDataset(tmp_path / "nope")
    with pytest.raises(AibaError, match="no TrackXXXXX"):
        SlakhDataset(tmp_path)
    (tmp_path / "Track00009").mkdir()
    with pytest.raises(AibaError, match="Track00009: metadata.yaml not found"):
        SlakhDataset(tmp_path)
    (tmp_path / "Track00009" / "metadata.yaml").write_text("UUID: 1\n")
    with pytest.raises(AibaError, match="Track00009: metadata.yaml has no 'stems'"):
        read_track(tmp_path / "Track00009")
