"""``aiba bench``: the extra latency and memory of attention capture, per denoiser forward.

Each model is built with random weights from its config (AudioLDM2 UNet, Stable Audio Open
DiT, or a generic SDPA transformer), then every mode runs one forward per repetition,
interleaved, in an order that rotates every repetition (rep 1: none, eager, ...; rep 2:
eager, ..., none), and the median is kept:

- ``none``: the model as shipped (fused kernels, nothing captured);
- ``eager``: the paper's capture (AIBA App. A): every attention call computed as an explicit
  softmax in the model's dtype, cross maps head-averaged and copied to the CPU per call;
- ``eager-all``: the same with the self-attention maps copied too;
- ``aiba-cross``: ``combined_patch`` with ``AttnTap(kinds=("cross",))``, mapping on;
- ``aiba-all``: ``AttnTap(kinds=("cross", "self"))``.

Only the steady state is timed (CUDA events on a GPU; on the CPU the calling thread's CPU
time with one torch thread, else ``perf_counter``): inside
each block one untimed forward runs first, then the timed one; entering and leaving the
capture block is timed separately (``enter_ms``), as a run enters it once per generation, not
once per step. On the CPU the run uses one torch thread unless told otherwise
(``BenchConfig.threads``). :func:`per_call` adds the host microseconds each attention call
costs (not selected, selected cross pooled, a hand-written recompute processor, each minus
plain SDPA).

JSON schema (``SCHEMA``)::

    {"schema": "aiba-bench/1",
     "info": {"torch", "aiba", "device", "device_name", "clock", "loadavg", "dtype", "batch", "reps",
              "warmup", "steps", "threads", "platform", "notes": [str]},
     "per_call": {"module", "device", "dtype", "threads", "calls", "reps", "shape", "clock",
                  "us": {MODE: SPREAD}, "overhead_us": {LINE: SPREAD + {"mode", "baseline"}},
                  "in_call_us": {MODE: SPREAD}, "in_call_overhead_us": {LINE: SPREAD + {"mode", "baseline"}}},
     "models": {NAME: {"backend", "size": "full" | "default", "params", "config": {...},
                       "latent_shape": [T, F] | [T], "prefix_tokens", "context_tokens": [int],
                       "calls_per_forward": {"cross": int, "self": int},
                       "modes": {MODE: ROW}} | {"backend", "error": str}}}

    SPREAD = {"median", "q1", "q3", "min", "max", "all": [every raw value]} (microseconds)
    ROW = {"ms": median, "ms_min", "ms_max", "ms_q1", "ms_q3", "ms_all": [per repetition],
           "ratio": ms / ms of "none" (same run), "ratio_min": ms_min / ms_min of "none",
           "ratio_all": [ms / ms of "none" of the same repetition], "ratio_paired": their
                       median, "ratio_q1", "ratio_q3": their quartiles,
           "peak_mib": device memory high-water of one forward above what was allocated
                       before it (CUDA), null on the CPU (no allocator statistics there),
           "peak_extra_mib": peak_mib - peak_mib of "none" (null on the CPU),
           "captured_calls": calls captured per forward (eager: maps copied to the CPU),
           "host_copies_per_step": device->host copies per forward made by the capture
                       (counted calls of Tensor.cpu/item/tolist/numpy/__bool__/__int__/
                       __float__ on tensors of the bench device, minus those of "none"),
           "host_mib_per_step": MiB the capture copies to the host per forward,
           "state_mib_2": capture state after 2 steps, "state_mib": after ``steps`` steps
                       (aiba: tap.state_bytes(), the per-layer sums on the device; eager:
                       bytes of the maps stored on the CPU),
           "state_grows": state_mib > state_mib_2,
           "state_mib_200": projected state of a 200-step run of this model,
           "records_200": CallRecords a 200-step run leaves in tap.store (host objects),
           "enter_ms": time to enter + leave the capture block once,
           "host_copies_total", "host_bytes_total": the raw counts of one forward (before
                       subtracting "none"), "layers": per-layer sums the tap holds}

For the aiba modes the result also carries ``state_mib_200_audioldm2``: the state of a
200-step run of the full-size AudioLDM2 UNet (measured when that model is benchmarked,
else the measured bytes per captured layer times that UNet's layer count).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AibaError
from .. import settings
from ..settings import integer
from ..capture.patch import swap_attr, swap_everywhere
from ..capture.probs import fold_pooled_item

__all__ = [
    "MODES",
    "BENCH_BACKENDS",
    "SIZES",
    "SCHEMA",
    "BenchConfig",
    "BenchModel",
    "build_models",
    "bench_model",
    "run",
    "format_table",
    "register",
    "Mode",
    "timed_forward",
    "enter_ms",
]

MODES = ("none", "eager", "eager-all", "aiba-cross", "aiba-all")
BENCH_BACKENDS = ("audioldm2", "stable-audio", "generic")
SIZES = ("tiny", "default", "full")
SCHEMA = "aiba-bench/1"
MIB = float(1 << 20)
# a full AudioLDM2 generation (pipeline default) and a Stable Audio Open one
STEPS_AUDIOLDM2 = 200
# full-size AudioLDM2 UNet, 10.24 s: captured layers per forward (its diffusers UNet config)
AUDIOLDM2_LAYERS = {"cross": 32, "self": 64}
# ... and the lattice cells they cover: (T', F') -> (self, GPT-2 cross, T5 cross) layers
AUDIOLDM2_LATTICES = {(128, 8): (20, 5, 5), (64, 4): (20, 5, 5), (32, 2): (24, 6, 6)}
AUDIOLDM2_CELLS = {
    "self": sum(t * f * n[0] for (t, f), n in AUDIOLDM2_LATTICES.items()),
    "cross": sum(t * f * (n[1] + n[2]) for (t, f), n in AUDIOLDM2_LATTICES.items()),
}


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run (the CLI turns its arguments into this)."""

    backend: str = "generic"  # "audioldm2" | "stable-audio" | "generic"
    size: str = "default"  # "full": the real architectures (random weights); "default": CPU-sized; "tiny": tests
    device: str = "cpu"
    dtype: str | None = None  # "float16" | "bfloat16" | "float32"; None: fp16 on CUDA, fp32 on CPU
    batch: int = 2  # the CFG-doubled batch the pipelines run
    modes: tuple[str, ...] = MODES
    reps: int = 5  # timed forwards per mode (interleaved); the median is reported
    warmup: int = 1  # untimed forwards per mode first
    steps: int = 4  # steps run to measure the capture state (after 2 and after `steps`)
    target: tuple[int, int] = (128, 64)  # the tap's (target_T, target_F) grid
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None: 1 on the CPU (steady timings), torch's own on CUDA
    per_call: bool = True  # also measure the per-call host overhead (aiba.tools.bench.per_call)
    per_call_calls: int = 200  # calls per timed block of the per-call measurement

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise AibaError(f"size must be one of {SIZES}, got {self.size!r}")
        if self.backend not in BENCH_BACKENDS:
            raise AibaError(f"backend must be one of {BENCH_BACKENDS}, got {self.backend!r}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise AibaError(f"modes must be a non-empty subset of {MODES}, got {list(self.modes)}")
        for name, lo in (("reps", 1), ("warmup", 0), ("steps", 2), ("batch", 1), ("per_call_calls", 1)):
            integer(name, getattr(self, name), lo=lo)
        if self.threads is not None:
            integer("threads", self.threads, lo=1)
        if self.dtype is not None:
            settings.dtype_name("dtype", self.dtype)
        settings.device("device", self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return torch.float16 if torch.device(self.device).type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


@dataclass
class BenchModel:
    """A built denoiser and the facts the taps need."""

    name: str
    backend: str
    size: str  # "full" | "default"
    module: nn.Module
    forward: Callable[[], object]  # one denoiser forward at the bench batch
    latent_shape: tuple[int, ...]  # (T, F) or (T,): the query lattice at stride 1
    prefix_tokens: int = 0
    context: dict[int, list[int]] = field(default_factory=dict)  # k_len -> content token indices
    cfg_order: str | None = "uncond_first"
    config: dict = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


# ---------------------------------------------------------------- model builders
_UNET_BLOCKS = dict(down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                   up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",))
# size -> (UNet config, T_lat, F_lat, GPT-2 width, T5 width, T5 tokens, model name)
_AUDIOLDM2 = {
    # audioldm2 / audioldm2-music UNet (346.9M params), 10.24 s -> latent (B, 8, 256, 16)
    "full": (dict(sample_size=256, block_out_channels=(128, 256, 384, 640), layers_per_block=2,
                  cross_attention_dim=([None, 768, 1024],) * 4, attention_head_dim=8), 256, 16, 768, 1024, 20,
             "audioldm2_unet_10s"),
    # the same layout (4 levels, 3 with attention, 3 slots each), narrower; 2.56 s latent
    "default": (dict(sample_size=64, block_out_channels=(32, 64, 64, 96), layers_per_block=1, norm_num_groups=16,
                     cross_attention_dim=([None, 64, 96],) * 4, attention_head_dim=8), 64, 16, 64, 96, 20,
                "audioldm2_unet_small"),
    # tiny: query lengths 64/16/4 never equal a context length (8, 10): eager tags "cross" by length
    "tiny": (dict(sample_size=16, block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                  cross_attention_dim=([None, 16, 24],) * 4, attention_head_dim=2), 16, 4, 16, 24, 10,
             "audioldm2_unet_tiny"),
}
# size -> (DiT config, ((model name, latent frames), ...), context tokens)
_SAO = {
    "full": (dict(io_channels=64, embed_dim=1536, depth=24, num_heads=24, cond_token_dim=768, global_cond_dim=1536),
             (("sao_dit_10s", 216), ("sao_dit_47s", 1024)), 130),
    # SAO's layout (prepended global token, 130 context tokens, grouped kv heads), narrower
    "default": (dict(io_channels=16, embed_dim=128, depth=2, num_heads=4, cond_token_dim=64, global_cond_dim=128),
                (("sao_dit_small_10s", 216), ("sao_dit_small_47s", 1024)), 130),
    "tiny": (dict(io_channels=8, embed_dim=64, depth=2, num_heads=2, cond_token_dim=32, global_cond_dim=64),
             (("sao_dit_tiny", 21),), 14),
}
_GENERIC = {
    "full": dict(channels=8, dim=768, depth=12, heads=12, ctx_dim=1024, T=256, F=16, context_tokens=20),
    "default": dict(channels=8, dim=64, depth=2, heads=4, ctx_dim=32, T=32, F=8, context_tokens=10),
    "tiny": dict(channels=4, dim=32, depth=2, heads=2, ctx_dim=16, T=8, F=4, context_tokens=6),
}


def _plain(conf: dict) -> dict:
    return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v for k, v in conf.items()}


def _audioldm2(cfg: BenchConfig) -> list[BenchModel]:
    from diffusers import AudioLDM2UNet2DConditionModel

    conf, t_lat, f_lat, d_gpt2, d_t5, n_t5, name = _AUDIOLDM2[cfg.size]
    conf = dict(conf, in_channels=8, out_channels=8, **_UNET_BLOCKS)
    dev, dt = torch.device(cfg.device), cfg.torch_dtype
    torch.manual_seed(cfg.seed)
    with torch.device(dev):
        unet = AudioLDM2UNet2DConditionModel(**conf).to(dt).eval()
        x = torch.randn(cfg.batch, 8, t_lat, f_lat, dtype=dt)  # (B, C, T, F): height = time
        e1 = torch.randn(cfg.batch, 8, d_gpt2, dtype=dt)  # 8 GPT-2 generated tokens
        e2 = torch.randn(cfg.batch, n_t5, d_t5, dtype=dt)  # T5 tokens
        t = torch.tensor(500, device=dev)

    def fwd():
        return unet(x, t, encoder_hidden_states=e1, encoder_hidden_states_1=e2)

    # pool over 6 "prompt" tokens of each stream (k_len 8 = GPT-2, n_t5 = T5)
    ctx = {8: list(range(6)), n_t5: list(range(6))}
    return [BenchModel(name, "audioldm2", cfg.size, unet, fwd, (t_lat, f_lat), 0, ctx, "uncond_first",
                       dict(_plain(conf), gpt2_tokens=8, t5_tokens=n_t5))]


def _stable_audio(cfg: BenchConfig) -> list[BenchModel]:
    from stable_audio_tools.models.dit import DiffusionTransformer

    conf, sizes, n_ctx = _SAO[cfg.size]  # n_ctx: T5 tokens + seconds_start + seconds_total (130 in SAO)
    dev, dt = torch.device(cfg.device), cfg.torch_dtype
    torch.manual_seed(cfg.seed)
    with torch.device(dev):
        dit = DiffusionTransformer(project_cond_tokens=False, transformer_type="continuous_transformer",
                                   global_cond_type="prepend", **conf).to(dt).eval()
    out = []
    for name, frames in sizes:
        with torch.device(dev):
            x = torch.randn(cfg.batch, conf["io_channels"], frames, dtype=dt)  # (B, C, T)
            t = torch.rand(cfg.batch, dtype=dt)
            ctx = torch.randn(cfg.batch, n_ctx, conf["cond_token_dim"], dtype=dt)
            g = torch.randn(cfg.batch, conf["global_cond_dim"], dtype=dt)

        def fwd(x=x, t=t, ctx=ctx, g=g):
            return dit(x, t, cross_attn_cond=ctx, global_embed=g)

        out.append(BenchModel(name, "stable-audio", cfg.size, dit, fwd, (frames,), 1, {n_ctx: list(range(n_ctx - 2))},
                              "cond_first", dict(conf, frames=frames, context_tokens=n_ctx)))
    return out


class _Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``; ``context`` makes it cross."""

    def __init__(self, dim: int, heads: int, ctx_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(ctx_dim or dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        src = x if context is None else context
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, N, d/H)
        k, v = self.kv(src).view(b, src.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # 2 x (B, H, S, d/H)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d/H)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, ctx_dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, heads)
        self.cross_attn = _Attention(dim, heads, ctx_dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context=ctx)
        return x + self.ff(self.norm3(x))


class GenericDenoiser(nn.Module):
    """A plain SDPA transformer over a (T, F) latent raster, time-major (needs only torch)."""

    def __init__(self, channels: int, dim: int, depth: int, heads: int, ctx_dim: int) -> None:
        super().__init__()
        self.inp = nn.Linear(channels, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, ctx_dim) for _ in range(depth))
        self.outp = nn.Linear(dim, channels)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, c, t, f = x.shape
        h = self.inp(x.permute(0, 2, 3, 1).reshape(b, t * f, c))  # (B, T*F, dim), index = t * F + f
        for blk in self.blocks:
            h = blk(h, ctx)
        return self.outp(h).reshape(b, t, f, c).permute(0, 3, 1, 2)  # (B, C, T, F)


def _generic(cfg: BenchConfig) -> list[BenchModel]:
    conf = _GENERIC[cfg.size]
    dev, dt = torch.device(cfg.device), cfg.torch_dtype
    torch.manual_seed(cfg.seed)
    with torch.device(dev):
        m = GenericDenoiser(conf["channels"], conf["dim"], conf["depth"], conf["heads"], conf["ctx_dim"]).to(dt).eval()
        x = torch.randn(cfg.batch, conf["channels"], conf["T"], conf["F"], dtype=dt)  # (B, C, T, F)
        ctx = torch.randn(cfg.batch, conf["context_tokens"], conf["ctx_dim"], dtype=dt)
    n = conf["context_tokens"]
    return [BenchModel(f"generic_{cfg.size}", "generic", cfg.size, m, lambda: m(x, ctx), (conf["T"], conf["F"]), 0,
                       {n: list(range(n // 2))}, "uncond_first", dict(conf))]


_BUILDERS = {"audioldm2": _audioldm2, "stable-audio": _stable_audio, "generic": _generic}


def build_models(cfg: BenchConfig) -> list[BenchModel]:
    """The denoisers of ``cfg.backend`` at ``cfg``'s size, device and dtype."""
    return _BUILDERS[cfg.backend](cfg)


# --------------------------------------------------------------- eager capture
class EagerCapture:
    """The paper's capture: explicit softmax per call, head-mean maps copied to the CPU.

    A call is "cross" when its key length differs from its query length (what the paper's
    processor sees); ``keep_self`` also copies the self-attention maps.
    """

    def __init__(self, keep_self: bool = False) -> None:
        self.keep_self = keep_self
        self.store: list[torch.Tensor] = []
        self.calls = 0  # attention calls seen

    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        self.calls += 1
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            g = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(g, dim=-3), value.repeat_interleave(g, dim=-3)
        s = scale if scale is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query, key.transpose(-1, -2)) * s  # (B, H, Lq, Lk), model dtype
        lq, lk = scores.shape[-2:]
        if is_causal:
            keep = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        probs = scores.softmax(dim=-1)
        if lk != lq or self.keep_self:
            a = probs.mean(dim=-3) if probs.dim() >= 4 else probs  # (B, Lq, Lk)
            self.store.append(a.detach().cpu())
        return torch.matmul(probs, value)

    @contextlib.contextmanager
    def patch(self) -> Iterator["EagerCapture"]:
        with swap_everywhere(_ORIG_SDPA, self.sdpa):
            yield self

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store)


