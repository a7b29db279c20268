"""Stable Audio Open backend: the stable-audio-tools DiT and diffusers' ``StableAudioPipeline``.

Facts (read from stable-audio-tools 0.0.19 and diffusers 0.42, and measured on the tiny
models built here with a counting wrapper on ``F.scaled_dot_product_attention``):

stable-audio-tools ``DiffusionTransformer`` (``global_cond_type="prepend"``):
- Latent ``(B, io_channels, T)``: a 1-D time lattice, no frequency axis. The transformer
  runs over ``1 + T`` tokens: the global embedding (seconds_start ++ seconds_total,
  projected, plus the timestep embedding) is PREPENDED as token 0. Strip it before mapping
  (``PREFIX_TOKENS``).
- Per block: self-attention q/k ``(B, heads, 1+T, d)``; cross-attention q
  ``(B, heads, 1+T, d)`` against the context ``cross_attn_cond`` = T5 tokens (padded to
  the tokenizer's max length, 128 in SAO) ++ 1 seconds_start ++ 1 seconds_total token
  (130 in SAO). The context mask is dropped in ``dit.py`` (padding tokens are zero vectors,
  still attended). Cross-attention k/v have ``cond_token_dim // dim_heads`` heads and are
  ``repeat_interleave``d to the query heads before the kernel, so the kernel sees equal
  heads. No mask is passed to the kernel for either call.
- Kernel: ``stable_audio_tools.models.transformer`` binds ``flash_attn_func`` as a module
  global at import (``None`` when flash_attn is absent) and calls it if set; else
  ``F.scaled_dot_product_attention`` (flex_attention only with a block mask).
- CFG inside ``DiffusionTransformer.forward(cfg_scale != 1)``: batch = ``cat([cond,
  uncond])``: the FIRST half is CONDITIONAL; the unconditional context is all zeros;
  the global embedding is the same in both halves.
- ``generate_diffusion_cond`` cannot run in a ``--no-deps`` install: it needs
  ``torchaudio`` (imported by ``inference/generation.py``, ABI-pinned to torch) and
  ``k_diffusion`` (whose ``__init__`` imports its evaluation/augmentation modules:
  torchvision, kornia, clean-fid, clip-anytorch, wandb, ...); the conditioners need
  ``einops_exts``. ``DiTSampler`` here is aiba's own sampling loop: the v-objective DDIM
  update of ``stable_audio_tools.inference.sampling.sample`` (eta = 0) over the DiT's own
  CFG forward, driven with ``cross_attn_cond`` / ``global_embed`` tensors.

diffusers ``StableAudioPipeline`` / ``StableAudioDiTModel``:
- Latent ``(B, in_channels, transformer.config.sample_size)`` whatever the requested
  length (the waveform is cut afterwards). The global states (B, 1, 2 * cross dim) are
  projected and prepended: self- and cross-attention queries have ``1 + T`` tokens.
- Context = projected T5 tokens (padded to ``model_max_length``, padding zeroed) ++
  seconds_start ++ seconds_end tokens; kv heads ``num_key_value_attention_heads``
  expanded to the query heads before ``F.scaled_dot_product_attention``.
- CFG: batch = ``cat([uncond, cond])``: the FIRST half is UNCONDITIONAL (all-zero
  context without a negative prompt), the opposite of stable-audio-tools.

Measured on the tiny builders here (T = 21 latent frames, CFG batch 2, 3 steps):
- ``build_tiny_dit`` (4 heads x 32, depth 2, context 12 T5 + 2 = 14 tokens of 64, kv heads
  2 -> 4): per forward 2 self calls q=k ``(2, 4, 22, 32)`` and 2 cross calls q
  ``(2, 4, 22, 32)`` k ``(2, 4, 14, 32)``, paths ``transformer.layers.{i}.self_attn`` /
  ``.cross_attn``, all via SDPA, no mask; context half 1 (uncond) is all zeros.
  ``DiTSampler`` 3 steps: ~0.03 s on CPU (build ~4 s, mostly imports).
- ``build_tiny_pipeline`` (4 heads x 8, kv 2, 2 layers, context 12 + 2 = 14 tokens of 16):
  per forward ``transformer_blocks.{i}.attn1`` q=k ``(2, 4, 22, 8)`` and ``.attn2`` q
  ``(2, 4, 22, 8)`` k ``(2, 4, 14, 8)``; the T5 text encoder also calls SDPA (filter by
  path); context half 0 (uncond) is all zeros. 3 steps: ~0.03 s, audio (1, 2, 84).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from aiba.errors import AibaError

__all__ = [
    "TinyDiTConfig", "TinySAOPipelineConfig", "load", "load_pipeline", "build_tiny_dit",
    "build_tiny_conditioner", "build_tiny_pipeline", "DiTSampler", "dit_attention_kinds",
    "PREFIX_TOKENS", "StableAudioBackend",
    "StableAudioDiffusersBackend",
]

PREFIX_TOKENS = 1  # the prepended global token of both DiTs, at query index 0


@dataclass(frozen=True)
class TinyDiTConfig:
    io_channels: int = 8  # latent channels (64 in SAO)
    embed_dim: int = 128  # head dim 32: the rotary embedding is max(head_dim // 2, 32) wide
    depth: int = 2
    num_heads: int = 4  # query heads; head dim = embed_dim // num_heads
    cond_token_dim: int = 64  # context token width; kv heads = cond_token_dim // head dim = 2
    global_cond_dim: int = 128  # seconds_start ++ seconds_total, each cond_token_dim wide
    max_text_len: int = 12  # T5 tokens, padded (128 in SAO): context = max_text_len + 2
    latent_len: int = 21  # default T (latent frames); odd on purpose
    max_seconds: float = 47.0  # NumberConditioner range of seconds_start / seconds_total


def build_tiny_dit(seed: int = 0, config: TinyDiTConfig | None = None):
    """A random-weight stable-audio-tools ``DiffusionTransformer`` shaped like SAO's, tiny."""
    import torch
    from stable_audio_tools.models.dit import DiffusionTransformer

    c = config or TinyDiTConfig()
    torch.manual_seed(seed)
    dit = DiffusionTransformer(
        io_channels=c.io_channels,
        embed_dim=c.embed_dim,
        depth=c.depth,
        num_heads=c.num_heads,
        cond_token_dim=c.cond_token_dim,
        global_cond_dim=c.global_cond_dim,
        project_cond_tokens=False,
        transformer_type="continuous_transformer",
        global_cond_type="prepend",
    )
    # SAO zero-initialises these convs and trains them; random values keep the tiny
    # model's output dependent on every path.
    for conv in (dit.preprocess_conv, dit.postprocess_conv):
        torch.nn.init.normal_(conv.weight, std=0.02)
    return dit.eval()


