"""Templates on the grid: Hz -> mel rows consistent with the mel features, data-driven, time-aligned."""

import librosa
import numpy as np
import pytest

from aiba import AibaError
from aiba.align.audio import AUDIOLDM2_MEL, MelConfig, grid_row_hz, hz_to_mel, mel_band_hz, mel_grid, mel_to_hz
from aiba.data.slakh import PAPER_CLASSES, SlakhDataset
from aiba.align import templates as TP


def test_mel_scale_matches_librosa():
    hz = np.array([0.0, 100.0, 999.0, 1000.0, 4000.0, 8000.0])
    for htk in (False, True):
        np.testing.assert_allclose(hz_to_mel(hz, htk), librosa.hz_to_mel(hz, htk=htk))
        np.testing.assert_allclose(mel_to_hz(hz_to_mel(hz, htk), htk), hz, atol=1e-6)
    np.testing.assert_allclose(mel_band_hz(), librosa.mel_frequencies(66, fmin=0, fmax=8000)[1:-1])
    np.testing.assert_allclose(grid_row_hz(64), mel_band_hz())  # F == n_mels: identity
    assert np.all(np.diff(grid_row_hz(32)) > 0) and grid_row_hz(32)[-1] < 8000


def test_tone_lands_on_the_row_the_templates_predict():
    """A pure tone's mel energy peaks on the grid row whose centre is nearest its Hz."""
    sr = AUDIOLDM2_MEL.sr
    t = np.arange(sr) / sr
    for f_hz, F in ((110.0, 64), (440.0, 64), (3000.0, 64), (440.0, 32)):
        g = mel_grid(np.sin(2 * np.pi * f_hz * t).astype(np.float32), T=16, F=F)
        assert g.shape == (16, F)
        peak = int(np.argmax(g.sum(0)))
        assert abs(peak - int(np.argmin(np.abs(grid_row_hz(F) - f_hz)))) <= 1, (f_hz, F)