_ORIG_SDPA = F.scaled_dot_product_attention


# ------------------------------------------------------------ host-copy counter
_HOST_METHODS = ("cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__")


class HostCopyCounter:
    """Counts device->host transfers: ``Tensor.cpu/item/tolist/numpy`` and Python truth/number
    conversions of tensors on ``device`` (each a copy and a sync on an accelerator).

    On the CPU the same calls are counted: they are the points that would copy on a GPU.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.count = 0
        self.bytes = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator["HostCopyCounter"]:
        dev_type = self.device.type

        def wrap(name):
            orig = getattr(torch.Tensor, name)

            def counted(t, *args, **kwargs):
                if t.device.type == dev_type:
                    self.count += 1
                    self.bytes += t.numel() * t.element_size()
                return orig(t, *args, **kwargs)

            return counted

        with contextlib.ExitStack() as stack:
            for n in _HOST_METHODS:
                stack.enter_context(swap_attr(torch.Tensor, n, wrap(n)))
            yield self


# -------------------------------------------------------------------- runners
class Mode:
    """One mode: ``block()`` enters its capture, ``after()`` ends a step, ``state_bytes()``."""

    def __init__(self, name: str, model: BenchModel, cfg: BenchConfig) -> None:
        self.name = name
        self.model = model
        self.cfg = cfg
        self.eager = EagerCapture(keep_self=name == "eager-all") if name.startswith("eager") else None
        self.tap = None
        if name.startswith("aiba"):
            self.tap = self.new_tap()

    def new_tap(self):
        from ..capture.tap import AttnTap

        kinds = ("cross",) if self.name == "aiba-cross" else ("cross", "self")
        m = self.model
        return AttnTap(*self.cfg.target, pool="mean", kinds=kinds, latent_shape=m.latent_shape,
                       prefix_tokens=m.prefix_tokens, content=m.context or None,
                       cfg_order=m.cfg_order if self.cfg.batch % 2 == 0 else None, batch="cond")

    def reset(self) -> None:
        if self.eager is not None:
            self.eager.store.clear()
            self.eager.calls = 0
        if self.tap is not None:
            self.tap = self.new_tap()

    def block(self):
        if self.eager is not None:
            return self.eager.patch()
        if self.tap is not None:
            from ..capture.patch import combined_patch

            return combined_patch(self.tap, model=self.model.module)
        return contextlib.nullcontext()

    def after(self) -> None:
        """End of a step: the tap advances; eager's copies stay (clear_store drops them)."""
        if self.tap is not None:
            self.tap.next_step()

    def clear_store(self) -> None:
        if self.eager is not None:
            self.eager.store.clear()
        if self.tap is not None:
            self.tap.store.clear()  # records only: the streaming state is kept

    def state_bytes(self) -> int:
        if self.eager is not None:
            return self.eager.state_bytes()
        if self.tap is not None:
            return self.tap.state_bytes()
        return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_forward(mode: Mode, device: torch.device) -> float:
    """ms of one steady-state forward inside the mode's (already built) capture block: the
    block's own entry is outside the timed region, and one untimed forward runs inside the
    block first (the first forward after entering pays one-off costs a generation pays once)."""
    fwd = mode.model.forward
    with mode.block():
        fwd()
        _sync(device)
        mode.after()
        mode.clear_store()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fwd()
            b.record()
            torch.cuda.synchronize(device)
            ms = a.elapsed_time(b)
        else:
            clock = _cpu_clock()
            t0 = clock()
            fwd()
            ms = (clock() - t0) * 1e3
    mode.after()
    mode.clear_store()
    return ms


