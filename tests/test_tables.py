"""Tables 1 and 3: values against scikit-learn, null baselines, seeded bootstrap CIs."""

import json

import numpy as np
import pytest
from sklearn.metrics import jaccard_score, precision_recall_fscore_support

from aiba import AibaError
from aiba.align.metrics import binarize
from aiba.align.tables import bootstrap_indices, build_table1, build_table3, null_maps
from aiba.align.templates import knowledge_templates

CLASSES = ("Bass", "Drums", "Guitars", "Piano", "Strings", "Organ")


def synthetic(n_per_class=4, T=16, F=64, noise=0.8, seed=0):
    """Maps that are the knowledge band of their class plus noise: well above chance."""
    rng = np.random.default_rng(seed)
    tmpl = knowledge_templates(T=T, F=F)
    maps, gts, labels = [], [], []
    for c in CLASSES:
        for _ in range(n_per_class):
            gt = tmpl[c].copy()
            gt[rng.random(T) < 0.2] = False  # some inactive frames
            maps.append(0.6 * gt + noise * rng.random((T, F)))  # overlapping values: imperfect
            gts.append(gt)
            labels.append(c)
    return np.stack(maps), np.stack(gts), np.array(labels)


def test_table1_matches_sklearn_and_beats_the_nulls():
    maps, gts, labels = synthetic()
    t = build_table1(maps, gts, labels, threshold=0.5, n_boot=200, seed=1)
    assert t.rows == ("Precision", "Recall", "F1", "IoU") and t.columns == ("Micro", "Macro", "Pos.-weighted")
    # reference: classes as labels of a multilabel problem over pooled cells
    pred = binarize(maps, 0.5)
    Y = np.zeros((gts.shape[0] // 6 * gts[0].size, 6), bool)
    P = np.zeros_like(Y)
    for k, c in enumerate(CLASSES):
        Y[:, k] = gts[labels == c].ravel()
        P[:, k] = pred[labels == c].ravel()
    for col, avg in zip(t.columns, ("micro", "macro", "weighted")):
        p, r, f, _ = precision_recall_fscore_support(Y, P, average=avg, zero_division=0)
        assert t.value("Precision", col) == pytest.approx(p)
        assert t.value("Recall", col) == pytest.approx(r)
        assert t.value("F1", col) == pytest.approx(f)
        assert t.value("IoU", col) == pytest.approx(jaccard_score(Y, P, average=avg, zero_division=0))
    # CIs bracket the point estimate and lie in [0, 1]
    assert np.all(t.ci[..., 0] <= t.values + 1e-12) and np.all(t.values <= t.ci[..., 1] + 1e-12)
    assert np.all((t.ci >= 0) & (t.ci <= 1))
    # uniform null: every cell predicted -> recall 1, precision = GT density (micro)
    assert t.value("Recall", "Micro", "uniform") == 1.0
    assert t.value("Precision", "Micro", "uniform") == pytest.approx(gts.mean())
    for null in ("uniform", "shuffled"):
        assert t.value("F1", "Micro") > t.null_ci[null][2, 0, 1]  # above the null's upper CI
    md = t.to_markdown()
    assert "| Precision |" in md and "Null baseline (shuffled)" in md and "bootstrap" in md
    assert json.loads(json.dumps(t.to_dict()))["values"]["IoU"]["Micro"] == pytest.approx(t.value("IoU", "Micro"))


def test_bootstrap_is_seeded_and_stratified():
    maps, gts, labels = synthetic(n_per_class=3)
    a = build_table1(maps, gts, labels, n_boot=50, seed=7)
    b = build_table1(maps, gts, labels, n_boot=50, seed=7)
    c = build_table1(maps, gts, labels, n_boot=50, seed=8)
    np.testing.assert_array_equal(a.ci, b.ci)
    np.testing.assert_array_equal(a.null["shuffled"], b.null["shuffled"])
    assert not np.array_equal(a.ci, c.ci)
    idx = bootstrap_indices(labels, 20, np.random.default_rng(0))
    assert idx.shape == (20, labels.size)
    assert np.all(labels[idx] == labels[None, :])  # resampled within each class
    # perfect maps: every resample scores 1, so the CI collapses to 1
    p = build_table1(gts * 1.0, gts, labels, n_boot=30)
    np.testing.assert_allclose(p.ci, 1.0)


def test_table3_per_instrument_and_macro_avg():
    maps, gts, labels = synthetic()
    t = build_table3(maps, gts, labels, classes=CLASSES, n_boot=100)
    assert t.rows == CLASSES + ("Macro-avg",) and t.columns == ("Precision", "Recall", "F1", "IoU")
    pred = binarize(maps, 0.5)
    for c in CLASSES:
        p, r, f, _ = precision_recall_fscore_support(gts[labels == c].ravel(), pred[labels == c].ravel(),
                                                     average="binary", zero_division=0)
        np.testing.assert_allclose([t.value(c, "Precision"), t.value(c, "Recall"), t.value(c, "F1")], [p, r, f])
    np.testing.assert_allclose(t.values[-1], t.values[:-1].mean(0))
    # Table 3's Macro-avg row equals Table 1's Macro column
    t1 = build_table1(maps, gts, labels, n_boot=0)
    np.testing.assert_allclose(t.values[-1], t1.values[:, 1])
    assert np.isnan(t1.ci).all()  # no resamples, no CI
    assert t.value("Bass", "Recall", "uniform") == 1.0
    assert t.value("Bass", "F1") > t.value("Bass", "F1", "shuffled")
    with pytest.raises(AibaError, match="no items of class"):
        build_table3(maps, gts, labels, classes=CLASSES + ("Brass",), n_boot=0)


def test_table1_extras_rows():
    maps, gts, labels = synthetic(n_per_class=2)
    t = build_table1(maps, gts, labels, n_boot=20, extras=True)
    assert t.rows[-4:] == ("AP", "Pearson", "Spearman", "Pointing")
    assert t.value("AP", "Micro") > t.value("AP", "Micro", "uniform") + 0.3 and t.value("Pointing", "Micro") == 1.0
    assert t.value("Pointing", "Micro", "uniform") == pytest.approx(gts.mean(axis=(1, 2)).mean())
    assert np.isnan(t.value("Pearson", "Micro", "uniform"))  # constant profile: undefined
    assert "n/a" in t.to_markdown()


def test_null_maps_and_input_errors():
    maps, gts, labels = synthetic(n_per_class=2)
    rng = np.random.default_rng(0)
    sh = null_maps(maps, "shuffled", rng, labels)
    sums = maps.sum((1, 2))
    for i, s in enumerate(sh.sum((1, 2))):  # every null map is another class's map
        (src,) = np.flatnonzero(np.isclose(sums, s))
        assert labels[src] != labels[i]
    with pytest.raises(AibaError, match="two classes"):
        null_maps(maps[:2], "shuffled", rng, ["bass", "bass"])
    assert np.all(null_maps(maps, "uniform", rng) == 1)
    with pytest.raises(AibaError, match="null baseline"):
        null_maps(maps, "random", rng)
    with pytest.raises(AibaError, match=r"labels \(N,\)"):
        build_table1(maps, gts, labels[:-1])
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(AibaError, match="NaN"):
        build_table1(bad, gts, labels)
    with pytest.raises(AibaError, match="no cell"):
        build_table1(maps, gts, labels, n_boot=0).value("AP", "Micro")
