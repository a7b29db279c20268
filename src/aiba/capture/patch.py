"""Kernel shims and the one scoped entry point, :func:`combined_patch`.

Every shim calls the original kernel with the caller's exact arguments and returns its
output untouched; afterwards it hands the call to each active tap. The order per call:

1. cheap facts first: the call's sizes, the module whose forward issued it (the nearest
   ``nn.Module._call_impl`` frame: its ``self``, ``args`` and ``kwargs``), the kind;
2. each tap decides whether it selects the call (kind, layer, step) and records it;
3. only for selected calls are the canonical inputs built (MHA projections, xformers
   bias materialisation, ALiBi) and the probabilities recomputed (:mod:`aiba.capture.probs`).

Anything that goes wrong after the kernel ran is put on the call's record (``rec.error``),
warned once per layer and raised when maps are read: capture never breaks a forward.

Patched symbols (one table, :func:`_targets`) are swapped in by the outermost
``combined_patch`` and restored exactly on exit, on an exception, and when entering fails
halfway. Active taps live in a ``ContextVar``: nested blocks add taps; outside every block
no aiba code runs.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AibaError, AibaWarning
from .probs import AttnInputs
from .tap import AttnTap, CallRecord

__all__ = ["combined_patch", "swap_attr", "CallSink", "active_taps", "patched_symbols", "swap_everywhere", "module_kind", "CONTEXT_ARGS",
           "CACHE_ARGS", "CROSS_NAMES"]

class CallSink(Protocol):
    """What a shim asks of a tap (:class:`~aiba.capture.tap.AttnTap` is the one sink).

    Per kernel call, after the kernel has run: the shim finds the issuing module's path in
    ``model_paths``, settles the kind (``override_kind``, then ``heuristic_kind``), calls
    ``record_call`` with the call's shape (a callable, so a call the tap keeps nothing of
    never has its sizes read), and, when the record is selected and the tap
    ``computes``, builds the inputs and calls ``capture_call``. Anything that goes wrong goes
    to ``record_failure``; nothing is raised into the model's forward.
    """

    kernels: Collection[str]
    model_paths: dict[int, str]  # id(module) -> its dotted path in the model given to combined_patch

    @property
    def computes(self) -> bool: ...

    def override_kind(self, name: str | None, q_len: int, k_len: int) -> str | None: ...

    def heuristic_kind(self, q_len: int, k_len: int) -> str: ...

    def record_call(self, kernel: str, name: str | None, kind: str, kind_source: str,
                    shape: tuple[int, int, int, int] | Callable[[], tuple[int, int, int, int]], outside: bool = False,
                    context: tuple[int, int] | None = None) -> CallRecord | None: ...

    def capture_call(self, kernel: str, rec: CallRecord, x: AttnInputs) -> None: ...

    def record_failure(self, rec: CallRecord | None, name: str | None, exc: BaseException) -> None: ...


_ACTIVE: ContextVar[tuple[AttnTap, ...]] = ContextVar("aiba_active_taps", default=())
# set while an outer shim runs its kernel, so the kernel's own inner calls (MHA -> SDPA)
# are not recorded twice
_INSIDE: ContextVar[bool] = ContextVar("aiba_inside_kernel", default=False)

# forward arguments that carry the other sequence of a cross-attention call: a value means
# "cross" (or "joint", see _joint_span), None means "self"
CONTEXT_ARGS = ("encoder_hidden_states", "context", "key_value_states", "cross_attention_states", "memory",
                "encoder_outputs", "encoder_states", "cross_attn_states")
# forward arguments holding a key/value cache of the module's own past input
CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past", "kv_cache", "cache")
# last component of a module path that names a cross-attention layer
CROSS_NAMES = frozenset({"encoder_attn", "EncDecAttention", "attn2", "cross_attn", "cross_attention", "crossattention",
                         "multihead_attn", "enc_dec_attn", "cross_attn_layer"})
# processors / modules that put the context tokens BEFORE the latent tokens in a joint call
# (SD3's JointAttnProcessor2_0 and the others put them after)
_CONTEXT_FIRST = ("Flux", "AuraFlow", "Bria", "LongCat", "Ovis", "EasyAnimate", "AddedKV")
_MAX_FRAMES = 64  # frames walked up from a kernel call to the nearest module call
_CALL_IMPL = nn.Module._call_impl.__code__
_WRAPPED_CALL_IMPL = nn.Module._wrapped_call_impl.__code__  # module(...) -> _wrapped_call_impl -> _call_impl
_MODULE_GLOBALS = sys.modules[nn.Module.__module__]  # torch.nn.modules.module: its global hook tables
_is_compiling = torch.compiler.is_compiling
_graph_task = torch._C._current_graph_task_id


def active_taps() -> tuple[AttnTap, ...]:
    """The taps receiving calls in the current context."""
    return _ACTIVE.get()


# ------------------------------------------------------------------ call context
def _attr(module, name: str, default=None):
    """An attribute set on a module instance (or its class) without nn.Module.__getattr__'s
    costly miss path."""
    d = module.__dict__
    return d[name] if name in d else getattr(type(module), name, default)


def _issuer(frame):
    """(module, args, kwargs, frame): the module whose forward is running at ``frame`` (the
    ``self`` of the nearest ``nn.Module._call_impl`` frame), the arguments it was called
    with, and that frame (to look at the parent's call on demand). A helper method of a
    parent module, called from a child's forward, is attributed to the child."""
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        if frame.f_code is _CALL_IMPL:
            # the module call's outer frame holds the same self/args/kwargs as its only locals
            # (several times cheaper to read: no hook closures), unless a forward pre-hook
            # may have replaced the arguments the forward was given
            up = frame.f_back
            if up is not None and up.f_code is _WRAPPED_CALL_IMPL:
                loc = up.f_locals
                module = loc.get("self")
                if not (getattr(module, "_forward_pre_hooks", None) or _MODULE_GLOBALS._global_forward_pre_hooks):
                    return module, loc.get("args", ()), loc.get("kwargs") or {}, frame
            loc = frame.f_locals
            return loc.get("self"), loc.get("args", ()), loc.get("kwargs") or {}, frame
        frame = frame.f_back
    return None, (), {}, None


def _single_stream_span(frame, module, lq: int, lk: int) -> tuple[int, int] | None:
    """Flux-style single-stream blocks concatenate context and latent tokens *before*
    calling their attention module (``pre_only=True``, no context argument): the joint span
    is read from the parent block's own ``hidden_states`` / ``encoder_hidden_states``."""
    if frame is None or lq != lk:
        return None
    parent, args, kwargs, _ = _issuer(frame.f_back)
    if parent is None:
        return None
    sig = _sig(type(parent))
    for name in sig.context:
        ctx = _arg(sig, args, kwargs, name)
        if isinstance(ctx, torch.Tensor):
            return _joint_span(parent, sig, args, kwargs, ctx, lq, lk)
    return None


@dataclass(frozen=True)
class _Sig:
    """What a module type's forward signature says (cached per type)."""

    pos: dict  # parameter name -> position in ``args`` (self excluded)
    context: tuple[str, ...]  # CONTEXT_ARGS it takes
    cache: tuple[str, ...]  # CACHE_ARGS it takes
    var_kw: bool  # takes **kwargs
    first: str | None  # first parameter (the module's own input)
    plain: bool  # takes no context, cache or **kwargs: only attributes can say more


_SIGS: dict[type, _Sig] = {}


def _sig(cls: type) -> _Sig:
    s = _SIGS.get(cls)
    if s is None:
        try:
            params = list(inspect.signature(cls.forward).parameters.values())[1:]
        except (TypeError, ValueError):
            params = []
        pos = {p.name: i for i, p in enumerate(params) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}
        names = {p.name for p in params}
        var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
        ctx, cache = tuple(a for a in CONTEXT_ARGS if a in names), tuple(a for a in CACHE_ARGS if a in names)
        s = _SIGS[cls] = _Sig(pos, ctx, cache, var_kw, params[0].name if params else None, not (ctx or cache or var_kw))
    return s


_ABSENT = object()


def _arg(sig: _Sig, args: tuple, kwargs: dict, name: str):
    """The value the module got for forward parameter ``name`` (None when left at its
    default), or _ABSENT when its forward takes no such parameter."""
    if name in kwargs:
        return kwargs[name]
    i = sig.pos.get(name)
    if i is not None:
        return args[i] if i < len(args) else None
    return _ABSENT


def _seq_len(t) -> int | None:
    """Tokens of a (B, L, C) sequence or a (B, C, H, W) image (H * W positions)."""
    if not isinstance(t, torch.Tensor):
        return None
    if t.dim() == 3:
        return int(t.shape[1])
    return int(t.shape[2] * t.shape[3]) if t.dim() == 4 else None


def _joint_span(module: nn.Module, sig: _Sig, args, kwargs, ctx, lq: int, lk: int) -> tuple[int, int] | None:
    """(start, stop) of the context tokens when the call attends over the module's own
    tokens and the context tokens concatenated: both queries and keys (SD3/Flux MM-DiT joint
    attention), or the keys only (diffusers' added-KV processors: latent queries over
    [context; latent] keys). None otherwise."""
    m = _seq_len(ctx)
    if m is None or lk <= m:
        return None  # keys no longer than the context: a plain cross call
    n = _seq_len(_arg(sig, args, kwargs, sig.first)) if sig.first is not None else None
    if n is None or lk != n + m or lq not in (n, n + m):
        return None
    owner = f"{type(module).__name__} {type(_attr(module, 'processor')).__name__}"
    first = any(tag in owner for tag in _CONTEXT_FIRST)
    return (0, m) if first else (n, n + m)


def module_kind(module: nn.Module | None, args: tuple, kwargs: dict, shape, frame=None):
    """Kind from the facts of the issuing module, in order: its forward arguments
    (CONTEXT_ARGS: a value -> "cross" or "joint", None -> "self"), then its
    ``is_cross_attention`` attribute. ``shape``: the call's (B, H, Lq, Lk), or a callable
    returning it (asked only when a joint span has to be checked). Returns (kind, source,
    context span) or (None, hint, None) where hint is "cache" when the module was handed a
    cache of its own past keys (the length rule then never says "cross")."""
    if module is None:
        return None, None, None
    sig = _SIGS.get(type(module)) or _sig(type(module))
    if sig.plain:
        flag = _attr(module, "is_cross_attention")
        return (("cross" if flag else "self"), "attribute", None) if isinstance(flag, bool) else (None, None, None)
    for name in sig.context:
        v = _arg(sig, args, kwargs, name)
        if v is None:
            if _attr(module, "pre_only") is not True:  # Flux single-stream blocks set it
                return "self", "args", None  # the common self call: decided without the call's sizes
            lq, lk = _lens(shape)
            span = _single_stream_span(frame, module, lq, lk)
            return ("joint", "args", span) if span is not None else ("self", "args", None)
        if v is not _ABSENT:
            lq, lk = _lens(shape)
            span = _joint_span(module, sig, args, kwargs, v, lq, lk)
            return ("joint", "args", span) if span is not None else ("cross", "args", None)
    if sig.var_kw:
        for name in CONTEXT_ARGS:
            if name in kwargs:
                return ("self", "args", None) if kwargs[name] is None else ("cross", "args", None)
    flag = _attr(module, "is_cross_attention")
    if isinstance(flag, bool):
        return ("cross" if flag else "self"), "attribute", None
    for name in sig.cache + tuple(a for a in CACHE_ARGS if sig.var_kw and a in kwargs):
        v = _arg(sig, args, kwargs, name)
        if v is not None and v is not _ABSENT:
            return None, "cache", None
    return None, None, None


def _lens(shape) -> tuple[int, int]:
    """(Lq, Lk) of a (B, H, Lq, Lk) shape or of a callable returning one."""
    s = shape() if callable(shape) else shape
    return s[2], s[3]


_NAMED: dict[str, bool] = {}  # layer path -> its last component names a cross-attention layer


def _tag(tap: CallSink, name: str | None, shape, source):
    """Finish a kind the module's facts left open, for one tap: the path's last component
    (CROSS_NAMES), then the tap's override, then the length rule (``shape`` as in
    :func:`module_kind`)."""
    if name is not None:
        named = _NAMED.get(name)
        if named is None:
            named = _NAMED[name] = name.rsplit(".", 1)[-1] in CROSS_NAMES
        if named:
            return "cross", "attribute"
    lq, lk = _lens(shape)
    k = tap.override_kind(name, lq, lk)
    if k is not None:
        return k, "override"
    if source == "cache" or lq == 0:
        return "self", "cache" if source == "cache" else "heuristic"
    return tap.heuristic_kind(lq, lk), "heuristic"


# ------------------------------------------------------------------ dispatch
_UNSEEN = {"traced": 0}


def _traced(t) -> bool:
    """A tensor seen while torch.compile/export traces (fake, functional, symbolic sizes)."""
    if type(t) is torch.Tensor or type(t) is nn.Parameter:
        return False  # symbolic sizes only occur on tracing subclasses
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, (FakeTensor, FunctionalTensor)) or any(isinstance(s, torch.SymInt) for s in t.shape)