def _cpu_clock() -> Callable[[], float]:
    """With one torch thread every op runs on the calling thread, so its CPU time is the
    forward's cost without the time other processes held the core (a shared machine);
    with more threads the work spreads over OpenMP threads and wall time is used."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def enter_ms(mode: Mode, device: torch.device, n: int = 3) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        with mode.block():
            pass
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _peak_mib(mode: Mode, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with mode.block():
        mode.model.forward()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    mode.after()
    mode.clear_store()
    return peak / MIB


def _counts(mode: Mode, device: torch.device) -> tuple[int, int, int]:
    """(host copies, host bytes, captured calls) of one forward."""
    counter = HostCopyCounter(device)
    mode.clear_store()
    with counter.counting(), mode.block():
        mode.model.forward()
    _sync(device)
    if mode.eager is not None:
        calls = len(mode.eager.store)
    elif mode.tap is not None:
        calls = sum(r.captured for r in mode.tap.store)
    else:
        calls = 0
    mode.after()
    mode.clear_store()
    return counter.count, counter.bytes, calls


def _state(mode: Mode, steps: int) -> tuple[int, int, int, int]:
    """(bytes after 2 steps, after ``steps`` steps, records per step, layers held), fresh state."""
    mode.reset()
    at2 = 0
    for i in range(steps):
        with mode.block():
            mode.model.forward()
        mode.after()
        if i == 1:
            at2 = mode.state_bytes()
    end = mode.state_bytes()
    records = len(mode.tap.store) // steps if mode.tap is not None else 0
    n_layers = mode.tap.layer_count if mode.tap is not None else 0
    mode.reset()
    return at2, end, records, n_layers


def _calls_per_forward(model: BenchModel, device: torch.device) -> dict[str, int]:
    """Attention calls of one forward by kind, as the tap tags them."""
    from ..capture.patch import combined_patch
    from ..capture.tap import AttnTap

    tap = AttnTap(kinds=())
    with torch.no_grad(), combined_patch(tap, model=model.module):
        model.forward()
    out = {"cross": 0, "self": 0}
    for r in tap.store:
        out[r.kind] += 1
    return out


def bench_model(model: BenchModel, cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Every mode of ``cfg.modes`` on one model: the ``models[NAME]`` entry of the JSON."""
    device = torch.device(cfg.device)
    modes = ["none"] + [m for m in cfg.modes if m != "none"]
    runners = {m: Mode(m, model, cfg) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    with torch.no_grad():
        for _ in range(cfg.warmup):
            for m in modes:
                timed_forward(runners[m], device)
        for rep in range(cfg.reps):
            # the order rotates every repetition: on a CPU the mode that follows the fused
            # `none` pays for regrowing the allocator's heap (measured: +20-40 ms on the small
            # UNet), so no mode may always sit in that seat
            for m in modes[rep % len(modes):] + modes[: rep % len(modes)]:
                times[m].append(timed_forward(runners[m], device))
            log(f"  rep {rep + 1}/{cfg.reps}: " + " ".join(f"{m}={times[m][-1]:.1f}ms" for m in modes))
        rows = {}
        for m in modes:
            r = runners[m]
            copies, nbytes, calls = _counts(r, device)
            at2, end, records, n_layers = _state(r, cfg.steps)
            ts, sp = times[m], _spread(times[m])
            rows[m] = dict(ms=sp["median"], ms_min=sp["min"], ms_max=sp["max"], ms_q1=sp["q1"], ms_q3=sp["q3"], ms_all=ts,
                           peak_mib=_peak_mib(r, device), captured_calls=calls, host_copies_total=copies,
                           host_bytes_total=nbytes, state_mib_2=at2 / MIB, state_mib=end / MIB,
                           state_grows=end > at2, enter_ms=enter_ms(r, device) if m != "none" else 0.0,
                           records_per_step=records, layers=n_layers)
    base = rows["none"]
    for m, row in rows.items():
        row["ratio"] = row["ms"] / base["ms"]
        row["ratio_min"] = row["ms_min"] / base["ms_min"]  # less sensitive to a busy machine
        # paired: each repetition's forward against "none" of the same repetition
        row["ratio_all"] = [a / c for a, c in zip(row["ms_all"], base["ms_all"])]
        rq = _spread(row["ratio_all"])
        row["ratio_paired"], row["ratio_q1"], row["ratio_q3"] = rq["median"], rq["q1"], rq["q3"]
        row["peak_extra_mib"] = None if row["peak_mib"] is None else row["peak_mib"] - base["peak_mib"]
        row["host_copies_per_step"] = row["host_copies_total"] - base["host_copies_total"]
        row["host_mib_per_step"] = (row["host_bytes_total"] - base["host_bytes_total"]) / MIB
        if m.startswith("eager"):  # grows by one step's copies each step
            row["state_mib_200"] = row["state_mib"] / cfg.steps * STEPS_AUDIOLDM2
        else:  # a streaming state does not grow: what it holds after N steps it holds after 200
            row["state_mib_200"] = row["state_mib"]
        row["records_200"] = row.pop("records_per_step") * STEPS_AUDIOLDM2
        if m.startswith("aiba"):
            kinds = ("cross",) if m == "aiba-cross" else ("cross", "self")
            if model.backend == "audioldm2" and model.size == "full":
                row["state_mib_200_audioldm2"] = row["state_mib"]
            else:  # the tap sums each layer on its lattice: one float32 per cell, one kept batch item
                row["state_mib_200_audioldm2"] = sum(AUDIOLDM2_CELLS[k] for k in kinds) * 4 / MIB
    return dict(backend=model.backend, size=model.size, params=model.params, config=model.config,
                latent_shape=list(model.latent_shape), prefix_tokens=model.prefix_tokens,
                context_tokens=sorted(model.context), calls_per_forward=_calls_per_forward(model, device),
                modes=rows)


# ------------------------------------------------------------- per-call overhead
PER_CALL_MODES = ("plain-cross", "plain-self", "shim-only", "not-selected", "not-selected-counted", "selected-cross",
                  "kernels-only", "hand-recompute")
# what each overhead line subtracts: (mode, its plain baseline)
PER_CALL_LINES = {"the shim alone": ("shim-only", "plain-self"),
                  "not selected": ("not-selected", "plain-self"),
                  "not selected, records=selected": ("not-selected-counted", "plain-self"),
                  "selected cross pooled": ("selected-cross", "plain-cross"),
                  "its kernels alone": ("kernels-only", "plain-cross"),
                  "hand-written recompute": ("hand-recompute", "plain-cross")}
PER_CALL_SHAPE = dict(batch=2, heads=4, head_dim=16, lattice=(8, 8), context=10, context_dim=32, content=6)


class _Processor:
    """A minimal attention processor (module -> processor -> SDPA), shared by every mode. It
    times each attention call at its call site (the SDPA call and what ``after`` adds), in
    nanoseconds: the median of those single calls is what a mode costs per call, robust to
    the preemptions that swamp block timings on a shared machine."""

    def __init__(self) -> None:
        self.ns: list[int] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        b, n, _ = hidden_states.shape
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        h = attn.heads
        q = attn.to_q(hidden_states).view(b, n, h, -1).transpose(1, 2)  # (B, H, N, d)
        k = attn.to_k(ctx).view(b, ctx.shape[1], h, -1).transpose(1, 2)  # (B, H, S, d)
        v = attn.to_v(ctx).view(b, ctx.shape[1], h, -1).transpose(1, 2)
        t0 = time.perf_counter_ns()
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
        o = self.after(q, k, encoder_hidden_states is not None, o)
        self.ns.append(time.perf_counter_ns() - t0)
        return attn.to_out[0](o.transpose(1, 2).reshape(b, n, -1))

    def after(self, q, k, cross, o):
        return o


class _RecomputeProcessor(_Processor):
    """What a user writes by hand: the same probabilities as aiba's cross capture (head mean,
    mean over the content tokens, conditional half), summed on the device."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.w = weights  # (Lk,) content-token weights
        self.total = None

    def after(self, q, k, cross, o):
        if cross:
            p = torch.softmax(q[1:] @ k[1:].transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # cond half (1, H, N, S)
            pooled = p.mean(dim=1) @ self.w  # (1, N)
            self.total = pooled if self.total is None else self.total.add_(pooled)
        return o


class _KernelsProcessor(_Processor):
    """The floor of a selected cross call: the kernels aiba's capture launches for it
    (:func:`aiba.capture.probs.fold_pooled_item` on the conditional item, weights and sum
    prepared once), with none of the capture's Python around them."""

    def __init__(self, weights: torch.Tensor, heads: int, cells: int) -> None:
        super().__init__()
        self.vec = (weights.float() / heads).repeat(heads)[None]  # (1, H*Lk): W_j / H, tiled over heads
        self.acc = torch.zeros(1, cells, device=weights.device)  # (1, T'*F')

    def after(self, q, k, cross, o):
        if cross:
            fold_pooled_item(q[1], k[1], None, self.vec, self.acc)
        return o


class _AttnModule(nn.Module):
    """diffusers' ``Attention`` contract (to_q/to_k/to_v/to_out, ``heads``, a processor) for a
    machine without diffusers."""

    def __init__(self, dim: int, heads: int, ctx_dim: int | None) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.processor = _Processor()

    def set_processor(self, p) -> None:
        self.processor = p

    def forward(self, hidden_states, encoder_hidden_states=None):
        return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states)


