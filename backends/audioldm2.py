"""AudioLDM2 backend: loading, a tiny offline pipeline, and the facts aiba needs about it.

Facts (diffusers ``AudioLDM2Pipeline``; measured on the tiny pipeline built here with a
counting wrapper on ``F.scaled_dot_product_attention``, and matching the published configs of the
real checkpoints):

- Latent ``(B, C, T_lat, F_lat)``: height = time, width = mel frequency.
  ``T_lat = ceil(audio_length_in_s * sr / hop / vae_sf)`` where ``hop = prod(vocoder
  upsample_rates)`` and ``vae_sf = 2 ** (len(vae block_out_channels) - 1)``;
  ``F_lat = vocoder model_in_dim (mel bins) / vae_sf``. Real: 10.24 s -> (B, 8, 256, 16).
- Query tokens of every attention call are the latent lattice at that UNet depth, raster
  in time-major order: ``q_len = (T_lat / s) * (F_lat / s)`` with ``s`` the block stride
  (ceil-divided by the downsamplers, which pad).
- Each ``CrossAttn*Block2D`` / mid block holds ``attentions`` =
  ``layers_per_block * len(cross_attention_dim[i])`` ``Transformer2DModel`` s, one per
  (layer, slot) in order ``idx = layer * n_slots + slot``. With slots ``[None, d1, d2]``:
  slot 0 (``None``) runs only self-attention (both ``attn1`` and ``attn2`` are self:
  diffusers builds a transformer with ``cross_attention_dim=None``), slot 1 cross-attends to
  ``encoder_hidden_states`` = the GPT-2 generated tokens (``max_new_tokens``, 8 by
  default), slot 2 to ``encoder_hidden_states_1`` = the Flan-T5 tokens (padding masked).
  (``modeling_audioldm2.py``: ``attentions[i * n_slots + idx]``; slot ``idx == 1`` gets
  ``encoder_hidden_states``, non-None slots ``idx > 1`` get ``encoder_hidden_states_1``,
  ``None`` slots get no context, so large's ``[None, 768, 1024, None]`` adds a 4th self slot.)
  So in ``...attentions.{idx}.transformer_blocks.0.attn2``, ``idx % 3 == 1`` is the GPT-2
  stream and ``idx % 3 == 2`` is the T5 stream; every ``attn1`` is self-attention.
- CFG: the pipeline doubles the batch as ``cat([uncond, cond])``: the FIRST half of every
  attention call's batch is unconditional (``noise_pred.chunk(2)`` -> uncond, text).
- The GPT-2 tokens are generated embeddings, not words: per-word maps exist only on the T5
  stream, whose tokens are ``tokenizer_2(prompt)`` (words then ``</s>``).
- All attention goes through ``AttnProcessor2_0`` -> ``F.scaled_dot_product_attention``
  with q ``(B, heads, q_len, head_dim)``; the T5 stream alone passes an additive mask of
  shape ``(B, heads, 1, k_len)``. The unconditional half's T5 context is the empty
  prompt (just ``</s>``) padded to the conditional length and masked.
- Other SDPA calls in one generation that are NOT the UNet (filter by module path): the
  CLAP / Flan-T5 / GPT-2 text encoders (GPT-2 once per generated token) and one VAE
  mid-block self-attention at decode over the full latent lattice (heads 1).

Measured on ``build_tiny()`` (blocks (16, 32, 32), 1 layer per block, 2 heads,
``audio_length_for(pipe, 20)`` = 0.04 s -> latent (1, 8, 20, 12), CFG batch 2):
per UNet forward 42 calls = 28 self + 7 GPT-2 + 7 T5 over two lattices,
10x6 = 60 tokens (down_blocks.1, up_blocks.1: 12 self / 3 / 3) and
5x3 = 15 tokens (down_blocks.2, mid_block, up_blocks.0: 16 self / 4 / 4);
GPT-2 cross k_len 8, T5 cross k_len = prompt tokens + ``</s>`` (6 for "a bass solo with
drums"). 3 steps generate 640 samples in ~0.16 s on CPU (build ~4 s).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from aiba.errors import AibaError

__all__ = [
    "TinyAudioLDM2Config", "load", "build_tiny", "latent_shape", "stream_of",
    "cross_attention_paths", "t5_tokens", "STREAMS", "AudioLDM2Backend",
]

STREAMS = ("self", "gpt2", "t5")  # slot order of cross_attention_dim [None, d1, d2]

_ATTN_RE = re.compile(r"(?:^|\.)attentions\.(\d+)\.transformer_blocks\.\d+\.(attn1|attn2)")


@dataclass(frozen=True)
class TinyAudioLDM2Config:
    block_out_channels: tuple = (16, 32, 32)  # UNet widths; first block has no attention
    layers_per_block: int = 1
    heads: int = 2  # UNet attention heads (diffusers' attention_head_dim reads as heads)
    gpt2_dim: int = 16  # d1: GPT-2 width, the GPT-2 stream's key dim
    t5_dim: int = 24  # d2: Flan-T5 width, the T5 stream's key dim
    clap_dim: int = 16  # CLAP text width and projection dim
    latent_channels: int = 8  # as the real model
    vae_channels: tuple = (16, 32)  # 2 blocks -> vae scale factor 2
    mel_bins: int = 24  # vocoder model_in_dim; F_lat = mel_bins / vae_sf = 12
    upsample_rates: tuple = (4, 4)  # vocoder hop = 16 samples per mel frame
    sampling_rate: int = 16000
    max_new_tokens: int = 8  # GPT-2 generated tokens (as the real pipeline)
    max_text_len: int = 16  # tokenizers' model_max_length
    sample_size: int = 20  # default T_lat when audio_length_in_s is not given


def load(model_id: str = "cvssp/audioldm2-music", device=None, dtype=None):
    """Load a real AudioLDM2 pipeline as users run it (needs the weights or the hub)."""
    import torch
    from diffusers import AudioLDM2Pipeline
    from transformers import GPT2LMHeadModel

    from ._hub import checkpoint_guard

    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    # The checkpoints store a GPT2Model; the pipeline's generation loop needs the
    # GenerationMixin helpers that transformers >= 5 only gives GPT2LMHeadModel.
    with checkpoint_guard(model_id, "audioldm2"):
        kwargs["language_model"] = GPT2LMHeadModel.from_pretrained(model_id, subfolder="language_model", **kwargs)
        pipe = AudioLDM2Pipeline.from_pretrained(model_id, **kwargs)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return pipe.to(device)


def _tiny_unet(c: TinyAudioLDM2Config):
    from diffusers import AudioLDM2UNet2DConditionModel

    n_blocks = len(c.block_out_channels)
    return AudioLDM2UNet2DConditionModel(
        sample_size=c.sample_size,
        in_channels=c.latent_channels,
        out_channels=c.latent_channels,
        block_out_channels=c.block_out_channels,
        layers_per_block=c.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_blocks - 1) + ("UpBlock2D",),
        cross_attention_dim=[[None, c.gpt2_dim, c.t5_dim]] * n_blocks,
        attention_head_dim=c.heads,
        norm_num_groups=8,
    )


def _tiny_vae(c: TinyAudioLDM2Config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=list(c.vae_channels),
        in_channels=1,
        out_channels=1,
        down_block_types=["DownEncoderBlock2D"] * len(c.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(c.vae_channels),
        latent_channels=c.latent_channels,
        norm_num_groups=8,
    )


def _tiny_clap(c: TinyAudioLDM2Config, vocab_size: int):
    """CLAP (its text tower encodes the prompt) and the feature extractor, used only to rank
    waveforms when num_waveforms_per_prompt > 1."""
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    text_cfg = ClapTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=vocab_size,
        hidden_size=c.clap_dim, intermediate_size=37, num_attention_heads=2,
        num_hidden_layers=2, layer_norm_eps=1e-5, projection_dim=c.clap_dim,
        max_position_embeddings=c.max_text_len + 4,
    )
    audio_cfg = ClapAudioConfig(
        spec_size=64, window_size=4, num_mel_bins=64, intermediate_size=37, layer_norm_eps=1e-5,
        depths=[2, 2], num_attention_heads=[2, 2], num_hidden_layers=2, hidden_size=192,
        projection_dim=c.clap_dim, patch_size=2, patch_stride=2, patch_embed_input_channels=4,
    )
    model = ClapModel(ClapConfig(text_config=text_cfg, audio_config=audio_cfg, projection_dim=c.clap_dim))
    return model, ClapFeatureExtractor(feature_size=64, sampling_rate=48000, hop_length=7900)


def _tiny_t5(c: TinyAudioLDM2Config, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(vocab_size=vocab_size, d_model=c.t5_dim, d_ff=37, d_kv=8, num_heads=2,
                 num_layers=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    )


def _tiny_gpt2(c: TinyAudioLDM2Config, vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(n_embd=c.gpt2_dim, n_head=2, n_layer=2, vocab_size=vocab_size,
                   n_ctx=99, n_positions=99, bos_token_id=0, eos_token_id=2)
    )
    model.config.max_new_tokens = c.max_new_tokens
    return model


def _tiny_vocoder(c: TinyAudioLDM2Config):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    return SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=c.mel_bins, sampling_rate=c.sampling_rate, upsample_initial_channel=16,
            upsample_rates=list(c.upsample_rates),
            upsample_kernel_sizes=[2 * r for r in c.upsample_rates],
            resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
            normalize_before=False,
        )
    )


def build_tiny(seed: int = 0, config: TinyAudioLDM2Config | None = None):
    """A complete random-weight ``AudioLDM2Pipeline`` built offline, generating in seconds on CPU.
    Every component is built from the same seed, in a fixed order."""
    import torch
    from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, DDIMScheduler

    from ._tokenizers import roberta_style, t5_style

    c = config or TinyAudioLDM2Config()
    tokenizer = roberta_style(c.max_text_len)
    tokenizer_2 = t5_style(c.max_text_len)

    torch.manual_seed(seed)
    unet = _tiny_unet(c)
    scheduler = DDIMScheduler(
        beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False,
    )
    torch.manual_seed(seed)
    vae = _tiny_vae(c)
    torch.manual_seed(seed)
    text_encoder, feature_extractor = _tiny_clap(c, len(tokenizer))
    torch.manual_seed(seed)
    text_encoder_2 = _tiny_t5(c, len(tokenizer_2))
    torch.manual_seed(seed)
    language_model = _tiny_gpt2(c, len(tokenizer))
    torch.manual_seed(seed)
    projection_model = AudioLDM2ProjectionModel(
        text_encoder_dim=c.clap_dim, text_encoder_1_dim=c.t5_dim, langauge_model_dim=c.gpt2_dim
    )
    torch.manual_seed(seed)
    vocoder = _tiny_vocoder(c)
    pipe = AudioLDM2Pipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        projection_model=projection_model, language_model=language_model,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, feature_extractor=feature_extractor,
        unet=unet, scheduler=scheduler, vocoder=vocoder,
    )
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # modules built from configs start in train mode (dropout on)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames_per_second(pipe) -> float:
    cfg = pipe.vocoder.config
    return cfg.sampling_rate / math.prod(cfg.upsample_rates)


def latent_shape(pipe, audio_length_in_s: float | None = None, batch: int = 1) -> tuple:
    """The latent ``(B, C, T_lat, F_lat)`` the pipeline denoises for this audio length.

    Mirrors ``AudioLDM2Pipeline.__call__``: mel frames are rounded up to a multiple of the
    VAE scale factor, then divided by it.
    """
    sf = pipe.vae_scale_factor
    if audio_length_in_s is None:
        height = pipe.unet.config.sample_size * sf
    else:
        height = int(audio_length_in_s * _frames_per_second(pipe))
        height = int(math.ceil(height / sf)) * sf
    mel = pipe.vocoder.config.model_in_dim
    if mel % sf:
        raise AibaError(f"audioldm2: vocoder model_in_dim {mel} is not a multiple of vae scale factor {sf}")
    return (batch, pipe.unet.config.in_channels, height // sf, mel // sf)


def audio_length_for(pipe, t_lat: int) -> float:
    """Seconds of audio whose latent has ``t_lat`` time rows (the inverse of ``latent_shape``)."""
    return t_lat * pipe.vae_scale_factor / _frames_per_second(pipe)


def stream_of(module_path: str, n_slots: int = 3) -> str:  # n_slots: len(cross_attention_dim[i])
    """``'self'``, ``'gpt2'`` or ``'t5'`` for an attention module path inside the UNet.

    ``attn1`` is always self-attention; ``attn2`` of ``attentions.{idx}`` takes slot
    ``idx % n_slots`` of ``[None, d1, d2]``. Raises for paths that are not UNet attentions.
    """
    m = _ATTN_RE.search(module_path)
    if m is None:
        raise AibaError(f"audioldm2: {module_path!r} is not an '...attentions.N.transformer_blocks.M.attn1|attn2' path")
    idx, which = int(m.group(1)), m.group(2)
    if which == "attn1":
        return "self"
    # slot order of [None, d1, d2] (base, music) or [None, d1, d2, None] (large)
    return ("self", "gpt2", "t5", "self")[idx % n_slots]


def cross_attention_paths(unet) -> dict:
    """``{module path: stream}`` for every attention module in a UNet (paths relative to it)."""
    from diffusers.models.attention_processor import Attention

    slots = [len(s) for s in unet.config.cross_attention_dim] if isinstance(
        unet.config.cross_attention_dim[0], (list, tuple)) else [1]
    out = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, Attention):
            out[name] = stream_of(name, n_slots=slots[0])
    return out


def t5_tokens(pipe, prompt: str) -> list:
    """The T5-stream key tokens for ``prompt`` as the pipeline tokenizes it (words then ``</s>``)."""
    ids = pipe.tokenizer_2(prompt, truncation=True, max_length=pipe.tokenizer_2.model_max_length).input_ids
    return pipe.tokenizer_2.convert_ids_to_tokens(ids)


# ------------------------------------------------------------------------- adapter
from .base import Backend, step_hook  # noqa: E402


class AudioLDM2Backend(Backend):
    """``AudioLDM2Pipeline`` adapter: streams ``gpt2`` / ``t5`` (cross) and ``self``.

    The GPT-2 keys are generated embeddings, not words: pool="mean" over them is the
    constant 1/k_len (the tap warns); read that stream with pool="max".
    """

    name = "audioldm2"
    prefix_tokens = 0
    default_steps = 3
    default_guidance = 3.5

    def __init__(self, pipe, seconds: float | None = None):
        self.pipe = pipe
        self.denoiser = pipe.unet
        self.default_seconds = seconds  # None: the pipeline's default (unet sample_size)
        self._streams = None

    @classmethod
    def tiny(cls, seed: int = 0, config: TinyAudioLDM2Config | None = None, **kw):
        return cls(build_tiny(seed=seed, config=config), **kw)

    @classmethod
    def from_pretrained(cls, model_id: str = "cvssp/audioldm2-music", device=None, dtype=None, **kw):
        return cls(load(model_id, device=device, dtype=dtype), **kw)

    def streams(self) -> dict:
        if self._streams is None:
            out: dict = {}
            for path, stream in cross_attention_paths(self.denoiser).items():
                out.setdefault(stream, []).append(path)
            self._streams = {s: out[s] for s in ("gpt2", "t5", "self") if s in out}
        return self._streams

    def latent_shape(self, seconds=None) -> tuple:
        s = self.default_seconds if seconds is None else seconds
        return latent_shape(self.pipe, s)[2:]  # (T_lat, F_lat)

    def cfg_order(self, guidance_scale) -> str | None:
        return "uncond_first" if guidance_scale > 1.0 else None

    def content(self, prompts) -> dict:
        """T5 words (``</s>`` and padding excluded), tokenized as the pipeline does (padding=True)."""
        tok = self.pipe.tokenizer_2
        enc = tok(list(prompts), padding=True, truncation=True, max_length=tok.model_max_length, return_tensors="pt")
        mask = enc.attention_mask.bool() & (enc.input_ids != tok.eos_token_id)  # (B, L)
        # keyed by the T5 layers' paths: the GPT-2 stream may have as many keys as the prompt
        return {path: mask for path in self.streams().get("t5", [])}

    def tokens(self, prompt: str) -> dict:
        return {"t5": t5_tokens(self.pipe, prompt)}

    def _generate(self, prompts, *, steps, guidance_scale, seed, seconds, on_step_end):
        import numpy as np
        import torch

        s = self.default_seconds if seconds is None else seconds
        gen = torch.Generator(device=self.pipe.device).manual_seed(seed)
        with step_hook(self.denoiser, on_step_end):
            out = self.pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
                            audio_length_in_s=s, generator=gen, output_type="np")
        return np.asarray(out.audios), int(self.pipe.vocoder.config.sampling_rate), True
