"""Attention-to-grid mapping: pooling, lattice, resize, aggregation, CFG selection."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from aiba import AibaError, AibaWarning, AttnTap, combined_patch
from aiba.tools.demo import PlantedCrossAttention
from aiba.maps.mapping import candidate_lattices, find_lattice, fit_layer_weights, pool_queries, resize, to_lattice, token_weights


def _grid_cell(model, stride, size):
    """The grid cell holding the centre of the planted lattice cell."""
    (t, f), (ct, cf) = model.lattice(stride), model.target_cell(stride)
    return int((ct + 0.5) / t * size[0]), int((cf + 0.5) / f * size[1]) if f > 1 else 0


def _argmax2d(m):
    i = int(m.argmax())
    return i // m.shape[-1], i % m.shape[-1]


@pytest.mark.parametrize("target", [(0.2, 0.7), (0.85, 0.1), (0.5, 0.5)])
def test_planted_2d_peaks_at_mapped_cell_every_layer(target):
    model = PlantedCrossAttention(latent_shape=(9, 7), target=target, strides=(1, 2, 4))
    size = (36, 28)  # 4x the stride-1 lattice, so each stride-1 cell spans whole grid cells
    tap = AttnTap(*size, pool="mean", latent_shape=(9, 7), content=[1, 2, 3, 4])
    with torch.no_grad(), combined_patch(tap, model=model):
        model(batch=2)
    maps = tap.maps()
    assert maps.freq_resolved and maps.overall.shape == (2, *size)
    assert [r.lattice for r in tap.store] == [(9, 7), (5, 4), (3, 2)]
    for stride, (name, m) in zip(model.strides, maps.layers.items()):
        assert name == f"layers.{model.strides.index(stride)}"
        ct, cf = _grid_cell(model, stride, size)
        pt, pf = _argmax2d(m[0])
        # bilinear upsampling puts the peak within half a source cell of the centre
        assert abs(pt - ct) <= size[0] / model.lattice(stride)[0] / 2 + 1, (stride, (pt, pf), (ct, cf))
        assert abs(pf - cf) <= size[1] / model.lattice(stride)[1] / 2 + 1, (stride, (pt, pf), (ct, cf))
    pt, pf = _argmax2d(maps.overall[1])
    ct, cf = _grid_cell(model, 1, size)
    assert abs(pt - ct) <= 3 and abs(pf - cf) <= 3
    assert maps.overall.std() > 0  # not the constant 1/Lk


def test_planted_1d_with_prefix_gives_time_profile():
    model = PlantedCrossAttention(latent_shape=(11,), target=(0.7, 0.0), strides=(1, 2), prefix=1)
    tap = AttnTap(target_T=44, target_F=64, pool="max", latent_shape=(11,), prefix_tokens=1, content=[1, 2, 3, 4])
    with torch.no_grad(), combined_patch(tap, model=model):
        model()
    maps = tap.maps()
    assert not maps.freq_resolved
    assert maps.overall.shape == (1, 44, 1)  # a time profile, never broadcast over frequency
    assert [r.q_len for r in tap.store] == [12, 7] and [r.lattice for r in tap.store] == [(11, 1), (6, 1)]
    for stride, m in zip(model.strides, maps.layers.values()):
        ct, _ = _grid_cell(model, stride, (44, 1))
        assert abs(int(m[0, :, 0].argmax()) - ct) <= 44 / model.lattice(stride)[0] / 2 + 1


def test_mean_over_all_keys_is_constant_and_warns():
    model = PlantedCrossAttention()
    tap = AttnTap(16, 8, pool="mean", latent_shape=(9, 7))  # no content tokens known
    with pytest.warns(AibaWarning, match="constant 1/5"), torch.no_grad(), combined_patch(tap, model=model):
        model()
    overall = tap.maps().overall
    torch.testing.assert_close(overall, torch.full_like(overall, 1 / 5))
    # the same call pooled over the content tokens is not constant
    tap2 = AttnTap(16, 8, pool="mean", latent_shape=(9, 7), content=[1, 2, 3, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), combined_patch(tap2, model=model):
            model()
    assert tap2.maps().overall.std() > 1e-3


def test_pooling_variants_hand_computed():
    a = torch.tensor([[[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]])  # (B=1, c=2, Lk=3)
    w, m = token_weights("mean", 3, 1, "cpu", content=[1, 2])
    torch.testing.assert_close(pool_queries(a, "mean", w, m), torch.tensor([[0.45, 0.25]]))
    w, m = token_weights("max", 3, 1, "cpu", content=[0, 2])
    torch.testing.assert_close(pool_queries(a, "max", w, m), torch.tensor([[0.3, 0.5]]))
    w, m = token_weights("subset", 3, 1, "cpu", tokens=[1])
    torch.testing.assert_close(pool_queries(a, "subset", w, m), torch.tensor([[0.6, 0.2]]))
    r, tau = torch.tensor([0.0, 1.0, 2.0]), 0.5
    w, m = token_weights("softmax", 3, 1, "cpu", relevance=r, tau=tau, content=[1, 2])
    e1, e2 = math.exp(1 / tau), math.exp(2 / tau)
    s1, s2 = e1 / (e1 + e2), e2 / (e1 + e2)
    torch.testing.assert_close(pool_queries(a, "softmax", w, m), torch.tensor([[s1 * 0.6 + s2 * 0.3, s1 * 0.2 + s2 * 0.3]]))
    # per-batch content masks (prompts of different lengths in one batch)
    a2 = torch.cat([a, a])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    w, m = token_weights("mean", 3, 2, "cpu", content=mask)
    torch.testing.assert_close(pool_queries(a2, "mean", w, m), torch.tensor([[0.35, 0.35], [0.45, 0.25]]))
    # keyed by k_len: a stream with 3 keys uses its own set
    w, m = token_weights("mean", 3, 1, "cpu", content={3: [0], 8: [1, 2]})
    torch.testing.assert_close(pool_queries(a, "mean", w, m), torch.tensor([[0.1, 0.5]]))


def test_pooling_errors_name_the_layer():
    with pytest.raises(AibaError, match=r"layer 'x'.*out of range for k_len=3"):
        token_weights("mean", 3, 1, "cpu", content=[5], name="x")
    with pytest.raises(AibaError, match="needs tokens="):
        token_weights("subset", 3, 1, "cpu", name="x")
    with pytest.raises(AibaError, match="needs relevance="):
        token_weights("softmax", 3, 1, "cpu", name="x")


def test_subset_and_per_token_maps_through_tap():
    model = PlantedCrossAttention(token=3)
    tap = AttnTap(18, 14, pool="subset", tokens=[3], latent_shape=(9, 7))
    per_token = AttnTap(18, 14, pool=None, latent_shape=(9, 7))
    with torch.no_grad(), combined_patch(tap, per_token, model=model):
        model()
    sub = tap.maps().overall[0]
    toks = per_token.maps().overall
    assert toks.shape == (1, 5, 18, 14)  # (B, Lk, T, F)
    torch.testing.assert_close(toks[0, 3], sub)  # the subset of one token is that token's map
    torch.testing.assert_close(toks[0].sum(0), torch.ones(18, 14))  # rows of P sum to 1


def test_resize_matches_interpolate_and_padding_modes():
    g = torch.rand(3, 5, 4)
    ref = F.interpolate(g[:, None], size=(17, 9), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(resize(g, (17, 9)), ref)
    # zeros: samples outside the source blend with 0; a constant map darkens only at the edges
    ones = torch.ones(1, 2, 2)
    z = resize(ones, (4, 4), padding="zeros")
    # output centres map to source -0.25, 0.25, 0.75, 1.25: the outer rows weigh the pad by 0.25
    expected_1d = torch.tensor([0.75, 1.0, 1.0, 0.75])
    torch.testing.assert_close(z[0], expected_1d[:, None] * expected_1d[None, :])
    r = resize(ones, (4, 4), padding="reflection")
    torch.testing.assert_close(r[0], torch.ones(4, 4))
    with pytest.raises(AibaError, match="padding"):
        resize(g, (2, 2), padding="wrap")


def test_lattice_candidates_and_errors():
    assert candidate_lattices((256, 16))[:4] == [(256, 16), (128, 8), (64, 4), (32, 2)]
    assert candidate_lattices((9, 7))[:3] == [(9, 7), (5, 4), (3, 2)]  # ceil for odd sizes
    assert find_lattice(1024, (256, 16)) == (128, 8)
    assert find_lattice(21, (21,)) == (21, 1)
    assert find_lattice(6, (9, 7), extra=[(2, 3)]) == (2, 3)
    with pytest.raises(AibaError, match=r"layer 'down.attn2': 1000 query tokens fit no lattice.*\(256, 16\)"):
        find_lattice(1000, (256, 16), name="down.attn2")
    v = torch.arange(6.0)
    assert torch.equal(to_lattice(v, (2, 3)), torch.tensor([[0.0, 1, 2], [3, 4, 5]]))  # time-major


def test_tap_reports_unfit_lattice_with_layer_name():
    model = PlantedCrossAttention(latent_shape=(9, 7))
    tap = AttnTap(8, 8, pool="max", latent_shape=(10, 7))
    # never raised inside the forward: warned, put on the record, raised when maps are read
    with pytest.warns(Warning, match=r"layer 'layers.0'.*63 query tokens fit no lattice"):
        with torch.no_grad(), combined_patch(tap, model=model):
            model()
    assert "63 query tokens fit no lattice" in tap.store[0].error
    with pytest.raises(AibaError, match=r"layer 'layers.0': 63 query tokens fit no lattice"):
        tap.maps()


def _run_steps(tap, model, n):
    with torch.no_grad(), combined_patch(tap, model=model):
        for step in range(n):
            model.layers[0].q.mul_(1.05)  # each step's map differs
            model()
            tap.next_step()


@pytest.mark.parametrize("weights", ["uniform", "late"])
def test_step_weights_match_direct_weighted_mean(weights):
    n, gamma = 6, 0.7
    model = PlantedCrossAttention(sharpness=2.0)
    tap = AttnTap(12, 10, pool="mean", latent_shape=(9, 7), content=[1, 2, 3, 4], keep="calls", weights=weights, gamma=gamma)
    _run_steps(tap, model, n)
    maps = tap.maps()
    num = den = 0.0
    for rec in tap.store:
        w = gamma ** (n - 1 - rec.step) if weights == "late" else 1.0
        num = num + w * rec.grid
        den += w
    torch.testing.assert_close(maps.overall, num / den)
    for name, m in maps.layers.items():
        recs = [r for r in tap.store if r.name == name]
        ws = [gamma ** (n - 1 - r.step) if weights == "late" else 1.0 for r in recs]
        torch.testing.assert_close(m, sum(w * r.grid for w, r in zip(ws, recs)) / sum(ws))
    assert maps.steps == n and maps.calls == 2 * n


def test_max_aggregate_and_layer_weights():
    model = PlantedCrossAttention(sharpness=2.0)
    tap = AttnTap(12, 10, pool="mean", latent_shape=(9, 7), content=[1, 2, 3, 4], keep="calls", aggregate="max")
    _run_steps(tap, model, 3)
    torch.testing.assert_close(tap.maps().overall, torch.stack([r.grid for r in tap.store]).amax(0))
    tap2 = AttnTap(12, 10, pool="mean", latent_shape=(9, 7), content=[1, 2, 3, 4], keep="calls")
    _run_steps(tap2, model, 2)
    lw = {"layers.0": 3.0, "layers.1": 1.0}
    m = tap2.maps(layer_weights=lw)
    torch.testing.assert_close(m.overall, (3 * m.layers["layers.0"] + m.layers["layers.1"]) / 4)
    torch.testing.assert_close(tap2.maps(layers="layers.1").overall, m.layers["layers.1"])
    with pytest.raises(AibaError, match="layer_weights lack"):
        tap2.maps(layer_weights={"layers.0": 1.0})


def test_streaming_state_does_not_grow_with_steps():
    model = PlantedCrossAttention()
    tap = AttnTap(pool="mean", latent_shape=(9, 7), content=[1, 2, 3, 4])
    _run_steps(tap, model, 2)
    after_2 = tap.state_bytes()
    _run_steps(tap, model, 198)
    assert tap.state_bytes() == after_2 > 0
    assert tap.maps().steps == 200
    # records are metadata only unless keep= asks for tensors
    assert all(r.probs is None and r.grid is None for r in tap.store)


@pytest.mark.parametrize("cfg_order,batch,expect", [
    ("uncond_first", "cond", [2, 3]),
    ("uncond_first", "uncond", [0, 1]),
    ("cond_first", "cond", [0, 1]),
    ("cond_first", "all", [0, 1, 2, 3]),
    (None, "cond", [0, 1, 2, 3]),  # no backend fact: every item kept
])
def test_cfg_batch_selection(cfg_order, batch, expect, ref_probs):
    q, k = torch.randn(4, 2, 6, 8), torch.randn(4, 2, 3, 8)
    tap = AttnTap(4, 4, pool="max", latent_shape=(3, 2), kinds=("cross", "self"), keep="probs", cfg_order=cfg_order, batch=batch)
    with combined_patch(tap):
        F.scaled_dot_product_attention(q, k, k)
    rec = tap.store[0]
    assert rec.batch == 4
    torch.testing.assert_close(rec.probs.double(), ref_probs(q, k)[expect])
    assert tap.maps().overall.shape[0] == len(expect)


def test_cfg_odd_batch_is_an_error():
    q = torch.randn(3, 1, 6, 8)
    tap = AttnTap(4, 4, kinds=("self",), latent_shape=(3, 2), cfg_order="uncond_first")
    with pytest.warns(Warning, match="batch 3 is odd"), combined_patch(tap):
        out = F.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    with pytest.raises(AibaError, match="batch 3 is odd"):
        tap.maps()


def test_self_attention_maps_received_attention():
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    tap = AttnTap(2, 3, kinds=("self",), latent_shape=(2, 3), keep=("probs", "calls"), pool="mean")
    with combined_patch(tap):
        F.scaled_dot_product_attention(q, k, k)
    rec = tap.store[0]
    received = rec.probs[0].mean(0)  # mean over queries of the attention each key receives
    torch.testing.assert_close(rec.grid[0], received.reshape(2, 3))


def test_fit_layer_weights_recovers_mixture():
    g = torch.Generator().manual_seed(0)
    layers = {f"l{i}": torch.rand(5, 8, 6, generator=g) for i in range(3)}
    target = 0.6 * layers["l0"] + 0.4 * layers["l2"]
    w = fit_layer_weights(layers, target)
    assert w["l0"] == pytest.approx(0.6, abs=1e-6) and w["l1"] == pytest.approx(0.0, abs=1e-6)
    assert w["l2"] == pytest.approx(0.4, abs=1e-6) and sum(w.values()) == pytest.approx(1.0)
    with pytest.raises(AibaError, match="cells"):
        fit_layer_weights({"a": torch.rand(2, 2)}, torch.rand(3, 3))


def test_maps_errors_are_clear():
    with pytest.raises(AibaError, match="no latent_shape"):
        AttnTap().maps()
    with pytest.raises(AibaError, match="no captured calls"):
        AttnTap(latent_shape=(4, 4)).maps()
    with pytest.raises(AibaError, match="latent_shape"):
        AttnTap(latent_shape=(0, 4))


def test_content_by_layer_pattern_wins_over_key_length():
    a = torch.tensor([[[0.1, 0.6, 0.3]]])
    spec = {"*.gpt2": [0], 3: [1]}
    w, m = token_weights("mean", 3, 1, "cpu", content=spec, name="block.gpt2")
    torch.testing.assert_close(pool_queries(a, "mean", w, m), torch.tensor([[0.1]]))
    w, m = token_weights("mean", 3, 1, "cpu", content=spec, name="block.t5")
    torch.testing.assert_close(pool_queries(a, "mean", w, m), torch.tensor([[0.6]]))
    # through the tap: two layers with the same key length pool over different tokens
    model = PlantedCrossAttention(token=2)
    tap = AttnTap(9, 7, pool="mean", latent_shape=(9, 7), content={"layers.0": [2], "layers.1": [1]})
    with torch.no_grad(), combined_patch(tap, model=model):
        model()
    layers = tap.maps().layers
    assert layers["layers.0"].max() > 0.5  # token 2 is the planted one
    assert layers["layers.1"].max() < 0.05  # token 1 gets almost nothing


def test_calls_outside_the_model_are_recorded_not_recomputed():
    model = PlantedCrossAttention()
    q = torch.randn(1, 2, 5, 8)
    tap = AttnTap(9, 7, pool="max", latent_shape=(9, 7), kinds=("cross", "self"), keep="probs")
    with torch.no_grad(), combined_patch(tap, model=model):
        F.scaled_dot_product_attention(q, q, q)  # e.g. a text encoder: 5 tokens fit no lattice
        model()
    assert [(r.outside, r.captured, r.probs is not None) for r in tap.store] == [
        (True, False, False), (False, True, True), (False, True, True)]


def test_keep_steps_matches_per_call_grids():
    model = PlantedCrossAttention(sharpness=2.0)
    tap = AttnTap(12, 10, pool="mean", latent_shape=(9, 7), content=[1, 2, 3, 4], keep=("calls", "steps"))
    _run_steps(tap, model, 4)
    steps, maps = tap.step_maps()
    assert steps == [0, 1, 2, 3] and maps.shape == (4, 1, 12, 10)
    for s, m in zip(steps, maps):
        torch.testing.assert_close(m, torch.stack([r.grid for r in tap.store if r.step == s]).mean(0))
    with pytest.raises(AibaError, match='keep="steps"'):
        AttnTap(latent_shape=(9, 7)).step_maps()


@pytest.mark.parametrize("weights,padding", [("late", "border"), ("uniform", "zeros"), ("late", "reflection")])
def test_sums_on_the_lattice_equal_per_call_grids(weights, padding):
    """Without per-call grids the tap sums on each layer's lattice and resizes once in maps()."""
    model = PlantedCrossAttention(sharpness=2.0, strides=(1, 2, 4))
    kw = dict(pool="mean", latent_shape=(9, 7), content=[1, 2, 3, 4], weights=weights, gamma=0.8, padding=padding)
    lattice, grids = AttnTap(24, 20, **kw), AttnTap(24, 20, keep="calls", **kw)
    with torch.no_grad(), combined_patch(lattice, grids, model=model):
        for _ in range(5):
            model.layers[0].q.mul_(1.05)
            model()
            lattice.next_step()
            grids.next_step()
    a, b = lattice.maps(), grids.maps()
    torch.testing.assert_close(a.overall, b.overall, atol=1e-6, rtol=1e-5)
    for name in b.layers:
        torch.testing.assert_close(a.layers[name], b.layers[name], atol=1e-6, rtol=1e-5)
    assert lattice.state_bytes() == (9 * 7 + 5 * 4 + 3 * 2) * 4  # one lattice-sized sum per layer
    assert grids.state_bytes() == 3 * 24 * 20 * 4