def per_call_modules(device, dtype, shape: dict) -> tuple[nn.ModuleDict, str]:
    """The per-call harness's modules: ``attn1`` (self) and ``attn2`` (cross), diffusers
    ``Attention`` (or a module of the same contract without diffusers) with the minimal
    timing processor, and what they are."""
    dim = shape["heads"] * shape["head_dim"]
    try:
        from diffusers.models.attention_processor import Attention

        make = lambda ctx: Attention(dim, cross_attention_dim=ctx, heads=shape["heads"], dim_head=shape["head_dim"])  # noqa: E731
        kind = "diffusers Attention"
    except ImportError:
        make = lambda ctx: _AttnModule(dim, shape["heads"], ctx)  # noqa: E731
        kind = "diffusers-style module (diffusers not installed)"
    with torch.device(device):
        model = nn.ModuleDict({"attn1": make(None), "attn2": make(shape["context_dim"])}).to(dtype).eval()
    for m in model.values():
        m.set_processor(_Processor())
    return model, kind


def _us_per_call(fn: Callable[[], object], calls: int, dev: torch.device) -> float:
    """Thread CPU microseconds per call of ``fn``: 10 untimed calls, then ``calls`` timed."""
    for _ in range(10):
        fn()
    t0 = time.thread_time_ns()
    for _ in range(calls):
        fn()
    _sync(dev)
    return (time.thread_time_ns() - t0) / calls / 1e3


