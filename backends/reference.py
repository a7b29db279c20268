"""The reference backend: a small text-to-mel diffusion model trained on mini-Slakh.

It is the positive control of the project: a model small enough to train on a CPU and
ship inside the package (a few MB of safetensors), whose instrument words really steer
where energy goes on the mel axis, so a capture + mapping + scoring pipeline that works
must recover that alignment from its attention.

Architecture (all in this module; nothing is downloaded):

- **Tokenizer** (:class:`WordTokenizer`): lower-cased words split on non-letters, a fixed
  vocabulary built from the prompt templates and instrument words, ``<pad>`` to a fixed
  length (``max_len``), ``<unk>`` for anything else. ``tokenizer.index(prompt, "bass")``
  gives the key positions of a word, so nobody counts tokens by hand.
- **Text encoder** (:class:`TokenEmbedding`): a learned token table plus a learned
  position table, summed. No layer mixes tokens, so the key of the word "bass" is the
  only key that carries the class: attention to it is attention to the instrument.
- **Denoiser**: a diffusers ``UNet2DConditionModel`` on a one-channel mel image
  ``(B, 1, frames, 64)`` (height = time, width = mel rows, low to high), channels
  (32, 64), one layer per block, a second input channel holding each mel row's position
  (so a word's attention can depend on the row even at high noise), ``only_cross_attention=True`` in the down and up blocks
  (``attn1`` and ``attn2`` both attend to the words; the mid block's ``attn1`` is
  self-attention). Epsilon objective, cosine noise schedule (1000 steps), 10 % prompt
  dropout (the all-``<pad>`` prompt) for classifier-free guidance.
- **Sampler** (:meth:`ReferenceModel.sample`): DDIM (eta 0) with guidance, the batch
  doubled as ``[uncond, cond]``; ``callback_on_step_end`` is called after every step.
- **Features and audio**: log-mel on aiba's grid (:data:`aiba.align.audio.AUDIOLDM2_MEL`:
  16 kHz, hop 160, 64 Slaney mels, 0-8 kHz), scaled by fixed constants to about unit
  range (:func:`mel_to_feature`); audio by librosa's Griffin-Lim mel inversion.

Shipped weights: ``reference_weights/seed*.safetensors`` next to this file, each with a
``.json`` provenance (command, seed, steps, data, final loss, sha256). Reproduce them with
``aiba train-reference --out DIR --seed S --steps N`` on ``aiba make-dataset`` output.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aiba.data.slakh import PAPER_CLASSES
from aiba.errors import AibaError
from aiba.runs.config import DEFAULT_TEMPLATES

from .base import Backend

__all__ = [
    "CLASSES", "WORDS", "SINGLE_TEMPLATES", "PAIR_TEMPLATES", "ReferenceConfig", "WordTokenizer",
    "ReferenceModel", "ReferenceBackend", "mel_to_feature", "feature_to_mel", "feature_to_audio",
    "weights_dir", "shipped_weights", "shipped_templates", "load_weights", "sha256_file",
]

CLASSES = PAPER_CLASSES
WORDS = {c: c.lower() for c in CLASSES}  # the prompt word of each class
SINGLE_TEMPLATES = DEFAULT_TEMPLATES
PAIR_TEMPLATES = ("{a} and {b} playing together",)

# log-mel scaling: feature = (log10(power + EPS) - CENTER) / SCALE
LOG_EPS = 1e-6
LOG_CENTER = -2.5
LOG_SCALE = 2.5


@dataclass(frozen=True)
class ReferenceConfig:
    """Architecture of the reference model (saved with its weights)."""

    channels: tuple = (32, 64)
    layers_per_block: int = 1
    heads: int = 8  # diffusers' attention_head_dim, read as the number of heads
    embed_dim: int = 64  # token + position embedding width = cross-attention key dim
    max_len: int = 8  # prompt length in tokens (padded)
    frames: int = 8  # training crop length (mel frames of 10 ms)
    n_mels: int = 64
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    freq_channel: bool = True  # a second input channel holding each mel row's position (-1..1)
    vocab: tuple = ()

    def to_json(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["vocab"] = list(self.vocab)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ReferenceConfig":
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        d["vocab"] = tuple(d["vocab"])
        return cls(**d)


def default_vocab() -> tuple:
    words = set()
    for t in SINGLE_TEMPLATES + PAIR_TEMPLATES:
        words.update(w for w in re.findall(r"[a-z]+", t.lower()) if w not in ("instrument",))
    words.update(WORDS.values())
    return ("<pad>", "<unk>") + tuple(sorted(words))


class WordTokenizer:
    """Word-level tokenizer: ``encode(prompt) -> (max_len,)`` ids, ``<pad>`` = 0, ``<unk>`` = 1."""

    def __init__(self, vocab, max_len: int = 8):
        self.vocab = tuple(vocab)
        if self.vocab[:2] != ("<pad>", "<unk>"):
            raise AibaError(f"vocabulary must start with <pad>, <unk>; got {self.vocab[:2]}")
        self.max_len = int(max_len)
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @staticmethod
    def split(prompt: str) -> list[str]:
        return re.findall(r"[a-z]+", prompt.lower())

    def tokens(self, prompt: str) -> list[str]:
        """The prompt's key tokens, padding included (length ``max_len``)."""
        words = self.split(prompt)
        if len(words) > self.max_len:
            raise AibaError(f"prompt {prompt!r} has {len(words)} words; the reference model takes at most "
                            f"{self.max_len}")
        return [w if w in self.ids else "<unk>" for w in words] + ["<pad>"] * (self.max_len - len(words))

    def encode(self, prompts):
        """``(B, max_len)`` int64 ids of a prompt or a list of prompts ("" = the unconditional prompt)."""
        import torch

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return torch.tensor([[self.ids[t] for t in self.tokens(p)] for p in prompts], dtype=torch.long)

    def index(self, prompt: str, word: str) -> list[int]:
        """Key positions of ``word`` in ``prompt`` (AibaError when it is absent)."""
        toks = self.tokens(prompt)
        w = word.lower()
        idx = [i for i, t in enumerate(toks) if t == w]
        if not idx:
            raise AibaError(f"word {word!r} is not a token of {prompt!r}; tokens: {toks}")
        return idx

    def content_mask(self, prompts):
        """``(B, max_len)`` bool: the prompt's words (not padding)."""
        import torch

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return torch.tensor([[t != "<pad>" for t in self.tokens(p)] for p in prompts], dtype=torch.bool)


