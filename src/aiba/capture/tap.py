"""AttnTap: what to capture, the per-call records, and the streaming T x F maps.

A tap is handed each attention call by the kernel shims (:mod:`aiba.capture.patch`) while a
``combined_patch(tap)`` block is active. For every call it keeps a small record; for the
calls it selects it recomputes the exact probabilities (:mod:`aiba.capture.probs`), pools text
tokens and places queries on the latent lattice (:mod:`aiba.maps.mapping`), then folds the
result into per-layer running sums on the call's device (Eq. 8). The sums stay on each
layer's lattice and are resized to the grid when maps are read (resizing is linear); only
``keep="calls"``/``"steps"`` and ``aggregate="max"`` resize every call. Memory does not
grow with the number of steps.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..maps import mapping
from ..errors import AibaError, AibaWarning
from .probs import AttnInputs, fold_pooled_item, head_mean_probs, prob_chunks


def _block(x: AttnInputs, rows: slice, cols: slice) -> AttnInputs:
    """The sub-call of query rows ``rows`` over keys ``cols`` (views, no copies)."""
    if x.causal is not None or max(x.window) >= 0:
        raise AibaError(f"a joint call with a causal or windowed mask cannot be split; q {tuple(x.q.shape)}")
    bias = x.bias
    if bias is not None:
        bias = bias[..., rows, :] if bias.dim() >= 2 and bias.shape[-2] != 1 else bias
        bias = bias[..., cols] if bias.shape[-1] != 1 else bias
    return AttnInputs(x.q[:, :, rows], x.k[:, :, cols], x.scale, bias, None, x.window, x.softcap)

__all__ = ["AttnTap", "CallRecord", "TapMaps", "KINDS", "KERNELS"]

KINDS = ("cross", "self")
KERNELS = ("sdpa", "mha", "xformers", "flash_attn")
KEEP = ("calls", "probs", "steps")
_WEIGHTED = ("mean", "subset", "softmax")  # pools that weight the keys (one matmul with the head mean)
RECORDS = ("all", "selected")
# what rec.kind_source can say, in the order the rules are tried (see AttnTap)
KIND_SOURCES = ("args", "attribute", "override", "cache", "heuristic")


@dataclass(slots=True)
class CallRecord:
    """One captured attention call."""

    name: str  # dotted module path (with model=), else "<kernel>.<i>", i = call order in the step
    kernel: str  # "sdpa" | "mha" | "xformers" | "flash_attn"
    kind: str  # "cross" | "self" | "joint" (latent and context tokens in one call, see ``context``)
    step: int  # the tap's denoising-step counter when the call ran
    q_len: int
    k_len: int
    heads: int  # query heads
    batch: int  # batch of the call (before CFG selection)
    index: int  # order of the call since the last reset
    kind_source: str = "heuristic"  # the rule that decided ``kind``: one of KIND_SOURCES
    lattice: tuple[int, int] | None = None  # (T', F') the queries were placed on; None if not mapped
    captured: bool = True  # False: recorded but not recomputed (filtered, or outside the model)
    outside: bool = False  # issued outside the model given to combined_patch(model=)
    probs: torch.Tensor | None = None  # keep="probs": (B_kept, q_len, k_len) float32, CPU
    grid: torch.Tensor | None = None  # keep="calls": (B_kept, target_T, target_F) float32, CPU
    context: tuple[int, int] | None = None  # kind "joint": (start, stop) of the context tokens among the keys
    # (and among the queries when q_len == k_len)
    error: str | None = None  # what went wrong while recording this call (raised when maps are read)
    note: str | None = None  # e.g. "empty" for a zero-length query or key (nothing to recompute)


@dataclass(frozen=True)
class TapMaps:
    """Aggregated maps on the CPU.

    ``overall``: (B, target_T, target_F), or (B, Lk, target_T, target_F) for ``pool=None``.
    ``layers``: module path -> the same shape. ``freq_resolved`` is False for a time-only
    lattice, whose maps have target_F == 1 (a time profile, never broadcast over frequency).
    """

    overall: torch.Tensor
    layers: dict[str, torch.Tensor]
    freq_resolved: bool
    steps: int  # distinct denoising steps folded in
    calls: int  # captured calls folded in


@dataclass
class _LayerAcc:
    total: torch.Tensor  # running weighted sum (mean) or running max, on the call's device
    weight: float  # running sum of step weights, referenced to step `last`
    last: int  # step the sums are referenced to (late weighting decays them forward)
    steps: set = field(default_factory=set)
    calls: int = 0
    on_lattice: bool = False  # sums kept on the layer's lattice, resized when maps are read


def _as_patterns(x) -> tuple[str, ...] | None:
    if x is None:
        return None
    return (x,) if isinstance(x, str) else tuple(x)


def _int_at_least(name: str, lo: int):
    def check(v):
        try:
            if isinstance(v, bool) or int(v) != v:
                raise ValueError
            v = int(v)
        except (TypeError, ValueError, OverflowError):
            raise AibaError(f"{name} must be an integer, got {v!r}") from None
        if v < lo:
            raise AibaError(f"{name} must be >= {lo}, got {v}")
        return v
    return check


def _real(name: str, lo: float, hi: float | None, lo_open: bool, expected: str):
    def check(v):
        try:
            if isinstance(v, bool):
                raise TypeError
            f = float(v)
        except (TypeError, ValueError):
            raise AibaError(f"{name} must be {expected}, got {v!r}") from None
        if not math.isfinite(f) or f < lo or (lo_open and f == lo) or (hi is not None and f > hi):
            raise AibaError(f"{name} must be {expected}, got {v!r}")
        return f
    return check


def _one_of(name: str, allowed: tuple, what: str | None = None):
    def check(v):
        if isinstance(v, (list, dict, set)) or v not in allowed:
            raise AibaError(f"{name} must be {what or f'one of {allowed}'}, got {v!r}")
        return v
    return check


def _subset(name: str, allowed: tuple):
    def check(v):
        vals = (v,) if isinstance(v, str) else tuple(v)
        out = frozenset(vals)
        if not out <= set(allowed):
            raise AibaError(f"{name} must be a subset of {allowed}, got {sorted(map(str, out))}")
        return out
    return check


def _patterns(v):
    if v is None:
        return None
    out = _as_patterns(v)
    if not all(isinstance(p, str) for p in out):
        raise AibaError(f"layers must be fnmatch patterns (str), got {v!r}")
    return out


def _steps(v):
    if v is None:
        return None
    try:
        start, stop = (int(x) for x in v)
    except (TypeError, ValueError):
        raise AibaError(f"steps must be None or (start, stop), got {v!r}") from None
    if start < 0 or start >= stop:
        raise AibaError(f"steps must be (start, stop) with 0 <= start < stop (stop exclusive), got {tuple(v)}")
    return (start, stop)


def _kind_rules(v):
    if v is None or callable(v):
        return v
    if not isinstance(v, Mapping):
        raise AibaError(f"kind_rules must be a mapping pattern -> kind or a callable, got {type(v).__name__}")
    bad = {p: k for p, k in v.items() if not isinstance(p, str) or k not in KINDS}
    if bad:
        raise AibaError(f"kind_rules must map fnmatch patterns (str) to one of {KINDS}, got {bad}")
    return dict(v)


def _keep(v):
    keep_t = () if v is None else _as_patterns(v)
    if not set(keep_t) <= set(KEEP):
        raise AibaError(f"keep must be None or among {KEEP}, got {v!r}")
    return frozenset(keep_t)


def _latent_shape(v):
    if v is None:
        return None
    try:
        value = tuple(int(x) for x in v)
    except (TypeError, ValueError):
        raise AibaError(f"latent_shape must be (T, F) or (T,) with positive sizes, got {v!r}") from None
    if len(value) not in (1, 2) or min(value) < 1:
        raise AibaError(f"latent_shape must be (T, F) or (T,) with positive sizes, got {value}")
    return value


def _lattices(v):
    try:
        out = tuple(tuple(int(x) for x in lat) for lat in v)
    except (TypeError, ValueError):
        raise AibaError(f"lattices must be (T', F') pairs, got {v!r}") from None
    if any(len(lat) != 2 or min(lat) < 1 for lat in out):
        raise AibaError(f"lattices must be (T', F') pairs of positive sizes, got {out}")
    return out


def _weights(v):
    if isinstance(v, str):
        if v not in ("uniform", "late"):
            raise AibaError(f"weights must be 'uniform', 'late' or a mapping layer -> weight, got {v!r}")
        return v
    if not isinstance(v, Mapping):
        raise AibaError(f"weights must be 'uniform', 'late' or a mapping layer -> weight, got {v!r}")
    def ok(w):
        try:
            return math.isfinite(float(w)) and float(w) >= 0
        except (TypeError, ValueError):
            return False
    bad = {k: w for k, w in v.items() if not ok(w)}
    if bad:
        raise AibaError(f"weights: layer weights must be finite and >= 0, got {bad}")
    return v


# one validated definition of every tap setting: name -> check returning the stored value
_SETTINGS: dict[str, Callable] = {
    "target_T": _int_at_least("target_T", 1),
    "target_F": _int_at_least("target_F", 1),
    "pool": _one_of("pool", mapping.POOLS),
    "cross_ratio": _real("cross_ratio", 0.0, 1.0, False, "a number in [0, 1]"),
    "kinds": _subset("kinds", KINDS),
    "kind_rules": _kind_rules,
    "records": _one_of("records", RECORDS),
    "layers": _patterns,
    "steps": _steps,
    "kernels": _subset("kernels", KERNELS),
    "keep": _keep,
    "budget_bytes": _int_at_least("budget_bytes", 1),
    "latent_shape": _latent_shape,
    "prefix_tokens": _int_at_least("prefix_tokens", 0),
    "lattices": _lattices,
    "tau": _real("tau", 0.0, None, True, "a finite number > 0 (softmax temperature)"),
    "aggregate": _one_of("aggregate", mapping.AGGREGATES),
    "weights": _weights,
    "gamma": _real("gamma", 0.0, 1.0, True, "a number in (0, 1]"),
    "batch": _one_of("batch", ("cond", "uncond", "all"), "'cond', 'uncond' or 'all'"),
    "cfg_order": _one_of("cfg_order", (None, "uncond_first", "cond_first"), "None, 'uncond_first' or 'cond_first'"),
    "padding": _one_of("padding", mapping.PADDINGS),
}


@dataclass(slots=True)
class _Plan:
    """A layer's common cross call, planned once (see ``AttnTap._capture_item``): valid for
    calls of these shapes and dtype while the tap's settings stay the same."""

    q_shape: torch.Size
    k_shape: torch.Size
    dtype: torch.dtype
    acc: _LayerAcc  # the layer's running sum
    flat: torch.Tensor  # (1, T'*F') view of it
    vec: torch.Tensor  # (1, H*Lk) pooling weights / H, tiled over heads
    lattice: tuple[int, int]
    item: int  # the batch item kept (the conditional half of a CFG pair)