def per_call(device: str = "cpu", dtype: torch.dtype = torch.float32, calls: int = 200, reps: int = 15,
             shape: dict | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Host microseconds per attention call (module -> processor -> SDPA), measured two ways.

    Modes, interleaved in an order that rotates every repetition, each a block of ``calls``
    calls after 10 untimed ones: ``plain-cross``/``plain-self`` (no capture), ``shim-only``
    (a self call inside ``combined_patch`` with a tap that takes no SDPA call: the shim
    runs the kernel, finds no tap for it and returns; the floor of every call under capture),
    ``not-selected`` (a self call under ``AttnTap(kinds=("cross",))``, recorded),
    ``not-selected-counted`` (the same with ``records="selected"``: only counted),
    ``selected-cross`` (``AttnTap(pool="mean", latent_shape=lattice, content=..., cfg)``, the
    call mapped and folded), ``kernels-only`` (the kernels a selected call launches, called
    directly: the floor of ``selected-cross``), ``hand-recompute`` (a processor recomputing
    the same pooled probabilities).

    - ``in_call_us``: per repetition, the median over the block's calls of one call's
      wall time at its call site (SDPA and what follows it in the processor); host time on
      an accelerator. Preemptions hit single calls, not the median, so this resolves a few
      microseconds on a shared machine.
    - ``us``: the block's thread CPU time per call (everything the call costs, noisier).

    Overheads are paired per repetition (mode minus its plain baseline in the same
    repetition): median, quartiles, min/max; every raw time is kept.
    """
    shape = dict(PER_CALL_SHAPE, **(shape or {}))
    dev = torch.device(device)
    model, module_kind = per_call_modules(dev, dtype, shape)
    raw: dict[str, list[float]] = {m: [] for m in PER_CALL_MODES}
    in_call: dict[str, list[float]] = {m: [] for m in PER_CALL_MODES}
    runs = _per_call_runs(model, dev, dtype, shape)
    with torch.no_grad():
        for rep in range(reps):
            order = PER_CALL_MODES[rep % len(PER_CALL_MODES):] + PER_CALL_MODES[: rep % len(PER_CALL_MODES)]
            for mode in order:
                block, site = runs(mode, calls)
                raw[mode].append(block)
                in_call[mode].append(site)
            log(f"  per-call rep {rep + 1}/{reps}: " + " ".join(f"{m}={in_call[m][-1]:.1f}us" for m in PER_CALL_MODES))
    out = {"module": module_kind, "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
           "threads": torch.get_num_threads(),
           "calls": calls, "reps": reps, "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()},
           "clock": "thread CPU time (time.thread_time_ns) per block; perf_counter_ns per call at the call site",
           "us": {m: dict(_spread(ts), all=ts) for m, ts in raw.items()}, "overhead_us": {},
           "in_call_us": {m: dict(_spread(ts), all=ts) for m, ts in in_call.items()}, "in_call_overhead_us": {}}
    for line, (m, base) in PER_CALL_LINES.items():
        for times, key in ((raw, "overhead_us"), (in_call, "in_call_overhead_us")):
            diffs = [a - c for a, c in zip(times[m], times[base])]
            out[key][line] = dict(_spread(diffs), all=diffs, mode=m, baseline=base)
    return out


def _per_call_runs(model: nn.Module, dev: torch.device, dtype: torch.dtype, shape: dict) -> Callable:
    """``run(mode, calls)`` -> (thread-CPU us per call of the block, median us of one call at
    its call site); checks that each capture mode captured what it claims."""
    from ..capture.patch import combined_patch
    from ..capture.tap import AttnTap

    b, (t, f) = shape["batch"], shape["lattice"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, t * f, shape["heads"] * shape["head_dim"], generator=gen).to(dev, dtype)  # (B, T'*F', dim)
    ctx = torch.randn(b, shape["context"], shape["context_dim"], generator=gen).to(dev, dtype)  # (B, S, ctx_dim)
    content = list(range(shape["content"]))
    w = torch.zeros(shape["context"], device=dev, dtype=dtype)
    w[content] = 1.0 / len(content)
    cross, selfm = model["attn2"], model["attn1"]
    common = dict(kinds=("cross",), latent_shape=(t, f), content=content, cfg_order="uncond_first")
    taps = {"shim-only": AttnTap(kernels=("mha",), **common), "not-selected": AttnTap(**common),
            "not-selected-counted": AttnTap(records="selected", **common),
            "selected-cross": AttnTap(pool="mean", **common)}
    on_cross = ("plain-cross", "selected-cross", "kernels-only", "hand-recompute")

    def run(mode: str, calls: int) -> tuple[float, float]:
        module = cross if mode in on_cross else selfm
        proc = (_RecomputeProcessor(w) if mode == "hand-recompute" else
                _KernelsProcessor(w, shape["heads"], t * f) if mode == "kernels-only" else _Processor())
        module.set_processor(proc)
        fn = (lambda: cross(x, encoder_hidden_states=ctx)) if module is cross else (lambda: selfm(x))
        tap = taps.get(mode)
        with combined_patch(tap, model=model) if tap is not None else contextlib.nullcontext():
            block = _us_per_call(fn, calls, dev)
        if tap is not None:  # the block measured what it claims: every call captured, or none
            captured, kept, seen = sum(r.captured for r in tap.store), len(tap.store), sum(tap.counts.values())
            want = (calls + 10 if mode == "selected-cross" else 0,
                     0 if tap.records == "selected" or mode == "shim-only" else calls + 10, 0 if mode == "shim-only" else calls + 10)
            if (captured, kept, seen) != want:
                raise AibaError(f"per-call mode {mode!r}: {captured} captured, {kept} kept of {seen} calls")
            tap.reset()
        return block, statistics.median(proc.ns[10:]) / 1e3

    return run


def _spread(ts: list[float]) -> dict:
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return {"median": statistics.median(ts), "q1": q[0], "q3": q[2], "min": min(ts), "max": max(ts)}


def format_per_call(pc: dict) -> str:
    """One line: per-call host overhead of each case over plain SDPA at the call site,
    median [q1, q3] over the repetitions."""
    parts = [f"{line} {v['median']:+.1f} us [{v['q1']:+.1f}, {v['q3']:+.1f}]" for line, v in pc["in_call_overhead_us"].items()]
    return (f"per call over plain SDPA ({pc['device']}, {pc['threads']} thread(s), median call at the call site, [IQR] "
            f"of {pc['reps']}; plain cross {pc['in_call_us']['plain-cross']['median']:.1f} us): " + ", ".join(parts))


def _info(cfg: BenchConfig) -> dict:
    from .. import __version__

    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
    notes = []
    if dev.type != "cuda":
        notes.append("peak_mib is null on the CPU: torch keeps no allocator statistics there; run with --device cuda")
        notes.append("host copies on the CPU count the calls that would copy device->host on an accelerator")
    sat = sys.modules.get("stable_audio_tools.models.transformer")
    if sat is not None and getattr(sat, "flash_attn_func", None) is not None:
        notes.append("stable-audio-tools calls flash_attn here: the eager modes do not intercept it")
    clock = "CUDA events" if dev.type == "cuda" else (
        "thread CPU time (time.thread_time)" if _cpu_clock() is time.thread_time else "wall (time.perf_counter)")
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):
        load = None
    return dict(torch=torch.__version__, aiba=__version__, device=str(dev), device_name=name, clock=clock, loadavg=load,
                dtype=str(cfg.torch_dtype).replace("torch.", ""), batch=cfg.batch, reps=cfg.reps, warmup=cfg.warmup,
                steps=cfg.steps, threads=torch.get_num_threads(), platform=platform.platform(), notes=notes)


@contextlib.contextmanager
def _threads(cfg: BenchConfig) -> Iterator[None]:
    """torch's CPU threads for the run: ``cfg.threads``, else 1 on the CPU (with 2 threads on a
    shared machine OpenMP barriers stall whenever another process holds a core)."""
    n = cfg.threads if cfg.threads is not None else (1 if torch.device(cfg.device).type == "cpu" else None)
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None, result: dict | None = None) -> dict:
    """Build ``cfg.backend``'s models and bench each; adds to ``result`` (a previous run's dict)."""
    with _threads(cfg):
        return _run(cfg, log, result)


def _run(cfg: BenchConfig, log: Callable[[str], None], result: dict | None) -> dict:
    result = result if result is not None else {"schema": SCHEMA, "info": _info(cfg), "models": {}}
    if cfg.per_call and "per_call" not in result:
        log("per-call host overhead")
        result["per_call"] = per_call(cfg.device, cfg.torch_dtype, calls=cfg.per_call_calls, reps=max(cfg.reps, 3), log=log)
    try:
        models = build_models(cfg)
    except Exception as e:  # a missing optional backend, or out of memory
        result["models"][cfg.backend] = dict(backend=cfg.backend, error=f"{type(e).__name__}: {str(e)[:500]}")
        log(f"{cfg.backend}: {result['models'][cfg.backend]['error']}")
        return result
    for m in models:
        t0 = time.perf_counter()
        log(f"{m.name}: {m.params / 1e6:.1f}M params, latent {m.latent_shape}")
        try:
            result["models"][m.name] = bench_model(m, cfg, log)
        except Exception as e:  # recorded, so one failing model does not lose the others
            result["models"][m.name] = dict(backend=m.backend, error=f"{type(e).__name__}: {str(e)[:500]}")
        log(f"{m.name}: {time.perf_counter() - t0:.1f} s")
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.empty_cache()
    return result


def _fmt(v, spec: str) -> str:
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


def format_table(result: dict) -> str:
    """The short table printed last."""
    info = result["info"]
    threads = f"{info['threads']} thread{'' if info['threads'] == 1 else 's'}"
    lines = [f"device: {info['device_name']} ({info['device']}, {threads}), {info['dtype']}, "
             f"batch {info['batch']}, median of {info['reps']} interleaved steady-state forwards (IQR: paired ratios), "
             f"state after {info['steps']} steps; clock: {info.get('clock', '?')}"
             + (f"; load average {info['loadavg'][0]:.1f}" if info.get("loadavg") else ""),
             f"{'model':22} {'mode':10} {'ms':>9} {'ratio':>6} {'IQR':>11} {'peak+MiB':>8} {'stateMiB':>8} {'st@200':>8} "
             f"{'d2h/step':>8} {'hostMiB':>7} {'calls':>5}"]
    if result.get("per_call"):
        lines.insert(1, format_per_call(result["per_call"]))
    for name, mr in result["models"].items():
        if "error" in mr:
            lines.append(f"{name:22} ERROR {mr['error'][:80]}")
            continue
        for mode, r in mr["modes"].items():
            iqr = f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}" if "ratio_q1" in r else "-"
            lines.append(f"{name:22} {mode:10} {r['ms']:9.2f} {r['ratio']:6.2f} {iqr:>11} {_fmt(r['peak_extra_mib'], '8.1f')} "
                         f"{r['state_mib']:8.3f} {r['state_mib_200']:8.2f} {r['host_copies_per_step']:8d} "
                         f"{r['host_mib_per_step']:7.2f} {r['captured_calls']:5d}")
    proj = {}
    for mr in result["models"].values():
        for mode, r in mr.get("modes", {}).items():
            v = r.get("state_mib_200_audioldm2")
            if v is not None and (mode not in proj or mr["backend"] == "audioldm2" and mr["size"] == "full"):
                proj[mode] = (v, "measured" if mr["backend"] == "audioldm2" and mr["size"] == "full" else "projected")
    if proj:
        lines.append("state of a 200-step full-size AudioLDM2 run (target <= 64 MiB): " + ", ".join(
            f"{m} {v:.2f} MiB ({how})" for m, (v, how) in proj.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------ CLI
def _run_cli(args) -> int:
    import json

    from ..settings import writable_file

    if args.json:
        writable_file("--json", args.json)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    cfg = BenchConfig(backend=args.backend, size="full" if args.full_size else args.size, device=args.device, dtype=args.dtype,
                      batch=args.batch, modes=modes, reps=args.reps, warmup=args.warmup, steps=args.steps,
                      threads=args.threads, per_call=not args.no_per_call)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    result = run(cfg, log)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(format_table(result))
    return 0


def register(subparsers) -> None:
    """Add ``aiba bench``."""
    p = subparsers.add_parser("bench", help="latency and memory of attention capture against the uncaptured model",
                              description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=BENCH_BACKENDS, default="generic", help="model family (default generic: torch only)")
    p.add_argument("--full-size", action="store_true", help="the real architectures with random weights (GPU-sized)")
    p.add_argument("--size", choices=SIZES, default="default",
                   help="default: CPU-sized (each model's modes in well under a minute); tiny: a smoke test")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="default: float16 on CUDA, float32 on the CPU")
    p.add_argument("--batch", type=int, default=2, help="batch (default 2: a CFG-doubled prompt)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per mode, interleaved (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per mode first (default 1)")
    p.add_argument("--steps", type=int, default=4, help="steps run to measure the capture state (default 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on the CPU, for steady timings on a shared machine; torch's on CUDA)")
    p.add_argument("--no-per-call", action="store_true", help="skip the per-call host-overhead measurement")
    p.add_argument("--json", default=None, help="write the results here (schema: aiba.tools.bench.SCHEMA)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_run_cli)