def _fail(tap: CallSink, rec, name, exc: BaseException) -> None:
    try:
        tap.record_failure(rec, name, exc)
    except Exception:  # never let reporting break the forward
        pass


def _dispatch(taps: tuple, kernel: str, frame, probe: torch.Tensor, size: Callable, build: Callable, cargs: tuple,
              ckw: dict, module=None, fixed=None) -> None:
    """Hand one kernel call to the active ``taps`` that take ``kernel``.

    ``size(module, *cargs, **ckw)`` -> (B, H, Lq, Lk) without building anything, asked only
    when a rule or a record needs the sizes; ``build(*cargs, module=module, **ckw)`` ->
    AttnInputs, called only if some tap selected the call. ``module``/``fixed`` (kind,
    source): the issuing module and the kind when the shim knows them (MHA). A call a tap
    neither selects nor records (``records="selected"``) costs the module lookup, the kind
    from the module's arguments and a counter.
    """
    if len(taps) != 1 or kernel not in taps[0].kernels:
        taps = [t for t in taps if kernel in t.kernels]
        if not taps:
            return
    if _graph_task() != -1:
        return  # a forward recomputed during backward (activation checkpointing): seen already
    if type(probe) is not torch.Tensor and _traced(probe):
        _UNSEEN["traced"] += 1
        return
    memo = []

    def shape():
        if not memo:
            memo.append(size(module, *cargs, **ckw))
        return memo[0]

    try:
        if module is None:
            module, args, kwargs, found = _issuer(frame)
        if fixed is not None:
            kind, source, span = fixed[0], fixed[1], None
        else:
            kind, source, span = module_kind(module, args, kwargs, shape, found)
    except Exception as e:  # the kernel ran; report, never raise
        for tap in taps:
            _fail(tap, None, kernel, e)
        return
    x = None
    for tap in taps:
        rec = name = None
        try:
            name = tap.model_paths.get(id(module)) if module is not None else None
            k, src = (kind, source) if kind is not None else _tag(tap, name, shape, source)
            rec = tap.record_call(kernel, name, k, src, shape, bool(tap.model_paths) and name is None, span)
            if rec is not None and rec.captured and rec.note is None and tap.computes:
                if x is None:
                    x = build(*cargs, module=module, **ckw)
                tap.capture_call(kernel, rec, x)
        except Exception as e:
            _fail(tap, rec, name if rec is None else rec.name, e)