def _torch_modules():
    import torch
    from torch import nn

    class TokenEmbedding(nn.Module):
        """Learned token + position tables, summed: ``(B, L) ids -> (B, L, D)``."""

        def __init__(self, vocab_size: int, max_len: int, dim: int):
            super().__init__()
            self.token = nn.Embedding(vocab_size, dim)
            self.position = nn.Parameter(torch.zeros(max_len, dim))
            nn.init.normal_(self.token.weight, std=1.0)
            nn.init.normal_(self.position, std=0.3)

        def forward(self, ids):
            return self.token(ids) + self.position[: ids.shape[1]]  # (B, L, D)

    return TokenEmbedding


def build_unet(cfg: ReferenceConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.channels)
    return UNet2DConditionModel(
        sample_size=(cfg.frames, cfg.n_mels), in_channels=2 if cfg.freq_channel else 1, out_channels=1,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.embed_dim, attention_head_dim=cfg.heads, only_cross_attention=True,
        norm_num_groups=8,
    )


class ReferenceModel:
    """Tokenizer + token/position embedding + UNet + schedulers, on one device."""

    def __init__(self, cfg: ReferenceConfig | None = None, *, seed: int = 0, device: str = "cpu"):
        import torch

        cfg = cfg or ReferenceConfig()
        if not cfg.vocab:
            cfg = ReferenceConfig(**{**asdict(cfg), "vocab": default_vocab()})
        self.cfg = cfg
        self.tokenizer = WordTokenizer(cfg.vocab, cfg.max_len)
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            self.embed = _torch_modules()(len(cfg.vocab), cfg.max_len, cfg.embed_dim)
            self.unet = build_unet(cfg)
        self.device = torch.device(device)
        self.embed.to(self.device)
        self.unet.to(self.device)
        self.meta: dict = {}

    # ---------------------------------------------------------------- weights
    def state_dict(self) -> dict:
        sd = {f"embed.{k}": v for k, v in self.embed.state_dict().items()}
        sd.update({f"unet.{k}": v for k, v in self.unet.state_dict().items()})
        return sd

    def load_state_dict(self, sd: dict) -> None:
        e = {k[6:]: v for k, v in sd.items() if k.startswith("embed.")}
        u = {k[5:]: v for k, v in sd.items() if k.startswith("unet.")}
        self.embed.load_state_dict(e)
        self.unet.load_state_dict(u)

    def parameters(self):
        return list(self.embed.parameters()) + list(self.unet.parameters())

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path, meta: dict | None = None) -> Path:
        """safetensors of the weights, with the config (and ``meta``) in its metadata."""
        from safetensors.torch import save_file

        from aiba.atomic import atomic_write

        sd = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        # one metadata entry: safetensors writes its metadata map in no fixed order, so
        # a single key keeps the file (and its sha256) a function of the weights alone
        md = {"aiba_reference": json.dumps({"config": self.cfg.to_json(), "meta": meta or {}}, sort_keys=True)}
        return atomic_write(path, lambda p: save_file(sd, str(p), metadata=md))

    @classmethod
    def load(cls, path, device: str = "cpu") -> "ReferenceModel":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise AibaError(f"reference weights not found: {path}")
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
        if "aiba_reference" not in md:
            raise AibaError(f"{path}: no reference-model config in the safetensors metadata")
        info = json.loads(md["aiba_reference"])
        m = cls(ReferenceConfig.from_json(info["config"]), device=device)
        m.load_state_dict(load_file(str(path), device=str(m.device)))
        m.meta = info.get("meta", {})
        return m

    # ---------------------------------------------------------------- model
    def encode(self, prompts):
        """``(B, max_len, embed_dim)`` key/value context of the prompts."""
        return self.embed(self.tokenizer.encode(prompts).to(self.device))

    def unet_input(self, x):
        """``(B, 1, T, F)`` noisy mel -> the UNet input ``(B, 2, T, F)``: the mel and a fixed
        channel holding each mel row's position, -1 (lowest) to 1 (highest)."""
        import torch

        if not self.cfg.freq_channel:
            return x
        ramp = torch.linspace(-1.0, 1.0, x.shape[-1], device=x.device, dtype=x.dtype)  # (F,)
        return torch.cat([x, ramp.expand(x.shape[0], 1, x.shape[2], x.shape[3])], dim=1)

    def denoise(self, x, t, context):
        """Predicted noise ``(B, 1, T, F)`` of the noisy mel ``x`` at timestep(s) ``t``."""
        return self.unet(self.unet_input(x), t, encoder_hidden_states=context).sample

    def train_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(num_train_timesteps=self.cfg.train_timesteps, beta_schedule=self.cfg.beta_schedule,
                             prediction_type="epsilon")

    def sample(self, prompts, *, steps: int = 25, guidance_scale: float = 3.0, seed: int = 0,
               frames: int | None = None, callback_on_step_end=None):
        """DDIM (eta 0) with classifier-free guidance: ``(B, frames, n_mels)`` features.

        The UNet sees ``cat([uncond, cond])`` when ``guidance_scale > 1``, else the
        conditional batch only. ``callback_on_step_end(step_index)`` runs after each step.
        """
        import torch
        from diffusers import DDIMScheduler

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        frames = self.cfg.frames if frames is None else int(frames)
        if frames % (2 ** (len(self.cfg.channels) - 1)):
            raise AibaError(f"frames must be a multiple of {2 ** (len(self.cfg.channels) - 1)}, got {frames}")
        if steps < 1:
            raise AibaError(f"steps must be >= 1, got {steps}")
        sched = DDIMScheduler(num_train_timesteps=self.cfg.train_timesteps, beta_schedule=self.cfg.beta_schedule,
                              prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True)
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(int(seed))
        B = len(prompts)
        x = torch.randn(B, 1, frames, self.cfg.n_mels, generator=gen).to(self.device)  # (B, 1, T, F)
        cfg_on = guidance_scale > 1.0
        with torch.no_grad():
            cond = self.encode(prompts)
            ctx = torch.cat([self.encode([""] * B), cond]) if cfg_on else cond  # (2B or B, L, D)
            for i, t in enumerate(sched.timesteps):
                inp = torch.cat([x, x]) if cfg_on else x
                eps = self.denoise(inp, t, ctx)
                if cfg_on:
                    e_u, e_c = eps.chunk(2)
                    eps = e_u + guidance_scale * (e_c - e_u)
                x = sched.step(eps, t, x).prev_sample
                if callback_on_step_end is not None:
                    callback_on_step_end(i)
        return x[:, 0].cpu().numpy()  # (B, T, F)


