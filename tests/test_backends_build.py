"""The tiny offline backends build and generate end to end on the CPU."""
import math

import pytest

torch = pytest.importorskip("torch")


# --- AudioLDM2 (diffusers) -------------------------------------------------------------

def test_audioldm2_tiny_generates(tiny_audioldm2):
    from aiba.backends import audioldm2 as A

    pipe = tiny_audioldm2
    seconds = A.audio_length_for(pipe, 20)
    assert A.latent_shape(pipe, seconds) == (1, 8, 20, 12)
    out = pipe("a bass solo with drums", num_inference_steps=3, audio_length_in_s=seconds,
               guidance_scale=3.5, generator=torch.Generator().manual_seed(0))
    audio = torch.as_tensor(out.audios)
    assert audio.shape == (1, round(seconds * pipe.vocoder.config.sampling_rate))
    assert torch.isfinite(audio).all()


def test_audioldm2_tiny_is_deterministic(tiny_audioldm2):
    from aiba.backends import audioldm2 as A

    pipe = tiny_audioldm2
    kw = dict(num_inference_steps=2, audio_length_in_s=A.audio_length_for(pipe, 12), guidance_scale=3.5)
    a = pipe("piano", generator=torch.Generator().manual_seed(1), **kw).audios
    b = pipe("piano", generator=torch.Generator().manual_seed(1), **kw).audios
    assert (a == b).all()


def test_audioldm2_latent_shape_rounds_up_like_the_pipeline(tiny_audioldm2):
    from aiba.backends import audioldm2 as A

    pipe = tiny_audioldm2
    one_frame = 1 / (pipe.vocoder.config.sampling_rate / math.prod(pipe.vocoder.config.upsample_rates))
    # 41 mel frames round up to 42 (vae scale factor 2) -> 21 latent rows
    assert A.latent_shape(pipe, 41 * one_frame, batch=2) == (2, 8, 21, 12)
    latents = pipe("bass", num_inference_steps=1, audio_length_in_s=41 * one_frame,
                   guidance_scale=1.0, output_type="latent").audios
    assert tuple(latents.shape) == (1, 8, 21, 12)


def test_audioldm2_streams_by_module_path(tiny_audioldm2):
    from aiba.backends import audioldm2 as A
    from aiba.errors import AibaError

    paths = A.cross_attention_paths(tiny_audioldm2.unet)
    counts = {s: sum(v == s for v in paths.values()) for s in A.STREAMS}
    assert counts == {"self": 28, "gpt2": 7, "t5": 7}
    assert A.stream_of("unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2") == "gpt2"
    assert A.stream_of("unet.mid_block.attentions.2.transformer_blocks.0.attn2") == "t5"
    assert A.stream_of("up_blocks.0.attentions.3.transformer_blocks.0.attn2") == "self"
    assert A.stream_of("up_blocks.0.attentions.5.transformer_blocks.0.attn1") == "self"
    with pytest.raises(AibaError):
        A.stream_of("vae.decoder.mid_block.attentions.0")
    assert A.t5_tokens(tiny_audioldm2, "A bass solo") == ["a", "bass", "solo", "</s>"]