# --------------------------------------------------------------------- SDPA
def _to4(t: torch.Tensor) -> torch.Tensor:
    """(..., L, E) -> (B, H, L, E): 3-D is one head; more than 4 dims fold into heads."""
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(1)
    if t.dim() > 4:
        return t.flatten(1, -3)
    raise AibaError(f"attention input of shape {tuple(t.shape)}: expected at least (B, L, E)")


def _packed_groups(module, query, key) -> int:
    """transformers' one-token decode packs grouped-query heads into the query length:
    (B, H, 1, D) -> (B, kv_heads, groups, D). The groups when this call is so packed, else 1."""
    g = _attr(module, "num_key_value_groups", 1) if module is not None else 1
    if not isinstance(g, int) or g <= 1 or query.dim() != 4 or key.dim() != 4:
        return 1
    kv = getattr(getattr(module, "config", None), "num_key_value_heads", None)
    if query.shape[1] == key.shape[1] == kv and query.shape[2] == g:
        return g
    return 1


def _sdpa_inputs(query, key, value=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                 module=None) -> AttnInputs:
    if (attn_mask is None and query.dim() == 4 and key.dim() == 4 and key.shape[0] == query.shape[0]
            and key.shape[1] == query.shape[1] and (module is None or "num_key_value_groups" not in module.__dict__)):
        return AttnInputs(query, key, scale, None, "top_left" if is_causal else None)  # the common call: as given
    g = _packed_groups(module, query, key)
    if g > 1:
        b, hk, _, d = query.shape
        query = query.reshape(b, hk * g, 1, d)  # (B, Hk, g, D) -> (B, H, 1, D): the inverse of the packing
        if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[-2] == g:
            if attn_mask.shape[1] != hk:
                raise AibaError(f"packed grouped-query mask {tuple(attn_mask.shape)}: expected (B, {hk}, {g}, Lk)")
            attn_mask = attn_mask.reshape(attn_mask.shape[0], hk * g, 1, attn_mask.shape[-1])  # (B, H, 1, Lk)
    q, k = _to4(query), _to4(key)
    if k.shape[0] != q.shape[0]:
        k = k.expand(q.shape[0], *k.shape[1:])
    bias = attn_mask
    if bias is not None:
        if query.dim() == 3 and bias.dim() == 3:
            bias = bias.unsqueeze(1)  # (B, L, S) -> (B, 1, L, S)
        elif query.dim() > 4:
            bias = bias.expand(*query.shape[:-1], key.shape[-2]).flatten(1, -3)
    return AttnInputs(q, k, scale=scale, bias=bias, causal="top_left" if is_causal else None)