# ----------------------------------------------------------------- features and audio
def mel_to_feature(power):
    """Mel power ``(frames, n_mels)`` -> model feature (log10, scaled to about [-1, 1])."""
    import numpy as np

    return ((np.log10(np.asarray(power, dtype=np.float64) + LOG_EPS) - LOG_CENTER) / LOG_SCALE).astype(np.float32)


def feature_to_mel(feature):
    """Inverse of :func:`mel_to_feature`: mel power, clipped at 0."""
    import numpy as np

    f = np.asarray(feature, dtype=np.float64)
    return np.clip(10.0 ** (f * LOG_SCALE + LOG_CENTER) - LOG_EPS, 0, None)


def feature_to_audio(feature, n_iter: int = 32):
    """Griffin-Lim audio of one ``(frames, n_mels)`` feature on aiba's mel settings.

    The mel power is mapped back to a linear-frequency magnitude with the pseudo-inverse of
    librosa's mel filter bank (clipped at 0; faster than librosa's NNLS inversion), then
    ``librosa.griffinlim`` recovers a phase.
    """
    import librosa
    import numpy as np

    from aiba.align.audio import AUDIOLDM2_MEL as c

    S = feature_to_mel(feature).T  # (n_mels, frames) power
    basis = librosa.filters.mel(sr=c.sr, n_fft=c.n_fft, n_mels=c.n_mels, fmin=c.fmin, fmax=c.fmax, htk=c.htk)
    lin = np.clip(np.linalg.pinv(basis) @ S, 0, None) ** (1.0 / c.power)  # (1 + n_fft/2, frames) magnitude
    y = librosa.griffinlim(lin, n_iter=n_iter, hop_length=c.hop_length, win_length=c.win_length, n_fft=c.n_fft,
                           random_state=0)
    return np.asarray(y, dtype=np.float32)