class _NumberEmbedder:
    """Seconds -> one token, as SAO's ``NumberConditioner``: clamp, normalise to [0, 1],
    learned Fourier features then a linear layer (stable_audio_tools.models.adp)."""

    def __new__(cls, dim: int, max_val: float):
        import torch
        from torch import nn

        class NumberEmbedder(nn.Module):
            def __init__(self):
                super().__init__()
                self.max_val = max_val
                self.weights = nn.Parameter(torch.randn(8))  # learned frequencies
                self.to_out = nn.Linear(2 * 8 + 1, dim)

            def forward(self, seconds):  # (B,) -> (B, 1, dim)
                x = seconds.float().clamp(0, self.max_val)[:, None] / self.max_val  # (B, 1)
                freqs = x * self.weights[None, :] * 2 * math.pi  # (B, 8)
                fouriered = torch.cat([x, freqs.sin(), freqs.cos()], dim=-1)  # (B, 17)
                return self.to_out(fouriered)[:, None, :]  # (B, 1, dim)

        return NumberEmbedder()


def build_tiny_conditioner(seed: int = 0, config: TinyDiTConfig | None = None):
    """Tiny SAO-style conditioning: prompt + seconds -> (cross_attn_cond, global_embed).

    Returns ``cond(prompts, seconds_start, seconds_total)`` giving
    ``cross_attn_cond (B, max_text_len + 2, cond_token_dim)`` (T5 tokens padded and zeroed
    past the prompt, then the seconds_start and seconds_total tokens) and
    ``global_embed (B, 2 * cond_token_dim)``, with ``cond.tokens(prompt)`` the key tokens.
    """
    import torch
    from transformers import T5Config, T5EncoderModel

    from ._tokenizers import t5_style

    c = config or TinyDiTConfig()
    if c.global_cond_dim != 2 * c.cond_token_dim:
        raise AibaError(
            f"stable-audio: global_cond_dim {c.global_cond_dim} must be 2 * cond_token_dim "
            f"({2 * c.cond_token_dim}): it is seconds_start ++ seconds_total"
        )
    tokenizer = t5_style(c.max_text_len)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=c.cond_token_dim, d_ff=48,
                                 d_kv=8, num_heads=2, num_layers=2, pad_token_id=0,
                                 eos_token_id=1, decoder_start_token_id=0)).eval()
    start, total = _NumberEmbedder(c.cond_token_dim, c.max_seconds), _NumberEmbedder(c.cond_token_dim, c.max_seconds)
    start.eval(), total.eval()

    @torch.no_grad()
    def cond(prompts, seconds_start, seconds_total):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        enc = tokenizer(prompts, padding="max_length", max_length=c.max_text_len,
                        truncation=True, return_tensors="pt")
        text = t5(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state  # (B, L, D)
        text = text * enc.attention_mask[..., None].to(text.dtype)  # padding -> zero vectors
        b = len(prompts)
        s0 = start(torch.as_tensor(seconds_start, dtype=torch.float32).expand(b))  # (B, 1, D)
        s1 = total(torch.as_tensor(seconds_total, dtype=torch.float32).expand(b))  # (B, 1, D)
        cross = torch.cat([text, s0, s1], dim=1)  # (B, L + 2, D)
        glob = torch.cat([s0, s1], dim=-1)[:, 0]  # (B, 2D)
        return cross, glob

    def tokens(prompt: str) -> list:
        """Key tokens of the context: T5 tokens (padded), then the two seconds tokens."""
        ids = tokenizer(prompt, padding="max_length", max_length=c.max_text_len, truncation=True).input_ids
        return tokenizer.convert_ids_to_tokens(ids) + ["<seconds_start>", "<seconds_total>"]

    cond.tokens = tokens
    cond.modules = (t5, start, total)
    return cond


@dataclass
class DiTSampler:
    """aiba's sampling loop for a stable-audio-tools DiT (v objective, DDIM with eta = 0).

    The update is ``stable_audio_tools.inference.sampling.sample``: with
    ``alpha, sigma = cos(t pi/2), sin(t pi/2)``, ``pred = x alpha - v sigma``,
    ``eps = x sigma + v alpha``, ``x <- pred alpha' + eps sigma'``. CFG is the DiT's own
    (``cfg_scale`` passed to its forward). ``on_step(i, t)`` runs before each forward.
    """

    model: object  # a DiffusionTransformer
    steps: int = 3
    cfg_scale: float = 7.0  # SAO's default guidance
    on_step: object = None  # callable(step_index, t) or None

    def __call__(self, noise, cross_attn_cond, global_embed):
        import torch

        x = noise
        ts = torch.linspace(1, 0, self.steps + 1, device=x.device)
        alphas, sigmas = torch.cos(ts * math.pi / 2), torch.sin(ts * math.pi / 2)
        with torch.no_grad():
            for i in range(self.steps):
                if self.on_step is not None:
                    self.on_step(i, float(ts[i]))
                t = ts[i].expand(x.shape[0])  # (B,)
                v = self.model(x, t, cross_attn_cond=cross_attn_cond, global_embed=global_embed,
                               cfg_scale=self.cfg_scale).float()
                pred = x * alphas[i] - v * sigmas[i]
                eps = x * sigmas[i] + v * alphas[i]
                x = pred * alphas[i + 1] + eps * sigmas[i + 1]
        return x  # (B, io_channels, T): the last step has sigma' = 0, so x = pred


def dit_attention_kinds(dit) -> dict:
    """``{module path: 'self' | 'cross'}`` for every attention module of a SAT DiT."""
    from stable_audio_tools.models.transformer import Attention

    out = {}
    for name, mod in dit.named_modules():
        if isinstance(mod, Attention):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in ("self_attn", "cross_attn"):
                raise AibaError(f"stable-audio: unexpected attention module {name!r}")
            out[name] = "self" if leaf == "self_attn" else "cross"
    return out


def load(model_id: str = "stabilityai/stable-audio-open-1.0", device=None, dtype=None):
    """Load the real SAO model with stable-audio-tools (``(model, model_config)``).

    Needs the weights (hub access) and stable-audio-tools' generation dependencies
    (torchaudio, k-diffusion, einops-exts, ...), which a ``--no-deps`` install lacks.
    """
    import torch

    try:
        from stable_audio_tools import get_pretrained_model
    except ImportError as e:
        raise AibaError(
            f"stable-audio: stable_audio_tools.get_pretrained_model cannot be imported ({e}); "
            "it needs torchaudio and k-diffusion besides the DiT's modules"
        ) from None
    from ._hub import checkpoint_guard

    try:
        with checkpoint_guard(model_id, "stable-audio"):
            model, model_config = get_pretrained_model(model_id)
    except ImportError as e:  # the checkpoint's model_config.json names modules a --no-deps install lacks
        raise AibaError(f"stable-audio: building {model_id} from its model_config.json needs {e.name or e} "
                        f"({e}); install stable-audio-tools' generation dependencies (torchaudio, k-diffusion, "
                        "einops-exts), or use --backend stable-audio-diffusers", kind="missing") from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), model_config


