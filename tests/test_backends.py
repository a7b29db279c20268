"""Backend adapters: generation under capture, per-stream maps, lattices, step counting,
and audio identical with and without capture."""
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from aiba import AttnTap, AibaError  # noqa: E402

PROMPT = "a bass solo with drums"


def _tap(**kw):
    return AttnTap(target_T=32, target_F=16, pool=kw.pop("pool", "max"), kinds=("cross", "self"), **kw)


def _records(tap, patterns):
    import fnmatch

    return [r for r in tap.store if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]


# --- registry -----------------------------------------------------------------------

def test_registry_lists_and_rejects():
    from aiba.backends import BACKENDS, available, get

    assert set(BACKENDS) == {"audioldm2", "stable-audio", "stable-audio-diffusers", "generic", "reference"}
    assert "generic" in available() and set(available()) <= set(BACKENDS)
    with pytest.raises(AibaError, match="unknown backend"):
        get("nope")
    with pytest.raises(AibaError, match="no tiny model"):
        get("generic", tiny=True)


# --- AudioLDM2 ------------------------------------------------------------------------

def test_audioldm2_capture_both_streams_and_identical_audio(audioldm2_backend):
    b = audioldm2_backend
    streams = b.streams()
    assert {s: len(p) for s, p in streams.items()} == {"gpt2": 7, "t5": 7, "self": 28}
    plain = b.generate(PROMPT, steps=3, seed=0)
    tap = _tap()
    cap = b.generate(PROMPT, steps=3, seed=0, tap=tap)
    assert plain.audio.shape == (1, 640) and plain.sample_rate == 16000 and plain.decoded
    assert np.array_equal(plain.audio, cap.audio)  # capture never changes outputs
    assert plain.maps == {} and cap.latent_shape == (20, 12)
    assert tap.step == 3  # next_step once per denoising step
    assert tap.cfg_order == "uncond_first" and tap.latent_shape == (20, 12)
    # T5 content: the five words, not </s>, keyed by the T5 layers' paths
    assert set(tap.content) == set(streams["t5"])
    assert all(mask.tolist() == [[True] * 5 + [False]] for mask in tap.content.values())
    for stream, k in (("gpt2", 8), ("t5", 6)):
        m = cap.maps[stream]
        recs = _records(tap, streams[stream])
        assert recs and all(r.kind == "cross" and r.k_len == k and r.captured for r in recs)
        assert {r.lattice for r in recs} == {(10, 6), (5, 3)}
        assert {r.q_len for r in recs} == {60, 15}
        assert {r.step for r in recs} == {0, 1, 2}
        assert m.overall.shape == (1, 32, 16) and m.freq_resolved
        assert m.steps == 3 and m.calls == 7 * 3 and len(m.layers) == 7
        assert torch.isfinite(m.overall).all() and m.overall.abs().sum() > 0
    # text encoders and the VAE ran SDPA outside the UNet: recorded only, never mapped
    outside = [r for r in tap.store if r.name.startswith("sdpa.")]
    assert outside and not any(r.captured for r in outside) and all(r.outside for r in outside)