# ----------------------------------------------------------------- shipped weights
def weights_dir() -> Path:
    return Path(__file__).with_name("reference_weights")


def shipped_weights() -> dict:
    """``{name: safetensors path}`` of the weights shipped in the package (e.g. ``seed0``)."""
    d = weights_dir()
    return {p.stem: p for p in sorted(d.glob("*.safetensors"))} if d.is_dir() else {}


def shipped_templates():
    """The data-driven templates (:class:`aiba.align.templates.DataTemplates`) of the training
    stems the shipped weights were trained on (``reference_weights/templates.npz``)."""
    from aiba.align.templates import DataTemplates

    return DataTemplates.load(weights_dir() / "templates.npz")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_weights(name: str | None = None, device: str = "cpu") -> ReferenceModel:
    """Load shipped weights by name (default: the first, ``seed0``) or a path to a safetensors file."""
    if name is not None and (str(name).endswith(".safetensors") or Path(str(name)).is_file()):
        return ReferenceModel.load(name, device)
    have = shipped_weights()
    if not have:
        raise AibaError(f"no reference weights shipped in {weights_dir()}; train some with "
                        "`aiba train-reference --out DIR`")
    key = name or next(iter(have))
    if key not in have:
        raise AibaError(f"no shipped reference weights {key!r}; have {sorted(have)}")
    return ReferenceModel.load(have[key], device)