def load_pipeline(model_id: str = "stabilityai/stable-audio-open-1.0", device=None, dtype=None):
    """Load the real SAO model as diffusers' ``StableAudioPipeline``."""
    import torch
    from diffusers import StableAudioPipeline

    from ._hub import checkpoint_guard

    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    with checkpoint_guard(model_id, "stable-audio-diffusers"):
        pipe = StableAudioPipeline.from_pretrained(model_id, **kwargs)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return pipe.to(device)


@dataclass(frozen=True)
class TinySAOPipelineConfig:
    latent_len: int = 21  # transformer sample_size = T latent frames; odd on purpose
    latent_channels: int = 8  # in/out channels of the DiT (64 in SAO)
    num_layers: int = 2
    head_dim: int = 8  # attention_head_dim (64 in SAO)
    num_heads: int = 4  # query heads (24 in SAO)
    kv_heads: int = 2  # num_key_value_attention_heads (12 in SAO)
    cross_dim: int = 16  # cross_attention_dim: context token width after projection
    t5_dim: int = 24  # tiny T5 d_model
    max_text_len: int = 12  # tokenizer model_max_length (128 in SAO)
    sampling_rate: int = 4000  # VAE audio rate
    downsampling_ratios: tuple = (2, 2)  # Oobleck hop = product = 4 samples per latent frame