@dataclass
class _Pass:
    """One call's recompute plan: the layer its sums go to and the buffers its chunks fill."""

    name: str  # the layer (``name@T'xF'`` on a second lattice)
    cross: bool
    pool: str | None  # the tap's pooling for a cross call; None for a self call
    lat: tuple | None  # the call's lattice (T', F'), None when not mapped
    per_call: bool  # grids resized per call (aggregate="max", keep calls or steps)
    fused: bool  # chunks fold straight into the layer's running sum
    keep_probs: bool
    mapped: bool
    shape: tuple[int, int, int, int]  # (B, H, Lq, Lk)
    hk: int  # key heads
    g: int  # query heads per key head
    prefix: int  # prefix tokens stripped before the lattice
    head_mean: bool = False
    probs: torch.Tensor | None = None  # (B, Lq, Lk) head mean kept (keep="probs")
    acc3: torch.Tensor | None = None  # (B, 1, T'*F') the layer's running sum, fused
    w: float = 1.0  # the call's weight in the running sum
    out: torch.Tensor | None = None  # pooled values | received attention, not fused
    vec: torch.Tensor | None = None  # (B, 1, Hk*Lk*g) head mean and pooling weights
    mask: torch.Tensor | None = None  # keys max pooling keeps
    row: int = 0  # bytes kept per chunk row
    fixed: int = 0  # bytes kept per call