def test_audioldm2_mean_pool_on_t5_is_not_constant(audioldm2_backend):
    tap = AttnTap(target_T=16, target_F=8, pool="mean", layers=audioldm2_backend.streams()["t5"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=__import__("aiba").AibaWarning)  # content given: no warning
        res = audioldm2_backend.generate(PROMPT, steps=1, tap=tap)
    m = res.maps["t5"].overall
    assert set(res.maps) == {"t5"}
    assert float(m.max() - m.min()) > 0  # not the constant 1/k_len


# --- stable-audio-tools DiT -----------------------------------------------------------

def test_sat_dit_time_only_prefix_stripped_identical(sat_backend):
    from aiba.backends.stable_audio import PREFIX_TOKENS, TinyDiTConfig

    b, c = sat_backend, TinyDiTConfig()
    prompts = ["a bass solo", "piano and drums"]
    plain = b.generate(prompts, steps=3, seed=0)
    tap = _tap()
    cap = b.generate(prompts, steps=3, seed=0, tap=tap)
    assert not plain.decoded and plain.audio.shape == (2, c.io_channels, c.latent_len)
    assert np.array_equal(plain.audio, cap.audio)
    assert tap.step == 3 and tap.cfg_order == "cond_first" and tap.prefix_tokens == PREFIX_TOKENS == 1
    cross = _records(tap, b.streams()["t5"])
    assert len(cross) == c.depth * 3
    for r in cross:
        # SAO-style context: T5 tokens (padded) + seconds_start + seconds_total; 1 + T queries
        assert (r.kind, r.kind_source, r.k_len, r.q_len) == ("cross", "args", c.max_text_len + 2, 1 + c.latent_len)
        assert r.lattice == (c.latent_len, 1) and r.batch == 4
    m = cap.maps["t5"]
    assert not m.freq_resolved and m.overall.shape == (2, 32, 1)  # a time profile, not spread over F
    assert cap.maps["self"].overall.shape == (2, 32, 1)
    (k_len, mask), = tap.content.items()
    assert k_len == c.max_text_len + 2
    assert mask.sum(1).tolist() == [3, 3] and not mask[:, -2:].any()  # words only; seconds tokens excluded


def test_sat_dit_tiny_decodes_audio():
    pytest.importorskip("stable_audio_tools")
    pytest.importorskip("diffusers")
    from aiba.backends import get

    b = get("stable-audio", tiny=True)
    res = b.generate("piano", steps=1, seed=0)
    assert res.decoded and res.audio.shape == (1, 2, 21 * 4) and np.isfinite(res.audio).all()


# --- diffusers StableAudioPipeline -----------------------------------------------------

def test_sao_pipeline_time_only_identical(sao_backend):
    b = sao_backend
    plain = b.generate("a bass solo", steps=3, seed=0)
    tap = _tap()
    cap = b.generate("a bass solo", steps=3, seed=0, tap=tap)
    assert plain.audio.shape == (1, 2, 84) and plain.sample_rate == 4000
    assert np.array_equal(plain.audio, cap.audio)
    assert tap.step == 3 and tap.cfg_order == "uncond_first" and tap.prefix_tokens == 1
    cross = _records(tap, b.streams()["t5"])
    assert len(cross) == 2 * 3
    assert {(r.q_len, r.k_len, r.lattice) for r in cross} == {(22, 14, (21, 1))}
    assert not cap.maps["t5"].freq_resolved and cap.maps["t5"].overall.shape == (1, 32, 1)
    (k_len, mask), = tap.content.items()
    assert k_len == 14 and mask.tolist() == [[True] * 3 + [False] * 11]


# --- generic ---------------------------------------------------------------------------

def test_generic_mha_infers_latent_and_maps(mha_model):
    from aiba.backends.generic import GenericBackend

    model, inputs = mha_model
    b = GenericBackend(model, inputs)
    inf = b.infer()
    assert inf.latent_shape == (6, 5) and inf.prefix_tokens == 0 and inf.q_lens == (30,)
    assert inf.kinds == {"self_attn": "self", "cross_attn": "cross"}
    assert any("cfg" in n for n in inf.notes) and any("content" in n for n in inf.notes)
    assert b.streams() == {"cross": ["cross_attn"], "self": ["self_attn"]}
    plain = b.generate(steps=2)
    tap = _tap()
    cap = b.generate(steps=2, tap=tap)
    assert np.array_equal(plain.audio, cap.audio) and plain.audio.shape == (1, 4, 6, 5)
    assert tap.step == 2
    recs = _records(tap, ["cross_attn"])
    assert [(r.kernel, r.kind, r.q_len, r.k_len, r.lattice) for r in recs] == [("mha", "cross", 30, 7, (6, 5))] * 2
    assert cap.maps["cross"].overall.shape == (1, 32, 16) and cap.maps["cross"].freq_resolved


def test_generic_stated_shape_and_what_it_cannot_infer(mha_model):
    from aiba.backends.generic import GenericBackend

    model, (x, ctx) = mha_model

    def run(m):  # a callable taking the model
        return m(x, ctx)

    assert GenericBackend(model, run).infer().latent_shape == (6, 5)
    b2 = GenericBackend(model, run, latent_shape=(6, 5), content=[0, 1, 2], cfg_order=None)
    tap = AttnTap(target_T=12, target_F=10, pool="mean")
    res = b2.generate(tap=tap)
    assert res.maps["cross"].freq_resolved and tap.content == [0, 1, 2]
    assert not any("content" in n for n in b2.infer().notes)

    # attention run without the model's forward: no input tells the latent shape
    b3 = GenericBackend(model, lambda m: m.self_attn(torch.randn(1, 11, 16), torch.randn(1, 11, 16),
                                                      torch.randn(1, 11, 16)))
    inf = b3.infer()
    assert inf.latent_shape is None and any("latent_shape" in n for n in inf.notes)
