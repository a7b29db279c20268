"""aiba.align.metrics against independent references (scikit-learn, scipy, hand-computed cases)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import average_precision_score, jaccard_score, precision_recall_fscore_support

from aiba import AibaError, AibaWarning
from aiba.align import metrics as M


def rand_case(seed, T=8, F=6, p=0.3):
    rng = np.random.default_rng(seed)
    m = rng.random((T, F))
    g = rng.random((T, F)) < p
    return m, g


# ---- binarize / normalize ---------------------------------------------------------------

def test_binarize_max_minmax_none_hand_computed():
    m = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert M.binarize(m, 0.5).tolist() == [[False, True], [True, True]]  # /4 -> .25 .5 .75 1
    assert M.binarize(m, 0.5, "minmax").tolist() == [[False, False], [True, True]]  # 0 1/3 2/3 1
    assert M.binarize(m, 2.5, "none").tolist() == [[False, False], [True, True]]


def test_binarize_torch_and_batch():
    m = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[5.0, 5.0], [0.0, 1.0]]])  # (2, 2, 2)
    out = M.binarize(m, 0.5)
    assert out.shape == (2, 2, 2)
    assert out[0].tolist() == [[False, False], [True, True]]
    assert out[1].tolist() == [[True, True], [False, False]]  # per-map max


def test_constant_map_normalises_to_all_ones():
    for mode in ("max", "minmax"):
        assert M.binarize(np.full((3, 4), 2.0), 0.99, mode).all()
    assert M.binarize(np.zeros((3, 4)), 0.5).all()


def test_nan_and_bad_inputs_raise():
    m = np.ones((4, 4))
    m[1, 2] = np.nan
    with pytest.raises(AibaError, match="NaN"):
        M.binarize(m, 0.5)
    with pytest.raises(AibaError, match="NaN"):
        M.tf_ap(m, np.ones((4, 4), bool))
    with pytest.raises(AibaError, match="non-negative"):
        M.binarize(-np.ones((2, 2)) + np.eye(2) * 0.5, 0.5)
    with pytest.raises(AibaError, match=r"shapes differ.*\(4, 4\).*\(4, 5\)"):
        M.tf_iou(np.ones((4, 4), bool), np.ones((4, 5), bool))
    with pytest.raises(AibaError, match="binary mask"):
        M.tf_iou(np.ones((2, 2)), np.full((2, 2), 0.5))
    with pytest.raises(AibaError, match="axes"):
        M.tf_iou(np.ones(4, bool), np.ones(4, bool))
    with pytest.raises(AibaError, match="normalize"):
        M.binarize(np.ones((2, 2)), 0.5, "zscore")


# ---- precision / recall / F1 / IoU -----------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_prf_iou_match_sklearn(seed):
    m, g = rand_case(seed)
    p = M.binarize(m, 0.6)
    ref = precision_recall_fscore_support(g.ravel(), p.ravel(), average="binary", zero_division=0)
    got = M.precision_recall_f1(p, g)
    np.testing.assert_allclose(got, ref[:3])
    assert M.tf_iou(p, g) == pytest.approx(jaccard_score(g.ravel(), p.ravel(), zero_division=0))


def test_prf_iou_hand_computed():
    g = np.array([[1, 1, 0, 0]], bool)
    p = np.array([[1, 0, 1, 0]], bool)  # tp 1, fp 1, fn 1
    assert M.precision_recall_f1(p, g) == (0.5, 0.5, 0.5)
    assert M.tf_iou(p, g) == pytest.approx(1 / 3)
    assert M.confusion_counts(p, g).tolist() == [1, 1, 1, 1]


def test_empty_ground_truth_and_empty_prediction():
    empty = np.zeros((3, 3), bool)
    full = np.ones((3, 3), bool)
    assert M.precision_recall_f1(full, empty) == (0.0, 0.0, 0.0)
    assert M.tf_iou(full, empty) == 0.0
    assert M.tf_iou(empty, empty) == 0.0
    assert M.tf_iou(empty, empty, zero_division=1.0) == 1.0
    assert M.precision_recall_f1(empty, full) == (0.0, 0.0, 0.0)


def test_batch_metrics_return_one_value_per_map():
    ms, gs = zip(*(rand_case(s) for s in range(3)))
    p = M.binarize(np.stack(ms), 0.5)
    g = np.stack(gs)
    iou = M.tf_iou(p, g)
    assert iou.shape == (3,)
    np.testing.assert_allclose(iou, [M.tf_iou(p[i], g[i]) for i in range(3)])


# ---- AP and the sweep -------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_tf_ap_matches_sklearn(seed):
    m, g = rand_case(seed)
    assert M.tf_ap(m, g) == pytest.approx(average_precision_score(g.ravel(), m.ravel()))


def test_tf_ap_with_ties_matches_sklearn():
    m, g = rand_case(11)
    m = np.round(m * 4) / 4  # 5 distinct values, many ties
    assert M.tf_ap(m, g) == pytest.approx(average_precision_score(g.ravel(), m.ravel()))
    assert M.tf_ap(torch.tensor(m), torch.tensor(g)) == pytest.approx(M.tf_ap(m, g))


def test_tf_ap_hand_computed_and_edge_cases():
    m = np.array([[0.9, 0.8, 0.7, 0.1]])
    g = np.array([[1, 0, 1, 0]], bool)
    assert M.tf_ap(m, g) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert M.tf_ap(np.full((2, 2), 3.0), np.array([[1, 0], [0, 0]], bool)) == pytest.approx(0.25)
    with pytest.warns(AibaWarning, match="empty"):
        assert np.isnan(M.tf_ap(m, np.zeros_like(g)))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 5))
def test_tf_ap_property_against_sklearn(seed, T, F):
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 4, (T, F)).astype(float)
    g = rng.random((T, F)) < 0.5
    if not g.any():
        g[0, 0] = True
    assert M.tf_ap(m, g) == pytest.approx(average_precision_score(g.ravel(), m.ravel()))


def test_iou_sweep_matches_per_threshold_iou():
    m, g = rand_case(3)
    th = [0.1, 0.4, 0.7, 0.95]
    r = M.iou_sweep(m, g, th)
    expected = [M.tf_iou(M.binarize(m, t), g) for t in th]
    np.testing.assert_allclose(r.iou, expected)
    assert r.best_iou == pytest.approx(max(expected))
    assert r.best_threshold == th[int(np.argmax(expected))]
    assert r.precision.shape == r.recall.shape == r.f1.shape == (4,)


def test_iou_sweep_perfect_map_reaches_one():
    g = np.zeros((6, 8), bool)
    g[:, :3] = True
    r = M.iou_sweep(g.astype(float) * 0.9 + 0.05, g)
    assert r.best_iou == 1.0
    assert r.iou[0] < 1.0  # threshold 0.05 keeps every cell


# ---- profile correlation and pointing game ---------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_profile_correlation_matches_scipy(seed):
    m, g = rand_case(seed, T=10, F=12)
    pm, pg = m.sum(0), g.sum(0)
    assert M.profile_correlation(m, g) == pytest.approx(pearsonr(pm, pg)[0])
    assert M.profile_correlation(m, g, "spearman") == pytest.approx(spearmanr(pm, pg)[0])


def test_profile_correlation_hand_computed_and_constant():
    m = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert M.profile_correlation(m, m[:, ::-1]) == pytest.approx(-1.0)
    assert M.profile_correlation(m, m ** 2, "spearman") == pytest.approx(1.0)
    with pytest.warns(AibaWarning, match="constant"):
        assert np.isnan(M.profile_correlation(np.ones((2, 3)), m))
    with pytest.raises(AibaError, match="method"):
        M.profile_correlation(m, m, "kendall")


def test_pointing_game():
    g = np.zeros((4, 5), bool)
    g[:, 1] = True
    m = np.zeros((4, 5))
    m[2, 1] = 1.0
    assert M.pointing_game(m, g) is True
    m[3, 4] = 2.0
    assert M.pointing_game(torch.tensor(m), torch.tensor(g)) is False
    # a constant map: the first cell (0, 0) is outside; the expected hit rate is 4 / 20
    assert M.pointing_game(np.ones((4, 5)), g) is False
    assert M.pointing_game(np.ones((4, 5)), g, ties="expected") == pytest.approx(0.2)
    m2 = np.zeros((4, 5))
    m2[1, 1] = 0.5
    batch = M.pointing_game(np.stack([m, m2]), np.stack([g, g]))
    assert batch.tolist() == [False, True]


# ---- averaging --------------------------------------------------------------------------

def test_micro_macro_weighted_match_sklearn_multilabel():
    rng = np.random.default_rng(0)
    C, T, F = 3, 6, 5
    density = [0.1, 0.4, 0.7]  # classes with different positive counts
    gts = np.stack([rng.random((T, F)) < d for d in density])  # (C, T, F)
    preds = np.stack([rng.random((T, F)) < 0.4 for _ in range(C)])
    counts = M.confusion_counts(preds, gts)  # (C, 4)
    labels = np.array(["a", "b", "c"])
    Y = gts.reshape(C, -1).T  # (cells, C) multilabel indicator
    P = preds.reshape(C, -1).T
    for avg in ("micro", "macro", "weighted"):
        got = M.average_scores(counts, labels, avg)
        ref = precision_recall_fscore_support(Y, P, average=avg, zero_division=0)
        np.testing.assert_allclose([got["precision"], got["recall"], got["f1"]], ref[:3])
        assert got["iou"] == pytest.approx(jaccard_score(Y, P, average=avg, zero_division=0))


def test_macro_pools_items_within_a_class():
    counts = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 2, 0]])  # two items of class x
    labels = np.array(["x", "x", "y"])
    s = M.average_scores(counts, labels, "macro")
    assert s["precision"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert s["recall"] == pytest.approx((1.0 + 0.0) / 2)
    with pytest.raises(AibaError, match="average"):
        M.average_scores(counts, labels, "samples")