class AttnTap:
    """Collects attention probabilities and their T x F maps.

    Args:
        target_T, target_F: the grid every map is resized to (time frames x mel bins).
        pool: text-token pooling per query: "mean" (over content tokens), "max", "softmax"
            (relevance-weighted, temperature ``tau``), "subset" (mean over ``tokens``), or
            None to keep per-token maps.
        cross_ratio: the last rule that tags a call (``kind_source="heuristic"``), used
            only when no fact and no override decides: a call is "cross" when
            ``min(q_len, k_len) <= cross_ratio * max(q_len, k_len)``, i.e. the shorter
            sequence is at most ``cross_ratio`` times the longer one; else "self". 0 never
            tags a call "cross" this way, 1 tags every such call "cross". The rules, in
            order (``rec.kind_source`` names the one that decided): "args", the issuing
            module's forward arguments (``encoder_hidden_states``, ``context``,
            ``key_value_states``, ``cross_attention_states``, ``memory``,
            ``encoder_outputs``...: a value means cross, None means self; an
            ``nn.MultiheadAttention`` whose key is its query, or holds the same values, is
            self; latent and context tokens concatenated into one call is "joint");
            "attribute", what the module states (``is_cross_attention``, or a path ending in
            a known cross-attention name such as ``encoder_attn``, ``EncDecAttention``,
            ``attn2``, ``cross_attn``); "override", the tap's ``kind_rules``; "cache", a
            module handed a cache of its own past keys is self (a one-token decode step is
            never called cross); "heuristic", the length rule.
        kind_rules: a user override, tried after the module's facts and before the length
            rule: a mapping from fnmatch layer patterns to "cross"/"self" (first match wins),
            or a callable ``(name, q_len, k_len) -> "cross" | "self" | None``.
        kinds: which kinds are recomputed and mapped ("cross", "self"); other calls get a
            record only (nothing computed). A "joint" call feeds both: its latent-query rows
            over the context keys (renormalised over those keys) are mapped as a cross call
            under the layer's name, its latent block as a self call under ``name + ":self"``.
        records: "all" (a record per call in ``tap.store``) or "selected" (records only for
            the calls the tap selects; ``tap.counts`` still counts every call per layer).
        layers: fnmatch patterns on the layer name; calls elsewhere get a record only.
        steps: (start, stop) range of steps to capture, stop exclusive; None = all.
        kernels: which kernel shims feed this tap.
        keep: None, or any of "calls" (each call's grid map on its record, copied to the
            CPU per call), "probs" (each call's exact head-averaged probabilities
            (B, q_len, k_len) on its record), "steps" (per-step maps averaged over the step's
            calls, held on the device: :meth:`step_maps`; grows by one map per step).
        budget_bytes: cap on the temporaries of one call's recompute (the float32 block of
            probabilities of a chunk of query rows, float32 copies of half-precision q/k,
            head means, pooled rows); the probabilities kept with keep="probs" come on top.
        latent_shape: (T, F) of the denoiser latent (time, frequency), or (T,) for a
            time-only latent; None = record only, no maps.
        prefix_tokens: tokens prepended to the query sequence (stripped before mapping).
        lattices: extra (T', F') candidates tried before the strided ones.
        content: the prompt's content tokens (indices, a bool mask (Lk,) or (B, Lk), or a
            mapping from layer pattern (str, fnmatch) or key length (int) to either; layer
            patterns are tried first) for mean/max/softmax pooling; default all keys.
        tokens: the token subset for pool="subset" (same forms).
        relevance, tau: scores r_j (Lk,) or (B, Lk) (or mapping k_len -> scores) and the
            temperature for pool="softmax".
        aggregate: "mean" (weighted mean over layers and steps, Eq. 8) or "max" (cellwise
            max over the calls; weights only select).
        weights: "uniform", "late" (w_t = gamma^(N-1-t)), or a mapping layer -> non-negative
            weight (layer-learned, see :func:`aiba.maps.mapping.fit_layer_weights`).
        gamma: decay of "late".
        batch: with a CFG-doubled batch, which half to keep: "cond", "uncond" or "all".
        cfg_order: the backend's fact about the batch: None (not CFG-doubled: every item is kept),
            "uncond_first" or "cond_first".
        padding: out-of-bounds handling of the bilinear resize ("border", "zeros",
            "reflection"); "border" equals F.interpolate(align_corners=False).
    """

    _CACHE_FIELDS = frozenset({"content", "tokens", "relevance", "tau", "pool", "cfg_order", "batch"})

    def __init__(
        self,
        target_T: int = 128,
        target_F: int = 64,
        pool: str | None = "mean",
        cross_ratio: float = 0.5,
        *,
        kinds: Iterable[str] = ("cross",),
        kind_rules: Mapping[str, str] | Callable[[str, int, int], str | None] | None = None,
        records: str = "all",
        layers: str | Sequence[str] | None = None,
        steps: tuple[int, int] | None = None,
        kernels: Iterable[str] = KERNELS,
        keep: str | Sequence[str] | None = None,
        budget_bytes: int = 64 << 20,
        latent_shape: Sequence[int] | None = None,
        prefix_tokens: int = 0,
        lattices: Sequence[tuple[int, int]] = (),
        content=None,
        tokens=None,
        relevance=None,
        tau: float = 1.0,
        aggregate: str = "mean",
        weights: str | Mapping[str, float] = "uniform",
        gamma: float = 0.9,
        batch: str = "cond",
        cfg_order: str | None = None,
        padding: str = "border",
    ) -> None:
        self._wcache: dict = {}  # pooling weights, per layer (cleared when pooling settings change)
        self._lcache: dict = {}  # (layer, tokens) -> (latent_shape, lattices, lattice)
        # every setting goes through __setattr__, which validates it (see _SETTINGS)
        self.target_T, self.target_F = target_T, target_F
        self.pool = pool
        self.cross_ratio = cross_ratio
        self.kinds = kinds
        self.kind_rules = kind_rules
        self.records = records
        self.layers = layers
        self.steps = steps
        self.kernels = kernels
        self.keep = keep
        self.budget_bytes = budget_bytes
        self.latent_shape = latent_shape
        self.prefix_tokens = prefix_tokens
        self.lattices = lattices
        self.content, self.tokens, self.relevance, self.tau = content, tokens, relevance, tau
        self.aggregate = aggregate
        self.weights = weights
        self.gamma = gamma
        self.batch = batch
        self.cfg_order = cfg_order
        self.padding = padding
        self.model_paths: dict[int, str] = {}
        self.reset()

    # settings are validated on every assignment (constructor, configure(), attribute);
    # settings that change pooling weights invalidate the cache
    def __setattr__(self, key, value):
        check = _SETTINGS.get(key)
        if check is not None:
            value = check(value)
        object.__setattr__(self, key, value)
        if check is not None or key in AttnTap._CACHE_FIELDS:
            self._plans = {}  # per-layer capture plans hold settings: rebuilt after any change
        if key in AttnTap._CACHE_FIELDS and "_wcache" in self.__dict__:
            self._wcache.clear()
        if key == "layers" and "_selcache" in self.__dict__:
            self._selcache.clear()

    def configure(self, **settings) -> "AttnTap":
        """Set several settings at once (backends call this); returns the tap."""
        for key, value in settings.items():
            if key.startswith("_") or key not in self.__dict__:
                raise AibaError(f"unknown tap setting {key!r}")
            setattr(self, key, value)
        return self

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every record, map and the step counter."""
        self.store: list[CallRecord] = []
        self.step = 0
        self._acc: dict[str, _LayerAcc] = {}
        self._steps: dict[int, list] = {}  # keep="steps": step -> [sum of grids, calls]
        self._order: dict[str, int] = {}
        self._warned: set = set()
        self.counts: dict[str, int] = {}  # calls seen per layer name, recorded or not
        self.errors: list[tuple[str, str]] = []  # (layer, message) of calls that failed to record
        self._lattice_of: dict[str, tuple] = {}  # layer name -> first lattice it mapped on
        self._selcache: dict[str, bool] = {}  # layer name -> matches ``layers``
        self._plans: dict[str, _Plan] = {}  # layer name -> its common cross call's plan (see _capture_item)

    def next_step(self) -> int:
        """Advance the denoising-step counter (backends call this once per step)."""
        self.step += 1
        self._order.clear()
        return self.step

    @property
    def freq_resolved(self) -> bool:
        return self.latent_shape is not None and len(self.latent_shape) == 2

    @property
    def layer_count(self) -> int:
        """Layers holding a running map sum (one per layer and lattice captured so far)."""
        return len(self._acc)

    def state_bytes(self) -> int:
        """Bytes of the state held on the device (per-layer running sums, and per-step maps
        with keep="steps")."""
        held = [a.total for a in self._acc.values()] + [v[0] for v in self._steps.values()]
        return sum(t.numel() * t.element_size() for t in held)

    def step_maps(self) -> tuple[list[int], torch.Tensor]:
        """keep="steps": (steps, maps (S, B, T, F) on the CPU), each the mean of that step's
        captured calls (restrict which layers enter with the tap's ``layers=``)."""
        self._raise_errors()
        if "steps" not in self.keep:
            raise AibaError('per-step maps need AttnTap(keep="steps")')
        if not self._steps:
            raise AibaError("no captured calls to map")
        steps = sorted(self._steps)
        return steps, torch.stack([self._steps[s][0] / self._steps[s][1] for s in steps]).float().cpu()

    # ------------------------------------------------------------- selection
    def _auto_name(self, kernel: str) -> str:
        i = self._order.get(kernel, 0)
        self._order[kernel] = i + 1
        return f"{kernel}.{i}"

    def heuristic_kind(self, q_len: int, k_len: int) -> str:
        """The ``cross_ratio`` rule (see the class docstring)."""
        return "cross" if min(q_len, k_len) <= self.cross_ratio * max(q_len, k_len) else "self"

    def override_kind(self, name: str | None, q_len: int, k_len: int) -> str | None:
        """The tap's ``kind_rules`` for this call, or None when they say nothing."""
        rules = self.kind_rules
        if rules is None:
            return None
        if callable(rules):
            kind = rules(name, q_len, k_len)
            if kind is not None and kind not in KINDS:
                raise AibaError(f"layer {name!r}: kind_rules returned {kind!r}, expected one of {KINDS} or None")
            return kind
        if name is None:
            return None
        for pattern, kind in rules.items():
            if fnmatch.fnmatchcase(name, pattern):
                return kind
        return None

    def _selected(self, name: str, kind: str) -> bool:
        if kind == "joint":
            if not self.kinds:
                return False
        elif kind not in self.kinds:
            return False
        if self.steps is not None and not self.steps[0] <= self.step < self.steps[1]:
            return False
        if self.layers is not None:
            hit = self._selcache.get(name)
            if hit is None:
                hit = self._selcache[name] = any(fnmatch.fnmatchcase(name, p) for p in self.layers)
            return hit
        return True

    def _batch_rows(self, b: int, name: str) -> slice | None:
        """The batch rows to keep: the CFG half the tap was asked for, or None for all."""
        if self.cfg_order is None or self.batch == "all":
            return None
        if b % 2:
            raise AibaError(
                f"layer {name!r}: batch {b} is odd but the tap was told the batch is CFG-doubled (cfg_order={self.cfg_order!r}); "
                "set cfg_order=None or batch='all'"
            )
        half = b // 2
        first = (self.cfg_order == "cond_first") == (self.batch == "cond")
        return slice(0, half) if first else slice(half, b)

    def _pool_weights(self, k_len: int, b: int, device, name: str):
        spec = self.tokens if self.pool == "subset" else self.content
        key = ("pool", k_len, b, device, mapping.spec_key(spec, k_len, name))
        hit = self._wcache.get(key)
        if hit is None:
            if self.pool in ("mean", "softmax") and mapping.resolve_spec(self.content, k_len, name) is None and k_len not in self._warned:
                if self.pool == "mean":
                    self._warned.add(k_len)
                    warnings.warn(
                        f"layer {name!r}: pool='mean' over all {k_len} keys is the constant 1/{k_len} (each row of P sums to 1); "
                        "pass content= (the prompt's content tokens), tokens= with pool='subset', or pool='max'",
                        AibaWarning,
                        stacklevel=4,
                    )
            hit = mapping.token_weights(self.pool, k_len, b, device, content=self.content, tokens=self.tokens,
                                        relevance=self.relevance, tau=self.tau, name=name)
            self._wcache[key] = hit
        return hit

    # --------------------------------------------------------------- capture
    def record_call(self, kernel: str, name: str | None, kind: str, kind_source: str,
                    shape: tuple[int, int, int, int] | Callable[[], tuple[int, int, int, int]], outside: bool = False,
                    context: tuple[int, int] | None = None) -> CallRecord | None:
        """Decide and note one call before anything is computed for it. ``shape``: the call's
        (B, H, Lq, Lk), or a callable returning it (asked only when a record is kept). Returns
        its record (``captured`` True when the tap selected it for recompute), or None when the
        tap keeps no record for it (``records="selected"``)."""
        if name is None:
            name = self._auto_name(kernel)
        counts = self.counts
        counts[name] = counts.get(name, 0) + 1
        selected = not outside and self._selected(name, kind)
        if not selected and self.records == "selected":
            return None
        b, h, lq, lk = shape() if callable(shape) else shape
        rec = CallRecord(name, kernel, kind, self.step, lq, lk, h, b, len(self.store), kind_source, None, selected,
                         outside, None, None, context)
        self.store.append(rec)
        if selected and (lq == 0 or lk == 0) and self.computes:
            rec.captured, rec.note = False, "empty"  # the kernel returned its result; no probabilities exist
        return rec

    @property
    def computes(self) -> bool:
        """Whether a selected call is recomputed (probabilities kept or maps made)."""
        return "probs" in self.keep or self.latent_shape is not None

    def capture_call(self, kernel: str, rec: CallRecord, x: AttnInputs) -> None:
        """Recompute a selected call. A joint call's record keeps the probabilities of the
        whole call (keep="probs"); its maps come from two blocks: latent-query rows over the
        context keys (a softmax over those keys only, i.e. rows renormalised over the
        context) as a cross call under the layer's name, and the latent block (renormalised
        over the latent keys) as a self call under ``name + ":self"``."""
        if rec.kind != "joint":
            plan = self._plans.get(rec.name)
            if (plan is not None and rec.kind == "cross" and plan.q_shape == x.q.shape and plan.k_shape == x.k.shape
                    and plan.dtype is x.q.dtype and not x.maskable and not x.softcap):
                self._fold_item(rec, x, plan)  # the common cross call, its layer's plan in hand
                return
            self.on_call(kernel, rec.name, rec.kind, rec.kind_source, x, rec.outside, rec=rec)
            return
        if "probs" in self.keep:
            rows = self._batch_rows(x.shape[0], rec.name)
            rec.probs = head_mean_probs(x.select_batch(rows), self.budget_bytes).cpu()  # (B, L, L)
        if self.latent_shape is None:
            return
        start, stop = rec.context
        _, _, lq, lk = x.shape
        latent = slice(stop, lk) if start == 0 else slice(0, start)  # latent keys
        rows = latent if lq == lk else slice(0, lq)  # latent queries (all of them when only keys are joint)
        parts = []
        if "cross" in self.kinds:
            parts.append(("cross", rec.name, slice(start, stop)))
        if "self" in self.kinds:
            parts.append(("self", rec.name + ":self", latent))
        for kind, name, cols in parts:
            part = dataclasses.replace(rec, name=name, probs=None)
            self.on_call(kernel, name, kind, rec.kind_source, _block(x, rows, cols), rec=part)
            if rec.lattice is None:
                rec.lattice, rec.grid = part.lattice, part.grid

    def record_failure(self, rec: CallRecord | None, name: str | None, exc: BaseException) -> None:
        """Something went wrong while recording a call (after the kernel ran): note it on the
        record, warn once per layer; ``maps()`` raises it."""
        msg = f"{type(exc).__name__}: {exc}"
        if rec is not None:
            rec.error, rec.captured = msg, False
            name = rec.name
        self.errors.append((str(name), msg))
        key = ("error", name)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"layer {name!r}: attention call not recorded ({msg}); the forward was not affected, "
                          "maps() will raise", AibaWarning, stacklevel=4)

    def _lattice_name(self, name: str, lattice: tuple) -> str:
        """A module issuing calls on several lattices gets one layer per lattice: the first
        keeps its name, later ones are named ``name@T'xF'``."""
        first = self._lattice_of.setdefault(name, lattice)
        return name if first == lattice else f"{name}@{'x'.join(str(v) for v in lattice)}"

    def on_call(self, kernel: str, name: str | None, kind: str, kind_source: str, x: AttnInputs,
                 outside: bool = False, rec: CallRecord | None = None) -> CallRecord | None:
        """Recompute one call the tap selected (``rec`` from :meth:`record_call`); without
        ``rec`` the call is recorded first. ``outside``: the tap was given a model and the
        call came from elsewhere (a text encoder, the VAE): it is recorded, never recomputed.
        """
        if kernel not in self.kernels:
            return None
        if rec is None:
            rec = self.record_call(kernel, name, kind, kind_source, x.shape, outside)
            if rec is None or not rec.captured:
                return rec
        name = rec.name if name is None else name
        self._recompute(rec, name, kind, x)
        return rec

    def _lattice(self, name: str, n: int) -> tuple[int, int]:
        """The lattice of ``n`` tokens of layer ``name``, cached per layer (and per setting)."""
        hit = self._lcache.get((name, n))
        if hit is not None and hit[0] is self.latent_shape and hit[1] is self.lattices:
            return hit[2]
        lat = mapping.find_lattice(n, self.latent_shape, name=name, extra=self.lattices)
        self._lcache[(name, n)] = (self.latent_shape, self.lattices, lat)
        return lat

    def _pool_vector(self, k_len: int, b: int, hk: int, g: int, device, name: str) -> torch.Tensor:
        """(B, 1, Hk * Lk * g) float32: the pooling weights W_j / H in the keys-first layout of
        the probabilities, so that one matmul does the head mean and the token pooling."""
        key = ("vec", name, k_len, b, hk, g, device)
        vec = self._wcache.get(key)
        if vec is None:
            w, _ = self._pool_weights(k_len, b, device, name)  # (B|1, Lk)
            vec = (w.float() / (hk * g))[:, None, :, None].expand(b, hk, k_len, g).reshape(b, 1, hk * k_len * g)
            self._wcache[key] = vec
        return vec

    def _row_vector(self, b: int, n: int, value: float, device) -> torch.Tensor:
        """(B, 1, n) filled with ``value`` (the self-attention sum over heads and queries)."""
        key = ("ones", b, n, value, device)
        vec = self._wcache.get(key)
        if vec is None:
            vec = self._wcache[key] = torch.full((b, 1, n), value, dtype=torch.float32, device=device)
        return vec

    def _capture_item(self, rec: CallRecord, name: str, x: AttnInputs, item: int) -> bool:
        """The common cross call: one kept batch item (e.g. the conditional CFG half), no mask,
        one key head per query head, the whole (H, Lk, Lq) block within the budget. Folds the
        pooled probabilities straight into the layer's running sum (three kernels for float32,
        five for half types; see :func:`aiba.capture.probs.fold_pooled_item`). False: not applicable.

        What the layer needs (lattice, sum, pooling vector, kept item) is kept as a plan per
        layer, valid while the call's shapes and dtype stay the same; :meth:`capture_call`
        uses it directly for the layer's next calls. Any setting change or :meth:`reset`
        drops every plan."""
        q, k = x.q, x.k
        _, h, lq, e = q.shape
        lk = k.shape[2]
        if k.shape[1] != h:
            return False
        block = h * lk * lq * 4 + (0 if q.dtype == torch.float32 else (lq + lk) * h * e * 4)
        if block > self.budget_bytes:
            return False
        lat = self._lattice(name, lq - self.prefix_tokens)
        layer = self._lattice_name(name, lat)
        device = q.device
        acc = self._acc.get(layer)
        if acc is None:
            acc = self._acc[layer] = _LayerAcc(torch.zeros((1, *lat), dtype=torch.float32, device=device), 0.0, 0,
                                              on_lattice=True)
        elif tuple(acc.total.shape) != (1, *lat) or not acc.on_lattice:
            return False  # the general path names the mismatch
        flat = acc.total.view(1, lat[0] * lat[1])  # (1, T'*F')
        vec = self._pool_vector(lk, 1, h, 1, device, name).view(1, h * lk)  # W_j / H, tiled over heads
        plan = _Plan(q.shape, k.shape, q.dtype, acc, flat, vec, lat, item)
        if rec.name == name:
            self._plans[name] = plan
        self._fold_item(rec, x, plan)
        return True

    def _fold_item(self, rec: CallRecord, x: AttnInputs, plan: "_Plan") -> None:
        rec.lattice = plan.lattice
        fold_pooled_item(x.q[plan.item], x.k[plan.item], x.scale, plan.vec, plan.flat, self._count(plan.acc, rec.step),
                         self.prefix_tokens)

    def _recompute(self, rec: CallRecord, name: str, kind: str, x: AttnInputs) -> None:
        """Recompute a selected call's probabilities and fold them into the layer's map.

        Cross calls are recomputed keys-first, so the head mean and the token pooling are one
        matmul against a cached weight vector, and with the default settings (mean aggregate,
        no per-call grids) that matmul adds straight into the layer's running sum on its lattice
        (``baddbmm_``): per chunk one ``baddbmm`` (scores, scale included), one in-place
        softmax and that one fold. Self calls sum the attention each key receives the same way.
        """
        keep_probs = "probs" in self.keep
        mapped = self.latent_shape is not None
        if not (keep_probs or mapped):
            return  # a record is all that was asked for: nothing to recompute
        rows = self._batch_rows(rec.batch, name)
        if (kind == "cross" and mapped and not keep_probs and self.aggregate == "mean" and self.pool in _WEIGHTED
                and not x.maskable and not x.softcap
                and not ("calls" in self.keep or "steps" in self.keep)):
            item = (0 if rec.batch == 1 else None) if rows is None else rows.start if rows.stop - rows.start == 1 else None
            if item is not None and self._capture_item(rec, name, x, item):
                return
        x = x.select_batch(rows)
        ps = self._plan_pass(rec, name, kind, x)
        if ps.cross:
            self._cross_pass(x, ps)
        else:
            self._self_pass(x, ps)
        if keep_probs:
            rec.probs = ps.probs.cpu()
        if mapped and not ps.fused:
            self._fold_values(rec, ps)

    def _plan_pass(self, rec: CallRecord, name: str, kind: str, x: AttnInputs) -> _Pass:
        """Where one call's chunks go: the layer (and lattice), the buffers and the budget."""
        keep_probs = "probs" in self.keep
        mapped = self.latent_shape is not None
        b, h, lq, lk = x.shape
        hk = x.k.shape[1]
        g = h // hk
        device = x.q.device
        cross = kind == "cross"
        p = self.prefix_tokens
        n = (lq if cross else lk) - p  # lattice cells: queries (cross) or keys (self)
        lat = rec.lattice = self._lattice(name, n) if mapped else None
        if mapped:
            name = self._lattice_name(name, lat)  # the layer the sums go to
        per_call = self.aggregate == "max" or bool({"calls", "steps"} & self.keep)  # grids resized per call
        fused = mapped and not per_call and (not cross or self.pool in ("mean", "subset", "softmax"))
        ps = _Pass(name=name, cross=cross, pool=self.pool if cross else None, lat=lat, per_call=per_call,
                   fused=fused, keep_probs=keep_probs, mapped=mapped, shape=(b, h, lq, lk), hk=hk, g=g, prefix=p)
        if keep_probs:
            ps.probs = torch.empty(b, lq, lk, dtype=torch.float32, device=device)  # (B, Lq, Lk)
        if fused:
            acc, ps.w = self._acc_weight(name, (b, *lat), rec.step, device)
            ps.acc3 = acc.total.view(b, 1, n)  # (B, 1, T'*F'): the running sum, flat
        ps.head_mean = keep_probs or (cross and mapped and ps.pool in ("max", None))
        ps.row = b * lk * 4 * (2 if ps.pool == "max" else 1) if ps.head_mean else 0  # head mean (+ its masked copy)
        if mapped and not fused:
            out_shape = (b, lq) if cross and ps.pool is not None else (b, lk, lq) if cross else (b, 1, lk)
            ps.out = torch.zeros(out_shape, dtype=torch.float32, device=device)  # pooled values | received
            ps.fixed = ps.out.numel() * 4
            ps.row += b * 4
        if cross and mapped and ps.pool not in ("max", None):
            ps.vec = self._pool_vector(lk, b, hk, g, device, name)
        if cross and ps.pool == "max":
            _, ps.mask = self._pool_weights(lk, b, device, name)
        return ps

    def _cross_pass(self, x: AttnInputs, ps: _Pass) -> None:
        """Chunks of a cross call, keys first: head mean, token pooling, fold."""
        b, _, lq, lk = ps.shape
        p, hk, g = ps.prefix, ps.hk, ps.g
        for start, stop, p5 in prob_chunks(x, self.budget_bytes, keys_first=True, row_bytes=ps.row,
                                           fixed_bytes=ps.fixed):
            c = stop - start  # p5: (B, Hk, Lk, g, c)
            if ps.head_mean:
                at = p5.mean(dim=(1, 3))  # (B, Lk, c): head-mean probabilities, keys first
                if ps.keep_probs:
                    ps.probs[:, start:stop] = at.transpose(1, 2)
            if not ps.mapped:
                continue
            if ps.fused:
                p3 = p5.view(b, hk * lk * g, c)
                if p == 0 and c == lq:
                    ps.acc3.baddbmm_(ps.vec, p3, alpha=ps.w)  # head mean + pooling + fold: (B, 1, N)
                elif stop > p:
                    lo = max(start, p)
                    ps.acc3[:, :, lo - p : stop - p].baddbmm_(ps.vec, p3[:, :, lo - start :], alpha=ps.w)
            elif ps.pool is None:
                ps.out[:, :, start:stop] = at
            elif ps.pool == "max":
                if ps.mask is not None:
                    at = at.masked_fill(~ps.mask[:, :, None], float("-inf"))
                ps.out[:, start:stop] = at.amax(dim=1)  # (B, c)
            else:
                ps.out[:, start:stop] = torch.bmm(ps.vec, p5.view(b, hk * lk * g, c)).view(b, c)

    def _self_pass(self, x: AttnInputs, ps: _Pass) -> None:
        """Chunks of a self call: the attention each key receives, summed over heads and queries."""
        b, h, lq, lk = ps.shape
        p = ps.prefix
        for start, stop, p5 in prob_chunks(x, self.budget_bytes, row_bytes=ps.row, fixed_bytes=ps.fixed):
            c = stop - start  # p5: (B, Hk, g, c, Lk)
            if ps.keep_probs:
                torch.mean(p5.view(b, h, c, lk), dim=1, out=ps.probs[:, start:stop])
            if ps.mapped:
                ones = self._row_vector(b, h * c, 1.0 / (h * lq), x.q.device)  # mean over heads and queries
                p3 = p5.view(b, h * c, lk)
                if ps.fused:
                    ps.acc3.baddbmm_(ones, p3[:, :, p:] if p else p3, alpha=ps.w)  # attention each key receives
                else:
                    ps.out.baddbmm_(ones, p3)

    def _fold_values(self, rec: CallRecord, ps: _Pass) -> None:
        """A call computed apart from the running sum: its values on the lattice, resized
        per call when calls or steps are kept or layers are max-aggregated, then folded."""
        p, out = ps.prefix, ps.out
        if ps.cross:
            values = out[:, p:] if ps.pool is not None else out[:, :, p:]  # (B, N) | (B, Lk, N)
        else:
            values = out[:, 0, p:]  # (B, N): mean attention received, keys = lattice cells
        lattice_map = mapping.to_lattice(values, ps.lat)  # (B, [Lk,] T', F')
        if not ps.per_call:
            # resizing is linear: a weighted mean of resized maps is the resized weighted mean,
            # so the sums stay on the lattice and maps() resizes each layer once
            self._fold(ps.name, lattice_map, rec.step, on_lattice=True)
            return
        grid = mapping.resize(lattice_map, self._grid_size, self.padding)  # (B, [Lk,] T, F)
        if "calls" in self.keep:
            rec.grid = grid.cpu()
        if "steps" in self.keep:
            held = self._steps.get(rec.step)
            if held is None:
                self._steps[rec.step] = [grid.clone(), 1]
            else:
                held[0].add_(grid)
                held[1] += 1
        self._fold(ps.name, grid, rec.step)

    @property
    def _grid_size(self) -> tuple[int, int]:
        return self.target_T, self.target_F if self.freq_resolved else 1

    def _acc_weight(self, name: str, shape, step: int, device, on_lattice: bool = True) -> tuple["_LayerAcc", float]:
        """Mean aggregate: the layer's running sum (zeros at first), re-referenced to the newest
        step, and the weight of a call at ``step``; counts the call."""
        acc = self._acc.get(name)
        if acc is None:
            acc = self._acc[name] = _LayerAcc(torch.zeros(shape, dtype=torch.float32, device=device), 0.0, step,
                                              on_lattice=on_lattice)
        elif acc.total.shape != shape or acc.on_lattice != on_lattice:
            raise AibaError(
                f"layer {name!r}: map of shape {tuple(shape)} does not match the {tuple(acc.total.shape)} accumulated "
                "so far (batch or prompt length changed?); call tap.reset() between runs"
            )
        return acc, self._count(acc, step)

    def _count(self, acc: "_LayerAcc", step: int) -> float:
        """Count a call at ``step`` into ``acc`` (mean aggregate) and return its weight; with
        "late" weights the sums are first re-referenced to the newest step."""
        if not acc.calls:
            acc.last = step
        acc.steps.add(step)
        acc.calls += 1
        w = 1.0
        if self.weights == "late":
            if step > acc.last:  # re-reference the sums to the newer step
                d = self.gamma ** (step - acc.last)
                acc.total.mul_(d)
                acc.weight *= d
                acc.last = step
            else:
                w = self.gamma ** (acc.last - step)
        acc.weight += w
        return w

    def _fold(self, name: str, grid: torch.Tensor, step: int, on_lattice: bool = False) -> None:
        if self.aggregate == "mean":
            acc, w = self._acc_weight(name, grid.shape, step, grid.device, on_lattice)
            acc.total.add_(grid, alpha=w)
            return
        acc = self._acc.get(name)
        if acc is None:
            acc = self._acc[name] = _LayerAcc(grid.clone(), 0.0, step, on_lattice=on_lattice)
        elif acc.total.shape != grid.shape or acc.on_lattice != on_lattice:
            raise AibaError(
                f"layer {name!r}: map of shape {tuple(grid.shape)} does not match the {tuple(acc.total.shape)} accumulated "
                "so far (batch or prompt length changed?); call tap.reset() between runs"
            )
        else:
            torch.maximum(acc.total, grid, out=acc.total)
        acc.steps.add(step)
        acc.calls += 1

    # ------------------------------------------------------------------ maps
    def _warn_nonfinite(self, accs: Mapping[str, _LayerAcc]) -> None:
        """Warn once per layer whose sums hold NaN or inf (q or k of a captured call were not
        finite, e.g. a half-precision overflow). Checked when maps are read, so the capture path
        never waits on the device; the maps are returned as computed."""
        for n, a in accs.items():
            if ("nonfinite", n) in self._warned or bool(torch.isfinite(a.total).all()):
                continue
            self._warned.add(("nonfinite", n))
            warnings.warn(
                f"layer {n!r}: its map holds NaN or inf ({int((~torch.isfinite(a.total)).sum())} of "
                f"{a.total.numel()} cells of shape {tuple(a.total.shape)}): q or k of a captured call were not finite "
                "(an overflow in half precision?); the map is returned as computed",
                AibaWarning,
                stacklevel=3,
            )

    def maps(self, layers: str | Sequence[str] | Callable[[str], bool] | None = None,
             layer_weights: Mapping[str, float] | None = None) -> TapMaps:
        """Aggregate the captured calls (Eq. 8) into CPU maps.

        ``layers`` restricts which layers enter (fnmatch patterns or a predicate), e.g. one
        text stream. ``layer_weights`` overrides the tap's weights with layer-learned ones.
        """
        self._raise_errors()
        if self.latent_shape is None:
            raise AibaError("the tap has no latent_shape, so no maps were made; set latent_shape=(T, F) or (T,)")
        if callable(layers):
            keep = layers
        else:
            pats = _as_patterns(layers)
            keep = (lambda n: True) if pats is None else (lambda n: any(fnmatch.fnmatchcase(n, p) for p in pats))
        accs = {n: a for n, a in self._acc.items() if keep(n)}
        if not accs:
            seen = sorted({r.name for r in self.store})
            raise AibaError(f"no captured calls to map (layers={layers!r}); calls seen: {seen[:8]}{'...' if len(seen) > 8 else ''}")
        lw = layer_weights if layer_weights is not None else (self.weights if isinstance(self.weights, Mapping) else None)
        if lw is not None:
            unknown = [n for n in accs if n not in lw]
            if unknown:
                raise AibaError(f"layer_weights lack layers {unknown[:4]}; got weights for {list(lw)[:4]}")
            if any(float(lw[n]) < 0 for n in accs):
                raise AibaError("layer weights must be non-negative")
        self._warn_nonfinite(accs)
        totals = {n: mapping.resize(a.total, self._grid_size, self.padding) if a.on_lattice else a.total
                  for n, a in accs.items()}  # (B, [Lk,] T, F) per layer
        shapes = {tuple(t.shape) for t in totals.values()}
        if len(shapes) > 1:
            raise AibaError(f"layers have maps of different shapes {sorted(shapes)}; pick one stream with layers=")
        final = max(a.last for a in accs.values())
        layer_maps, num, den = {}, None, 0.0
        for n, a in accs.items():
            v, total = 1.0 if lw is None else float(lw[n]), totals[n]
            if self.aggregate == "max":
                layer_maps[n] = total
                if v > 0:
                    num = total.clone() if num is None else torch.maximum(num, total)
                continue
            d = self.gamma ** (final - a.last) if self.weights == "late" else 1.0
            layer_maps[n] = total / a.weight
            num = total * (v * d) if num is None else num.add(total, alpha=v * d)
            den += v * d * a.weight
        if num is None or (self.aggregate == "mean" and den <= 0):
            raise AibaError("all selected layers have zero weight")
        overall = num if self.aggregate == "max" else num / den
        return TapMaps(
            overall=overall.float().cpu(),
            layers={n: m.float().cpu() for n, m in layer_maps.items()},
            freq_resolved=self.freq_resolved,
            steps=len(set().union(*(a.steps for a in accs.values()))),
            calls=sum(a.calls for a in accs.values()),
        )

    def _raise_errors(self) -> None:
        if self.errors:
            layers = sorted({n for n, _ in self.errors})
            raise AibaError(f"{len(self.errors)} attention call(s) could not be recorded (layers {layers[:4]}"
                            f"{'...' if len(layers) > 4 else ''}); first: {self.errors[0][1]}")

    def __repr__(self) -> str:
        return (f"AttnTap(target={self.target_T}x{self.target_F}, pool={self.pool!r}, kinds={sorted(self.kinds)}, "
                f"latent_shape={self.latent_shape}, calls={len(self.store)}, step={self.step})")