def _tiny_scheduler():
    """SAO's ``CosineDPMSolverMultistepScheduler`` when torchsde is installed, else the
    deterministic ``EDMDPMSolverMultistepScheduler`` with the same v-prediction settings."""
    from diffusers.utils import is_torchsde_available

    kwargs = dict(solver_order=2, prediction_type="v_prediction", sigma_data=1.0,
                  sigma_schedule="exponential")
    if is_torchsde_available():
        from diffusers import CosineDPMSolverMultistepScheduler

        return CosineDPMSolverMultistepScheduler(**kwargs)
    from diffusers import EDMDPMSolverMultistepScheduler

    return EDMDPMSolverMultistepScheduler(**kwargs)


def build_tiny_pipeline(seed: int = 0, config: TinySAOPipelineConfig | None = None):
    """A complete random-weight diffusers ``StableAudioPipeline`` built offline."""
    import torch
    from diffusers import (
        AutoencoderOobleck,
        StableAudioDiTModel,
        StableAudioPipeline,
        StableAudioProjectionModel,
    )
    from transformers import T5Config, T5EncoderModel

    from ._tokenizers import t5_style

    c = config or TinySAOPipelineConfig()
    tokenizer = t5_style(c.max_text_len)
    torch.manual_seed(seed)
    transformer = StableAudioDiTModel(
        sample_size=c.latent_len,
        in_channels=c.latent_channels,
        num_layers=c.num_layers,
        attention_head_dim=c.head_dim,
        num_attention_heads=c.num_heads,
        num_key_value_attention_heads=c.kv_heads,
        out_channels=c.latent_channels,
        cross_attention_dim=c.cross_dim,
        time_proj_dim=16,
        global_states_input_dim=2 * c.cross_dim,
        cross_attention_input_dim=c.cross_dim,
    )
    scheduler = _tiny_scheduler()
    torch.manual_seed(seed)
    vae = AutoencoderOobleck(
        encoder_hidden_size=8,
        downsampling_ratios=list(c.downsampling_ratios),
        decoder_channels=8,
        decoder_input_channels=c.latent_channels,
        audio_channels=2,
        channel_multiples=[1, 2],
        sampling_rate=c.sampling_rate,
    )
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=c.t5_dim, d_ff=37,
                                           d_kv=8, num_heads=2, num_layers=2, pad_token_id=0,
                                           eos_token_id=1, decoder_start_token_id=0))
    torch.manual_seed(seed)
    max_seconds = c.latent_len * math.prod(c.downsampling_ratios) / c.sampling_rate
    projection_model = StableAudioProjectionModel(
        text_encoder_dim=c.t5_dim, conditioning_dim=c.cross_dim, min_value=0,
        max_value=max(1, math.ceil(max_seconds)),
    )
    pipe = StableAudioPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, projection_model=projection_model,
    )
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # modules built from configs start in train mode (dropout on)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latent_shape(pipe, batch: int = 1) -> tuple:
    """The latent ``(B, C, T)`` diffusers' StableAudioPipeline denoises (fixed by sample_size)."""
    cfg = pipe.transformer.config
    return (batch, cfg.in_channels, int(cfg.sample_size))