def _make_shim(kernel: str, orig, to_inputs, to_size):
    """A drop-in for a functional kernel: call ``orig`` with the caller's exact arguments,
    return its output untouched, then hand the call to the active taps."""

    @functools.wraps(orig)
    def shim(*args, **kwargs):
        if _is_compiling():
            return orig(*args, **kwargs)  # traced by torch.compile: stay out of the graph
        out = orig(*args, **kwargs)
        taps = _ACTIVE.get()
        if taps and not _INSIDE.get():
            _dispatch(taps, kernel, sys._getframe(1), args[0] if args else next(iter(kwargs.values())), to_size,
                      to_inputs, args, kwargs)
        return out

    return shim


def _sdpa_size_args(module, query, key, *_, **__) -> tuple[int, int, int, int]:
    qs = query.shape
    n = len(qs)
    if n == 4:
        g = _packed_groups(module, query, key) if module is not None and "num_key_value_groups" in module.__dict__ else 1
        return qs[0], qs[1] * g, qs[2] // g, key.shape[-2]
    if n < 3:
        raise AibaError(f"attention input of shape {tuple(qs)}: expected at least (B, L, E)")
    return qs[0], 1 if n == 3 else int(torch.Size(qs[1:-2]).numel()), qs[-2], key.shape[-2]