def test_knowledge_templates_cover_the_documented_bands():
    hz = grid_row_hz(64)
    tmpl = TP.knowledge_templates()
    assert set(tmpl) == set(PAPER_CLASSES)
    for cls, m in tmpl.items():
        assert m.shape == (128, 64) and m.dtype == bool and m.all(axis=0).sum() == m[0].sum() > 0
    bass = tmpl["Bass"][0]
    assert np.all(hz[bass] <= 262) and np.all(hz[bass] >= 41)
    assert bass.sum() == np.sum((hz >= 41) & (hz <= 262))
    drums = tmpl["Drums"][0]  # kick and cymbals, nothing in between
    assert drums.sum() == np.sum((hz >= 40) & (hz <= 120)) + np.sum((hz >= 3000) & (hz <= 8000))
    assert not drums[(hz > 120) & (hz < 3000)].any()
    # every band leaves room to discriminate (the flag threshold is the documented one)
    for cls, m in tmpl.items():
        assert TP.band_coverage(m) < TP.COVERAGE_FLAG, cls
    assert TP.band_coverage(np.ones(64, bool)) == 1.0 and TP.band_coverage(bass) == bass.mean()
    # rows follow the grid: at F=32 the bass band holds about half as many rows
    assert TP.knowledge_template("Bass", T=4, F=32).shape == (4, 32)
    assert TP.knowledge_template("Bass", F=32)[0].sum() in (bass.sum() // 2, bass.sum() // 2 + 1)
    # overrides, narrow bands and bad bands
    narrow = TP.band_rows([(500.0, 505.0)])
    assert narrow.sum() == 1 and abs(hz[narrow][0] - 502) < 30
    assert TP.knowledge_template("Kazoo", bands={"Kazoo": ((400.0, 900.0),)})[0].sum() > 0
    with pytest.raises(AibaError, match="outside the grid"):
        TP.band_rows([(9000.0, 12000.0)])
    with pytest.raises(AibaError, match="no knowledge band for class 'Kazoo'"):
        TP.knowledge_template("Kazoo")
    # a different mel configuration moves the rows
    wide = MelConfig(sr=44100, fmax=22050.0)
    assert TP.band_rows([(30.0, 250.0)], 64, wide).sum() < bass.sum()


def test_frame_normalised_profile_and_thresholds():
    g = np.zeros((4, 5))
    g[0, 1] = 100.0  # loud frame, all in row 1
    g[1, 3] = 1.0  # quiet frame, all in row 3: per-frame normalisation weighs it equally
    prof, n = TP.frame_normalized_profile(g)
    assert n == 2 and prof.tolist() == [0, 0.5, 0, 0.5, 0]
    assert TP.frame_normalized_profile(np.zeros((3, 5)))[1] == 0
    p = np.array([0.5, 0.3, 0.15, 0.05])
    assert TP.threshold_profile(p, "mass", 0.8).tolist() == [True, True, False, False]
    assert TP.threshold_profile(p, "mass", 0.81).tolist() == [True, True, True, False]
    assert TP.threshold_profile(p, "relative", 0.5).tolist() == [True, True, False, False]
    with pytest.raises(AibaError, match="all zeros"):
        TP.threshold_profile(np.zeros(4))


def test_data_templates_from_rendered_stems_save_and_reload(mini_slakh, tmp_path):
    ds = SlakhDataset(mini_slakh, split="train")
    dt = TP.build_data_templates(ds.stems(), meta={"split": "train"})
    assert dt.classes == tuple(sorted(PAPER_CLASSES))
    assert dt.profiles.shape == (6, 64) and dt.counts.tolist() == [2] * 6
    np.testing.assert_allclose(dt.profiles.sum(1), 1.0)
    hz = grid_row_hz(64)
    centroid = {c: float(dt.profiles[i] @ hz) for i, c in enumerate(dt.classes)}
    assert centroid["Bass"] < centroid["Piano"] < centroid["Strings"]
    assert hz[dt.band("Bass")].max() < hz[dt.band("Strings")].max()
    assert dt.mask("Bass").shape == (128, 64)
    path = dt.save(tmp_path / "templates.npz")
    assert path.stat().st_size < 20_000
    back = TP.DataTemplates.load(path)
    assert back.classes == dt.classes and back.meta["split"] == "train" and back.meta["n_mels"] == 64
    np.testing.assert_array_equal(back.profiles, dt.profiles)
    assert np.array_equal(back.mask("Organ"), dt.mask("Organ"))
    with pytest.raises(AibaError, match="no data template for class 'Brass'"):
        back.band("Brass")
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(AibaError, match="not a data-templates file"):
        TP.DataTemplates.load(tmp_path / "bad.npz")


def test_time_aligned_mask():
    g = np.zeros((6, 8))
    g[1:4, 2] = 1.0
    g[5, 2] = 1e-6  # 60 dB down: inactive
    band = np.zeros(8, bool)
    band[1:3] = True
    m = TP.time_aligned_mask(band, g)
    assert m.shape == (6, 8)
    assert m.any(axis=1).tolist() == [False, True, True, True, False, False]
    assert np.array_equal(m[1], band)
    assert not TP.time_aligned_mask(band, np.zeros((6, 8))).any()  # silent clip: empty GT
    with pytest.raises(AibaError, match=r"expected \(8,\)"):
        TP.time_aligned_mask(np.ones(5, bool), g)


def test_time_aligned_mask_on_a_rendered_stem(mini_slakh):
    stem = SlakhDataset(mini_slakh).stems(classes=("Strings",))[0]
    y = stem.load_audio()
    y[len(y) // 2:] = 0  # silence the second half
    g = mel_grid(y)
    m = TP.time_aligned_mask(TP.knowledge_template("Strings")[0], g)
    active = m.any(axis=1)
    assert active[:56].mean() > 0.9 and not active[72:].any()