# ------------------------------------------------------------------------- adapters
from .base import Backend, step_hook  # noqa: E402

_NOT_WORDS = frozenset({"<pad>", "</s>", "<unk>", "<seconds_start>", "<seconds_total>"})


def _tiny_oobleck(c: TinyDiTConfig, seed: int, sampling_rate: int = 4000, ratios=(2, 2)):
    """A tiny random diffusers ``AutoencoderOobleck`` (SAO's autoencoder family) to decode the
    tiny DiT's latents into stereo audio; None when diffusers is missing."""
    try:
        import torch
        from diffusers import AutoencoderOobleck
    except ImportError:
        return None
    torch.manual_seed(seed)
    return AutoencoderOobleck(encoder_hidden_size=8, downsampling_ratios=list(ratios), decoder_channels=8,
                              decoder_input_channels=c.io_channels, audio_channels=2, channel_multiples=[1, 2],
                              sampling_rate=sampling_rate).eval()


class StableAudioBackend(Backend):
    """stable-audio-tools ``DiffusionTransformer`` driven by aiba's :class:`DiTSampler`.

    ``generate_diffusion_cond`` needs torchaudio and k-diffusion, which a ``--no-deps``
    install lacks; the DiT is run with ``cross_attn_cond`` / ``global_embed`` tensors from
    ``conditioner(prompts, seconds_start, seconds_total)``. Streams ``t5`` (cross, context =
    T5 tokens ++ seconds_start ++ seconds_total) and ``self``; 1-D time lattice, one
    prepended global token (stripped), CFG batch ``cat([cond, uncond])``.
    """

    name = "stable-audio"
    prefix_tokens = PREFIX_TOKENS
    default_steps = 3
    default_guidance = 7.0

    def __init__(self, dit, conditioner, decoder=None, *, sample_rate: int, hop: int, latent_len: int):
        self.denoiser = dit
        self.conditioner = conditioner  # cond(prompts, seconds_start, seconds_total) -> (cross, global)
        self.decoder = decoder  # latents (B, C, T) -> audio (B, ch, samples), or None
        self.sample_rate, self.hop, self.latent_len = int(sample_rate), int(hop), int(latent_len)
        self.io_channels = int(dit.preprocess_conv.in_channels)  # latent channels

    @classmethod
    def tiny(cls, seed: int = 0, config: TinyDiTConfig | None = None):
        c = config or TinyDiTConfig()
        vae = _tiny_oobleck(c, seed)
        decoder = None if vae is None else (lambda z: vae.decode(z).sample)
        return cls(build_tiny_dit(seed, c), build_tiny_conditioner(seed, c), decoder,
                   sample_rate=4000, hop=4, latent_len=c.latent_len)

    @classmethod
    def from_pretrained(cls, model_id: str = "stabilityai/stable-audio-open-1.0", device=None, dtype=None):
        """The real SAO model (needs stable-audio-tools' conditioner dependencies and the weights)."""
        model, config = load(model_id, device=device, dtype=dtype)
        dev = next(model.parameters()).device

        def cond(prompts, seconds_start, seconds_total):
            meta = [{"prompt": p, "seconds_start": seconds_start, "seconds_total": seconds_total} for p in prompts]
            inputs = model.get_conditioning_inputs(model.conditioner(meta, dev))
            return inputs["cross_attn_cond"], inputs["global_cond"]

        prompt_cond = model.conditioner.conditioners["prompt"]

        def tokens(prompt):
            tok = prompt_cond.tokenizer
            ids = tok(prompt, padding="max_length", max_length=prompt_cond.max_length, truncation=True).input_ids
            return tok.convert_ids_to_tokens(ids) + ["<seconds_start>", "<seconds_total>"]

        cond.tokens = tokens
        pre = model.pretransform
        return cls(model.model.model, cond, lambda z: pre.decode(z), sample_rate=config["sample_rate"],
                   hop=pre.downsampling_ratio, latent_len=config["sample_size"] // pre.downsampling_ratio)

    def streams(self) -> dict:
        kinds = dit_attention_kinds(self.denoiser)
        return {"t5": [p for p, k in kinds.items() if k == "cross"], "self": [p for p, k in kinds.items() if k == "self"]}

    def _latent_len(self, seconds) -> int:
        return self.latent_len if seconds is None else max(1, math.ceil(seconds * self.sample_rate / self.hop))

    def latent_shape(self, seconds=None) -> tuple:
        return (self._latent_len(seconds),)

    def cfg_order(self, guidance_scale) -> str | None:
        return "cond_first" if guidance_scale != 1.0 else None

    def content(self, prompts) -> dict:
        import torch

        rows = [[t not in _NOT_WORDS for t in self.conditioner.tokens(p)] for p in prompts]
        mask = torch.tensor(rows, dtype=torch.bool)  # (B, L + 2)
        return {mask.shape[1]: mask}

    def tokens(self, prompt: str) -> dict:
        return {"t5": self.conditioner.tokens(prompt)}

    def _generate(self, prompts, *, steps, guidance_scale, seed, seconds, on_step_end):
        import torch

        t = self._latent_len(seconds)
        total = t * self.hop / self.sample_rate
        cross, glob = self.conditioner(prompts, 0.0, total)
        p = next(self.denoiser.parameters())
        noise = torch.randn(len(prompts), self.io_channels, t, generator=torch.Generator().manual_seed(seed))
        noise = noise.to(p.device, p.dtype)

        def on_step(i, _t):
            if i > 0 and on_step_end is not None:
                on_step_end()  # step i-1 has ended

        z = DiTSampler(self.denoiser, steps=steps, cfg_scale=guidance_scale, on_step=on_step)(
            noise, cross.to(p.device, p.dtype), glob.to(p.device, p.dtype))
        if on_step_end is not None:
            on_step_end()  # the last step
        if self.decoder is None:
            return z.float().cpu().numpy(), self.sample_rate, False
        with torch.no_grad():
            audio = self.decoder(z)
        return audio.float().cpu().numpy(), self.sample_rate, True


class StableAudioDiffusersBackend(Backend):
    """diffusers ``StableAudioPipeline`` adapter: streams ``t5`` (``attn2``) and ``self``
    (``attn1``); 1-D time lattice of ``transformer.config.sample_size`` frames, one prepended
    global token, CFG batch ``cat([uncond, cond])``."""

    name = "stable-audio-diffusers"
    prefix_tokens = PREFIX_TOKENS
    default_steps = 3
    default_guidance = 7.0

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = pipe.transformer

    @classmethod
    def tiny(cls, seed: int = 0, config: TinySAOPipelineConfig | None = None):
        return cls(build_tiny_pipeline(seed, config))

    @classmethod
    def from_pretrained(cls, model_id: str = "stabilityai/stable-audio-open-1.0", device=None, dtype=None):
        return cls(load_pipeline(model_id, device=device, dtype=dtype))

    def streams(self) -> dict:
        from diffusers.models.attention_processor import Attention

        out = {"t5": [], "self": []}
        for name, mod in self.denoiser.named_modules():
            if isinstance(mod, Attention):
                out["t5" if name.endswith("attn2") else "self"].append(name)
        return out

    def latent_shape(self, seconds=None) -> tuple:
        return pipeline_latent_shape(self.pipe)[2:]  # fixed by sample_size; audio is cut afterwards

    def cfg_order(self, guidance_scale) -> str | None:
        return "uncond_first" if guidance_scale > 1.0 else None

    def content(self, prompts) -> dict:
        import torch

        tok = self.pipe.tokenizer
        enc = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        words = enc.attention_mask.bool() & (enc.input_ids != tok.eos_token_id)  # (B, L)
        mask = torch.cat([words, torch.zeros(len(prompts), 2, dtype=torch.bool)], dim=1)  # (B, L + 2): + seconds
        return {mask.shape[1]: mask}

    def tokens(self, prompt: str) -> dict:
        tok = self.pipe.tokenizer
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        return {"t5": tok.convert_ids_to_tokens(ids) + ["<seconds_start>", "<seconds_end>"]}

    def _generate(self, prompts, *, steps, guidance_scale, seed, seconds, on_step_end):
        import numpy as np
        import torch

        gen = torch.Generator(device=self.pipe.device).manual_seed(seed)
        kw = {} if seconds is None else {"audio_end_in_s": seconds}
        with step_hook(self.denoiser, on_step_end):
            out = self.pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen,
                            output_type="np", **kw)
        return np.asarray(out.audios), int(self.pipe.vae.config.sampling_rate), True