# ----------------------------------------------------------------- backend
class ReferenceBackend(Backend):
    """aiba's adapter for the reference model.

    Streams: ``words`` (every ``attn1``/``attn2`` of the down and up blocks: cross-attention
    to the prompt's word keys) and ``self`` (the mid block's ``attn1``). The mid block's
    ``attn2`` also attends to the words (4 x 32 lattice) but belongs to no stream: it is
    recorded and shown by ``aiba diagnose``, not mapped into ``words``. Latent: the mel
    image itself, ``(frames, 64)`` (time, mel), no prefix tokens. CFG doubles the batch as
    ``[uncond, cond]``. Content tokens: the prompt's words (padding excluded).
    """

    name = "reference"
    prefix_tokens = 0
    default_steps = 25
    default_guidance = 3.0

    def __init__(self, model: ReferenceModel, frames: int | None = None, audio: bool = True):
        self.model = model
        self.audio = audio  # False: generate() returns the mel features (B, frames, 64), decoded=False
        self.denoiser = model.unet
        self.frames = model.cfg.frames if frames is None else int(frames)

    @classmethod
    def tiny(cls, seed: int = 0, **kw):
        """Untrained weights: the reference architecture at its initialisation (the negative control)."""
        return cls(ReferenceModel(seed=seed, device=kw.pop("device", "cpu")), **kw)

    @classmethod
    def from_pretrained(cls, weights: str | None = None, device: str = "cpu", **kw):
        """Shipped weights (``weights="seed0"``/``"seed1"``) or a safetensors path."""
        return cls(load_weights(weights, device), **kw)

    @property
    def tokenizer(self) -> WordTokenizer:
        return self.model.tokenizer

    def streams(self) -> dict:
        return {"words": ["down_blocks.*attn*", "up_blocks.*attn*"], "self": ["mid_block.*attn1"]}

    def latent_shape(self, seconds=None) -> tuple:
        frames = self.frames if seconds is None else self._frames_for(seconds)
        return (frames, self.model.cfg.n_mels)

    def _frames_for(self, seconds: float) -> int:
        m = 2 ** (len(self.model.cfg.channels) - 1)
        n = max(m, int(round(seconds * 100 / m)) * m)  # 100 frames per second
        return n

    def cfg_order(self, guidance_scale: float):
        return "uncond_first" if guidance_scale > 1.0 else None

    def content(self, prompts) -> dict:
        return {self.model.cfg.max_len: self.tokenizer.content_mask(prompts)}

    def tokens(self, prompt: str) -> dict:
        return {"words": self.tokenizer.tokens(prompt)}

    def _generate(self, prompts, *, steps, guidance_scale, seed, seconds, on_step_end):
        import numpy as np

        from aiba.align.audio import AUDIOLDM2_MEL

        frames = self.latent_shape(seconds)[0]
        cb = (lambda i: on_step_end()) if on_step_end is not None else None
        feats = self.model.sample(prompts, steps=steps, guidance_scale=guidance_scale, seed=seed, frames=frames,
                                  callback_on_step_end=cb)
        self.last_features = feats  # (B, frames, n_mels)
        if not self.audio:
            return feats, AUDIOLDM2_MEL.sr, False
        audio = np.stack([feature_to_audio(f) for f in feats])
        return audio, AUDIOLDM2_MEL.sr, True