_ORIG_SDPA = F.scaled_dot_product_attention
_sdpa_shim = _make_shim("sdpa", _ORIG_SDPA, _sdpa_inputs, _sdpa_size_args)


# ---------------------------------------------------------------------- MHA
_ORIG_MHA_FORWARD = nn.MultiheadAttention.forward


def _mha_args(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    return query, key, key_padding_mask, attn_mask, is_causal


def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """MHA masks: bool True = masked out; float = additive."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.float()


def mha_inputs(mod: nn.MultiheadAttention, query, key, key_padding_mask=None, attn_mask=None, is_causal=False) -> AttnInputs:
    """The (q, k, bias) that ``mod`` attends with, recomputed from its weights (fp32)."""
    batched = query.dim() == 3
    if batched and mod.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)  # (L, N, E), (S, N, Ek)
    if not batched:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    lq, n, e = query.shape
    h = mod.num_heads
    hd = e // h
    if mod._qkv_same_embed_dim:
        wq, wk = mod.in_proj_weight[:e], mod.in_proj_weight[e : 2 * e]
    else:
        wq, wk = mod.q_proj_weight, mod.k_proj_weight
    b = mod.in_proj_bias
    bq, bk = (b[:e].float(), b[e : 2 * e].float()) if b is not None else (None, None)
    with torch.no_grad():
        q = F.linear(query.float(), wq.float(), bq)  # (L, N, E)
        k = F.linear(key.float(), wk.float(), bk)  # (S, N, E)
        bias = None
        if attn_mask is not None:
            am = _float_mask(attn_mask, q)
            bias = am.reshape(n, h, lq, -1) if am.dim() == 3 else am  # (N, H, L, S) | (L, S)
        if key_padding_mask is not None:
            kp = _float_mask(key_padding_mask, q)[:, None, None, :]  # (N, 1, 1, S)
            bias = kp if bias is None else bias + kp
        if mod.bias_k is not None:
            k = torch.cat([k, mod.bias_k.float().expand(1, n, e)])  # (S+1, N, E)
            bias = None if bias is None else F.pad(bias, (0, 1))
        q = q.reshape(lq, n, h, hd).permute(1, 2, 0, 3)  # (N, H, L, hd)
        k = k.reshape(k.shape[0], n, h, hd).permute(1, 2, 0, 3)  # (N, H, S, hd)
        if mod.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, h, 1, hd)], dim=2)  # (N, H, S+1, hd)
            bias = None if bias is None else F.pad(bias, (0, 1))
    causal = "top_left" if (is_causal and attn_mask is None) else None
    return AttnInputs(q, k, scale=hd**-0.5, bias=bias, causal=causal)


def _mha_size(mod: nn.MultiheadAttention, query, key) -> tuple[int, int, int, int]:
    if query.dim() == 3:
        lq, n = (query.shape[1], query.shape[0]) if mod.batch_first else (query.shape[0], query.shape[1])
        lk = key.shape[1] if mod.batch_first else key.shape[0]
    else:
        lq, n, lk = query.shape[0], 1, key.shape[0]
    lk += (mod.bias_k is not None) + bool(mod.add_zero_attn)
    return n, mod.num_heads, lq, lk


def _mha_size_args(module, mod, query, key, *_):
    return _mha_size(mod, query, key)


def _mha_build(mod, query, key, kpm, attn_mask, is_causal, module=None):
    return mha_inputs(mod, query, key, kpm, attn_mask, is_causal)


def _same_sequence(query, key) -> bool:
    """MHA self-attention: the key is the query: the same tensor, a view of the same memory
    with the same shape and strides, or (DETR's ``attn(x + pos, x + pos, x)``, where
    ``x + pos`` is computed twice) a tensor holding the same values."""
    if key is query:
        return True
    if key.shape != query.shape or key.dtype != query.dtype or key.device != query.device:
        return False
    if (key.untyped_storage().data_ptr() == query.untyped_storage().data_ptr()
            and key.storage_offset() == query.storage_offset() and key.stride() == query.stride()):
        return True
    return bool(torch.equal(key, query))


def _mha_shim(self, *args, **kwargs):
    if _is_compiling() or not _ACTIVE.get() or _INSIDE.get():
        return _ORIG_MHA_FORWARD(self, *args, **kwargs)
    token = _INSIDE.set(True)
    try:
        out = _ORIG_MHA_FORWARD(self, *args, **kwargs)
    finally:
        _INSIDE.reset(token)
    try:
        query, key, kpm, attn_mask, is_causal = _mha_args(*args, **kwargs)
        kind = "self" if _same_sequence(query, key) else "cross"
    except Exception as e:
        for tap in _ACTIVE.get():
            _fail(tap, None, "mha", e)
        return out
    _dispatch(_ACTIVE.get(), "mha", None, query, _mha_size_args, _mha_build, (self, query, key, kpm, attn_mask, is_causal), {},
              module=self, fixed=(kind, "args"))
    return out


# ------------------------------------------- nn.TransformerEncoderLayer fast path
_ORIG_TEL_FWD = torch._transformer_encoder_layer_fwd


def _tel_inputs(src, embed_dim, num_heads, in_w, in_b, norm_first, eps, n1w, n1b, mask, mask_type) -> AttnInputs:
    """q, k of the fused encoder layer recomputed from its weights as for MHA (batch first).
    A nested ``src`` (TransformerEncoder with a padding mask) is padded; padded keys are
    masked and padded query rows are fully masked (zeros)."""
    e, h = int(embed_dim), int(num_heads)
    hd = e // h
    bias = None
    with torch.no_grad():
        if src.is_nested:
            lens = [int(t.shape[0]) for t in src.unbind()]
            src = src.to_padded_tensor(0.0)  # (B, L, E)
            valid = torch.arange(src.shape[1], device=src.device)[None, :] < torch.tensor(lens, device=src.device)[:, None]
            pad = ~(valid[:, None, :, None] & valid[:, None, None, :])  # (B, 1, L, L) True = masked
            bias = _float_mask(pad, src)
        x = src.float()
        if norm_first:
            x = F.layer_norm(x, (e,), n1w.float(), n1b.float(), eps)
        b, lq, _ = x.shape
        bq, bk = (in_b[:e].float(), in_b[e : 2 * e].float()) if in_b is not None else (None, None)
        q = F.linear(x, in_w[:e].float(), bq).reshape(b, lq, h, hd).transpose(1, 2)  # (B, H, L, hd)
        k = F.linear(x, in_w[e : 2 * e].float(), bk).reshape(b, lq, h, hd).transpose(1, 2)  # (B, H, L, hd)
        if mask is not None:
            m = _float_mask(mask, x)
            if mask_type == 1:
                m = m[:, None, None, :]  # key padding (B, L) -> (B, 1, 1, L)
            bias = m if bias is None else bias + m
    return AttnInputs(q, k, scale=hd**-0.5, bias=bias)


def _tel_shim(*args, **kwargs):
    if _is_compiling():
        return _ORIG_TEL_FWD(*args, **kwargs)
    out = _ORIG_TEL_FWD(*args, **kwargs)
    if _ACTIVE.get() and not _INSIDE.get():
        try:
            names = ("src", "embed_dim", "num_heads", "in_w", "in_b", "out_w", "out_b", "gelu", "norm_first", "eps",
                     "n1w", "n1b", "n2w", "n2b", "l1w", "l1b", "l2w", "l2b", "mask", "mask_type")
            a = dict(zip(names, args))
            a.update(kwargs)
            src, h = a["src"], int(a["num_heads"])
            layer = _issuer(sys._getframe(1))[0]
            attn = getattr(layer, "self_attn", None)
            module = attn if isinstance(attn, nn.MultiheadAttention) else layer
            if src.is_nested:
                b, lq = src.size(0), max(int(t.shape[0]) for t in src.unbind())
            else:
                b, lq = src.shape[0], src.shape[1]
        except Exception as e:
            for tap in _ACTIVE.get():
                _fail(tap, None, "mha", e)
            return out
        _dispatch(_ACTIVE.get(), "mha", None, src if not src.is_nested else torch.empty(0), lambda m: (b, h, lq, lq),
                  lambda module=None: _tel_inputs(src, a["embed_dim"], h, a["in_w"], a["in_b"], a["norm_first"], a["eps"],
                                                  a["n1w"], a["n1b"], a.get("mask"), a.get("mask_type")),
                  (), {}, module=module, fixed=("self", "args"))
    return out


# ----------------------------------------------------------------- xformers
def _xformers_size(module, query, key, *_, **__) -> tuple[int, int, int, int]:
    if query.dim() == 3:
        h = 1
    elif query.dim() == 4:
        h = query.shape[2]
    elif query.dim() == 5:
        h = query.shape[2] * query.shape[3]
    else:
        raise AibaError(f"xformers query of shape {tuple(query.shape)}: expected BMK, BMHK or BMGHK")
    return query.shape[0], h, query.shape[1], key.shape[1]


def xformers_inputs(query, key, value=None, attn_bias=None, p=0.0, scale=None, module=None, **_) -> AttnInputs:
    """xformers layouts BMK, BMHK, BMGHK -> canonical (B, H, M, K); biases materialised."""
    if query.dim() == 3:
        q, k = query.unsqueeze(2), key.unsqueeze(2)  # (B, M, 1, K)
    elif query.dim() == 4:
        q, k = query, key  # (B, M, H, K)
    elif query.dim() == 5:
        q, k = query.flatten(2, 3), key.flatten(2, 3)  # (B, M, G*H, K)
    else:
        raise AibaError(f"xformers query of shape {tuple(query.shape)}: expected BMK, BMHK or BMGHK")
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, M, K)
    b, h, m, _ = q.shape
    n = k.shape[2]
    bias = attn_bias
    if bias is not None and not isinstance(bias, torch.Tensor):
        shape = (b, query.shape[2], query.shape[3], m, n) if query.dim() == 5 else (b, h, m, n)
        bias = bias.materialize(shape, dtype=torch.float32, device=q.device)
    if bias is not None:
        if query.dim() == 5 and bias.dim() == 5:
            bias = bias.flatten(1, 2)  # (B, G*H, M, N)
        elif query.dim() == 3 and bias.dim() == 3:
            bias = bias.unsqueeze(1)
    return AttnInputs(q, k, scale=scale, bias=bias)


# --------------------------------------------------------------- flash_attn
def _flash_size(module, q, k, *_, **__) -> tuple[int, int, int, int]:
    return q.shape[0], q.shape[2], q.shape[1], k.shape[1]


def flash_attn_inputs(q, k, v=None, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                      softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, module=None,
                      **_) -> AttnInputs:
    """flash_attn_func layout (B, S, H, D) -> canonical; causal/window bottom-right aligned."""
    q4, k4 = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, S, D)
    bias = None
    if alibi_slopes is not None:
        lq, lk = q4.shape[2], k4.shape[2]
        i = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        j = torch.arange(lk, device=q.device)[None, :]
        slopes = alibi_slopes.float().reshape(-1 if alibi_slopes.dim() == 2 else 1, q4.shape[1], 1, 1)
        bias = -slopes * (i - j).abs().float()  # (B|1, H, Lq, Lk)
    window = tuple(int(w) for w in window_size) if window_size is not None else (-1, -1)
    return AttnInputs(q4, k4, scale=softmax_scale, bias=bias, causal="bottom_right" if causal else None,
                      window=window, softcap=float(softcap or 0.0))


# ------------------------------------------------------------ patch table
@dataclass(frozen=True)
class _Target:
    owner: Any  # module or class holding the symbol
    attr: str
    replacement: Any


def _optional(module: str):
    """An optional kernel package, if the program has imported it (it is never imported here:
    a model that uses xformers or flash_attn has imported it before it runs)."""
    return sys.modules.get(module)


def _module_dicts():
    """The globals of every loaded module but aiba's own (aiba keeps the originals it calls)."""
    for modname, mod in list(sys.modules.items()):
        if modname == "aiba" or modname.startswith("aiba."):
            continue
        d = getattr(mod, "__dict__", None)
        if isinstance(d, dict):
            yield mod, d


def _rebinders(orig, replacement) -> list[_Target]:
    """Module globals that bound ``orig`` under their own name at import."""
    return [_Target(mod, attr, replacement) for mod, d in _module_dicts() for attr, val in list(d.items()) if val is orig]


_tel_shim = functools.wraps(_ORIG_TEL_FWD)(_tel_shim)


def _targets() -> list[_Target]:
    """Every symbol combined_patch swaps (the one table)."""
    out = _rebinders(_ORIG_SDPA, _sdpa_shim)
    out.append(_Target(nn.MultiheadAttention, "forward", _mha_shim))
    out += _rebinders(_ORIG_TEL_FWD, _tel_shim)
    xops = _optional("xformers.ops")
    if xops is not None and hasattr(xops, "memory_efficient_attention"):
        orig = xops.memory_efficient_attention
        out += _rebinders(orig, _make_shim("xformers", orig, xformers_inputs, _xformers_size))
    fa = _optional("flash_attn")
    if fa is not None and hasattr(fa, "flash_attn_func"):
        orig = fa.flash_attn_func
        out += _rebinders(orig, _make_shim("flash_attn", orig, flash_attn_inputs, _flash_size))
    return out


@contextmanager
def swap_attr(owner, attr: str, value) -> Iterator[None]:
    """Set ``owner.attr = value``; on exit put the original back, or delete the attribute if
    ``owner`` did not hold it itself (as ``unittest.mock.patch`` does). The one
    save-and-restore aiba uses for every symbol it swaps."""
    had = attr in vars(owner)
    old = vars(owner)[attr] if had else None
    setattr(owner, attr, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, attr, old)
        else:
            delattr(owner, attr)


def _swap(t: _Target):
    return swap_attr(t.owner, t.attr, t.replacement)


_LOCK = threading.RLock()
_PATCHED: dict[str, Any] = {"depth": 0, "stack": None, "targets": []}


@contextmanager
def _eager_compiled() -> Iterator[None]:
    """Compiled code runs its eager original inside the block, so the shims see real calls
    with concrete sizes (``torch.compiler.set_stance("force_eager")``). What is traced anyway
    (a stance set inside the block, torch.export) passes through the shims uncaptured: aiba
    counts those calls (fake/functional inputs) and the graphs Dynamo compiled, and warns once."""
    from torch._dynamo.utils import counters

    calls, graphs = _UNSEEN["traced"], counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("force_eager"):
        yield
    calls, graphs = _UNSEEN["traced"] - calls, counters["stats"]["unique_graphs"] - graphs
    if calls or graphs:
        warnings.warn(f"{calls} attention call(s) seen only while tracing and {graphs} graph(s) compiled by torch.compile "
                      "inside the block: attention inside them was not captured (aiba captures compiled models by "
                      "running them eagerly inside the block; do not change the compile stance there)",
                      AibaWarning, stacklevel=3)


@contextmanager
def _patched() -> Iterator[None]:
    """Reference-counted global patching: the outermost block swaps, the last one out restores."""
    with _LOCK:
        if _PATCHED["depth"] == 0:
            stack = ExitStack()
            try:
                # Dynamo first (it may be imported here for the first time): on import it
                # records torch's functions, and recording a shim instead of SDPA would leave
                # torch.compile unable to trace SDPA after the block
                stack.enter_context(_eager_compiled())
                targets = _targets()
                for t in targets:
                    stack.enter_context(_swap(t))
            except BaseException:
                stack.close()  # undo what was applied, in reverse order
                raise
            _PATCHED.update(stack=stack, targets=targets)
        _PATCHED["depth"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _PATCHED["depth"] -= 1
            if _PATCHED["depth"] == 0:
                stack, targets, _PATCHED["stack"], _PATCHED["targets"] = _PATCHED["stack"], _PATCHED["targets"], None, []
                stack.close()
                _unbind_late(targets)


def _unbind_late(targets: list[_Target]) -> None:
    """Modules imported inside the block may have bound a shim under their own name
    (``from torch.nn.functional import scaled_dot_product_attention``): give them the
    original back, so nothing of aiba outlives the block."""
    originals = {id(t.replacement): t.replacement.__wrapped__ for t in targets if hasattr(t.replacement, "__wrapped__")}
    for _, d in _module_dicts():
        for attr, val in list(d.items()):
            orig = originals.get(id(val))
            if orig is not None and val is not orig:
                d[attr] = orig


@contextmanager
def swap_everywhere(orig, replacement) -> Iterator[None]:
    """Bind ``replacement`` wherever a module global holds ``orig``; restore each on exit
    (what ``combined_patch`` does per kernel; benchmarks use it to install other captures)."""
    with ExitStack() as stack:
        for t in _rebinders(orig, replacement):
            stack.enter_context(_swap(t))
        yield


def patched_symbols() -> list[tuple[Any, str]]:
    """(owner, attribute) pairs currently swapped by aiba (empty outside every block)."""
    return [(t.owner, t.attr) for t in _PATCHED["targets"]]


@contextmanager
def _model_paths(tap: CallSink, model: nn.Module | None) -> Iterator[None]:
    old = tap.model_paths
    if model is not None:
        root = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule: name the original's modules
        tap.model_paths = {id(m): name or type(root).__name__ for name, m in root.named_modules()}
    try:
        yield
    finally:
        tap.model_paths = old


@contextmanager
def combined_patch(*taps: AttnTap, model: nn.Module | None = None) -> Iterator[AttnTap | tuple[AttnTap, ...]]:
    """Capture attention into ``taps`` inside the block.

    Patches ``F.scaled_dot_product_attention`` (and every module global bound to it),
    ``nn.MultiheadAttention.forward``, ``torch._transformer_encoder_layer_fwd`` (the fused
    ``nn.TransformerEncoderLayer`` path), and, when the program has imported them,
    ``xformers.ops.memory_efficient_attention`` and ``flash_attn.flash_attn_func`` (and every
    module global bound to them, e.g. stable-audio-tools' ``flash_attn_func``).
    With ``model`` the calls are named by the dotted path of the module whose forward issued
    them; calls from outside ``model`` (text encoders, a VAE) are recorded with
    ``outside=True`` and never recomputed. Compiled models (``torch.compile``) run their eager
    original inside the block. Yields the tap (or the tuple of taps); a tap given twice, or
    already active in an outer block, sees each call once.

    Active taps live in a ``ContextVar``: calls made in threads started inside the block
    (``nn.DataParallel``, thread pools) run in a fresh context and are not captured; run the
    block inside each worker thread instead.
    """
    if not taps:
        raise AibaError("combined_patch needs at least one AttnTap")
    for t in taps:
        if not isinstance(t, AttnTap):
            raise AibaError(f"combined_patch takes AttnTap objects, got {type(t).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise AibaError(f"combined_patch(model=) takes an nn.Module, got {type(model).__name__}")
    unique = tuple(dict.fromkeys(taps))
    with ExitStack() as stack:
        stack.enter_context(_patched())
        for t in unique:
            stack.enter_context(_model_paths(t, model))
        active = _ACTIVE.get()
        token = _ACTIVE.set(active + tuple(t for t in unique if t not in active))  # a tap sees each call once
        stack.callback(_ACTIVE.reset, token)
        yield taps[0] if len(taps) == 1 else taps
