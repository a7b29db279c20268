"""Kernel shims and the one scoped entry point, :func:`combined_patch`.

Every shim calls the original kernel with the caller's exact arguments and returns its
output untouched; afterwards it hands the call's ``q``/``k``/mask to each active tap, which
recomputes the probabilities (:mod:`aiba.probs`). Patched symbols (one table,
:func:`_targets`) are swapped in by the outermost ``combined_patch`` and restored exactly on
exit, on an exception, and when entering fails halfway. Active taps live in a ``ContextVar``:
nested blocks add taps; outside every block no aiba code runs.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AibaError
from .probs import AttnInputs
from .tap import AttnTap

__all__ = ["combined_patch", "active_taps", "patched_symbols", "swap_everywhere"]

_ACTIVE: ContextVar[tuple[AttnTap, ...]] = ContextVar("aiba_active_taps", default=())
# set while an outer shim runs its kernel, so the kernel's own inner calls (MHA -> SDPA)
# are not recorded twice
_INSIDE: ContextVar[bool] = ContextVar("aiba_inside_kernel", default=False)

# forward arguments that carry the cross-attention context in known attention modules
# (diffusers Attention: encoder_hidden_states; stable-audio-tools Attention: context)
_CONTEXT_ARGS = ("encoder_hidden_states", "context")
_MAX_FRAMES = 64  # frames walked up from a kernel call to find the module that issued it


def active_taps() -> tuple[AttnTap, ...]:
    """The taps receiving calls in the current context."""
    return _ACTIVE.get()


# ------------------------------------------------------------------ call context
def _caller_module(frame) -> tuple[nn.Module | None, str | None]:
    """The innermost ``nn.Module`` whose method is on the stack, and the kind its forward
    arguments state ("cross"/"self"), or None when it takes no context argument."""
    module, kind = None, None
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            local = frame.f_locals
            obj = local.get("self")
            if module is not None and obj is not module:
                break  # left the innermost module's frames
            if isinstance(obj, nn.Module):
                module = obj
                names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
                for arg in _CONTEXT_ARGS:
                    if arg in names:
                        kind = "self" if local.get(arg) is None else "cross"
                        return module, kind
        elif module is not None:
            break
        frame = frame.f_back
    return module, kind


def _dispatch(kernel: str, frame, make_inputs: Callable[[], AttnInputs], kind: str | None = None) -> None:
    """Hand one kernel call to every active tap that takes this kernel."""
    taps = [t for t in _ACTIVE.get() if kernel in t.kernels]
    if not taps:
        return
    module, ctx_kind = (None, None) if kind is not None else _caller_module(frame)
    x = make_inputs()
    _, _, lq, lk = x.shape
    for tap in taps:
        if kind is not None:
            k, source = kind, "module"
        elif ctx_kind is not None:
            k, source = ctx_kind, "module"
        else:
            k, source = tap.heuristic_kind(lq, lk), "heuristic"
        name = tap.model_paths.get(id(module)) if module is not None else None
        tap._on_call(kernel, name, k, source, x, outside=bool(tap.model_paths) and name is None)


@contextmanager
def _inside() -> Iterator[None]:
    token = _INSIDE.set(True)
    try:
        yield
    finally:
        _INSIDE.reset(token)


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


def _sdpa_inputs(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> AttnInputs:
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


def _make_shim(kernel: str, orig, to_inputs):
    """A drop-in for a functional kernel: call ``orig`` with the caller's exact arguments,
    return its output untouched, then hand the call to the active taps."""

    @functools.wraps(orig)
    def shim(*args, **kwargs):
        out = orig(*args, **kwargs)
        if _ACTIVE.get() and not _INSIDE.get():
            _dispatch(kernel, sys._getframe(1), lambda: to_inputs(*args, **kwargs))
        return out

    return shim


_ORIG_SDPA = F.scaled_dot_product_attention
_sdpa_shim = _make_shim("sdpa", _ORIG_SDPA, _sdpa_inputs)


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


def _mha_shim(self, *args, **kwargs):
    if not _ACTIVE.get() or _INSIDE.get():
        return _ORIG_MHA_FORWARD(self, *args, **kwargs)
    with _inside():
        out = _ORIG_MHA_FORWARD(self, *args, **kwargs)
    query, key, kpm, attn_mask, is_causal = _mha_args(*args, **kwargs)
    taps = [t for t in _ACTIVE.get() if "mha" in t.kernels]
    if taps:
        x = mha_inputs(self, query, key, kpm, attn_mask, is_causal)
        kind = "self" if key is query else "cross"
        for tap in taps:
            name = tap.model_paths.get(id(self))
            tap._on_call("mha", name, kind, "module", x, outside=bool(tap.model_paths) and name is None)
    return out


# ----------------------------------------------------------------- xformers
def xformers_inputs(query, key, value=None, attn_bias=None, p=0.0, scale=None, **_) -> AttnInputs:
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
def flash_attn_inputs(q, k, v=None, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                      softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, **_) -> AttnInputs:
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


def _targets() -> list[_Target]:
    """Every symbol combined_patch swaps (the one table)."""
    out = _rebinders(_ORIG_SDPA, _sdpa_shim)
    out.append(_Target(nn.MultiheadAttention, "forward", _mha_shim))
    xops = _optional("xformers.ops")
    if xops is not None and hasattr(xops, "memory_efficient_attention"):
        orig = xops.memory_efficient_attention
        out += _rebinders(orig, _make_shim("xformers", orig, xformers_inputs))
    fa = _optional("flash_attn")
    if fa is not None and hasattr(fa, "flash_attn_func"):
        orig = fa.flash_attn_func
        out += _rebinders(orig, _make_shim("flash_attn", orig, flash_attn_inputs))
    return out


_MISSING = object()


@contextmanager
def _swap(t: _Target) -> Iterator[None]:
    """Set ``owner.attr``; on exit put the original back, or delete it if it was not there."""
    had = t.attr in vars(t.owner)
    old = vars(t.owner)[t.attr] if had else _MISSING
    setattr(t.owner, t.attr, t.replacement)
    try:
        yield
    finally:
        if had:
            setattr(t.owner, t.attr, old)
        else:
            delattr(t.owner, t.attr)


_LOCK = threading.RLock()
_PATCHED: dict[str, Any] = {"depth": 0, "stack": None, "targets": []}


@contextmanager
def _patched() -> Iterator[None]:
    """Reference-counted global patching: the outermost block swaps, the last one out restores."""
    with _LOCK:
        if _PATCHED["depth"] == 0:
            stack = ExitStack()
            targets = _targets()
            try:
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
def _model_paths(tap: AttnTap, model: nn.Module | None) -> Iterator[None]:
    old = tap.model_paths
    if model is not None:
        tap.model_paths = {id(m): name or type(model).__name__ for name, m in model.named_modules()}
    try:
        yield
    finally:
        tap.model_paths = old


@contextmanager
def combined_patch(*taps: AttnTap, model: nn.Module | None = None) -> Iterator[AttnTap | tuple[AttnTap, ...]]:
    """Capture attention into ``taps`` inside the block.

    Patches ``F.scaled_dot_product_attention`` (and every module global bound to it),
    ``nn.MultiheadAttention.forward``, and, when the program has imported them,
    ``xformers.ops.memory_efficient_attention`` and ``flash_attn.flash_attn_func`` (and every
    module global bound to them, e.g. stable-audio-tools' ``flash_attn_func``).
    With ``model`` the calls are named by the dotted path of the module that issued them;
    calls from outside ``model`` (text encoders, a VAE) are recorded with ``outside=True``
    and never recomputed.
    Yields the tap (or the tuple of taps).

    Active taps live in a ``ContextVar``: calls made in threads started inside the block
    (``nn.DataParallel``, thread pools) run in a fresh context and are not captured; run the
    block inside each worker thread instead.
    """
    if not taps:
        raise AibaError("combined_patch needs at least one AttnTap")
    for t in taps:
        if not isinstance(t, AttnTap):
            raise AibaError(f"combined_patch takes AttnTap objects, got {type(t).__name__}")
    with ExitStack() as stack:
        stack.enter_context(_patched())
        for t in taps:
            stack.enter_context(_model_paths(t, model))
        active = _ACTIVE.get()
        token = _ACTIVE.set(active + tuple(t for t in taps if t not in active))  # a tap sees each call once
        stack.callback(_ACTIVE.reset, token)
        yield taps[0] if len(taps) == 1 else taps