def test_audioldm2_attention_calls_per_stream(tiny_audioldm2):
    """One UNet forward under CFG: 28 self, 7 GPT-2, 7 T5 SDPA calls on 10x6 and 5x3 lattices."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention

    from aiba.backends import audioldm2 as A

    pipe = tiny_audioldm2
    seen, current, handles = [], [None], []
    for name, mod in pipe.unet.named_modules():
        if isinstance(mod, Attention):
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: current.__setitem__(0, n)))
    orig = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        seen.append((current[0], q.shape[-2], k.shape[-2], q.shape[0]))
        return orig(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        pipe("a bass solo", num_inference_steps=1, audio_length_in_s=A.audio_length_for(pipe, 20),
             guidance_scale=3.5, output_type="latent")
    finally:
        F.scaled_dot_product_attention = orig
        for h in handles:
            h.remove()
    assert F.scaled_dot_product_attention is orig
    unet_calls = [s for s in seen if s[0] is not None]
    assert len(unet_calls) == 42
    by_stream = {}
    for name, q_len, k_len, batch in unet_calls:
        assert batch == 2  # CFG doubles the batch
        assert q_len in (10 * 6, 5 * 3)
        by_stream.setdefault(A.stream_of(name), set()).add(k_len if A.stream_of(name) != "self" else q_len)
    assert by_stream["gpt2"] == {8}  # max_new_tokens generated GPT-2 states
    assert by_stream["t5"] == {4}  # "a bass solo" + </s>


# --- Stable Audio Open: stable-audio-tools DiT ----------------------------------------

def test_sat_dit_tiny_generates(tiny_sat_dit):
    from aiba.backends import stable_audio as S

    dit, cond = tiny_sat_dit
    cross, glob = cond(["a bass solo", "piano and drums"], 0, 10)
    assert cross.shape == (2, 12 + 2, 64) and glob.shape == (2, 128)
    noise = torch.randn(2, 8, 21, generator=torch.Generator().manual_seed(0))
    steps = []
    out = S.DiTSampler(dit, steps=3, on_step=lambda i, t: steps.append(i))(noise, cross, glob)
    assert steps == [0, 1, 2]
    assert out.shape == (2, 8, 21)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_sat_dit_attention_calls_and_cfg_order(tiny_sat_dit, sat_backend):
    """Self (1+T)x(1+T) and cross (1+T)x(L+2) calls; CFG batch is cat([cond, uncond])."""
    import torch.nn.functional as F
    import stable_audio_tools.models.transformer as sat_transformer

    from aiba.backends import stable_audio as S

    dit, cond = tiny_sat_dit
    assert "flash_attn_func" in vars(sat_transformer)  # bound at import: a second kernel path
    kinds = S.dit_attention_kinds(dit)
    assert sorted(kinds.values()) == ["cross", "cross", "self", "self"]
    cross, glob = cond(["a bass solo"], 0, 10)
    shapes, contexts = [], []
    hook = dit.transformer.layers[0].cross_attn.register_forward_pre_hook(
        lambda m, a, kw: contexts.append(kw["context"]), with_kwargs=True)
    orig = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        shapes.append((tuple(q.shape), tuple(k.shape)))
        return orig(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        S.DiTSampler(dit, steps=1)(torch.randn(1, 8, 21), cross, glob)
    finally:
        F.scaled_dot_product_attention = orig
        hook.remove()
    if sat_transformer.flash_attn_func is None:
        assert sorted(shapes) == sorted([((2, 4, 22, 32), (2, 4, 22, 32))] * 2
                                        + [((2, 4, 22, 32), (2, 4, 14, 32))] * 2)
    ctx = contexts[0]
    assert ctx.shape == (2, 14, 64)
    assert not (ctx[0] == 0).all() and (ctx[1] == 0).all()  # cond first, uncond zeros second
    assert sat_backend.cfg_order(7.0) == "cond_first"  # the order the tap is told is the one seen


# --- Stable Audio Open: diffusers StableAudioPipeline ---------------------------------

def test_sao_pipeline_tiny_generates(tiny_sao_pipeline):
    from aiba.backends import stable_audio as S

    pipe = tiny_sao_pipeline
    assert S.pipeline_latent_shape(pipe) == (1, 8, 21)
    out = pipe("a bass solo", num_inference_steps=3, guidance_scale=7.0,
               generator=torch.Generator().manual_seed(0))
    audio = torch.as_tensor(out.audios)
    assert audio.shape == (1, 2, 21 * 4)  # stereo, latent frames x Oobleck hop
    assert torch.isfinite(audio).all()


def test_sao_pipeline_cfg_order_uncond_first(tiny_sao_pipeline, sao_backend):
    pipe = tiny_sao_pipeline
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0].shape, kw["encoder_hidden_states"], kw["global_hidden_states"])),
        with_kwargs=True)
    try:
        pipe("a bass solo", num_inference_steps=1, guidance_scale=7.0, output_type="latent")
    finally:
        hook.remove()
    latent_shape, ctx, glob = seen[0]
    assert tuple(latent_shape) == (2, 8, 21)
    assert ctx.shape == (2, 12 + 2, 16) and glob.shape == (2, 1, 32)
    assert (ctx[0] == 0).all() and not (ctx[1] == 0).all()  # uncond zeros first
    assert sao_backend.cfg_order(7.0) == "uncond_first"  # the order the tap is told is the one seen
