"""``aiba diagnose``: what attention a model really exposes, for a few denoising steps.

:func:`diagnose` runs a backend under capture and reports every attention call grouped by
module path (kernel, self/cross, q_len x k_len, heads, calls per step, the lattice it maps
to), a verdict (cross-attention exposed or not; 2-D time x frequency or time-only query
lattice; attention modules that ran without a call reaching the shims), and the health of
the cross maps (normalised entropy and flatness along time and along frequency).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from ..errors import AibaError

__all__ = ["CallGroup", "MapHealth", "Diagnosis", "diagnose", "format_report", "load_factory", "register"]



@dataclass(frozen=True)
class CallGroup:
    """The attention calls of one module path with one shape."""

    name: str  # module path inside the denoiser
    kernel: str
    kind: str  # "cross" | "self"
    kind_source: str  # "module" (from the module's arguments) | "heuristic" (cross_ratio)
    stream: str | None  # the backend's stream holding this path
    q_len: int
    k_len: int
    heads: int
    batch: int  # batch of the call (CFG-doubled when guidance is on)
    calls: int
    calls_per_step: float
    lattice: tuple | None  # (T', F') the queries map to (prefix stripped); None if none fits


@dataclass(frozen=True)
class MapHealth:
    """Cross map of one stream (first prompt, conditional half), read along each axis.

    Entropy is normalised to [0, 1] (1 = uniform); flatness is geometric / arithmetic mean
    of the profile (1 = flat). A time-only map has no frequency values (None)."""

    stream: str
    shape: tuple  # (target_T, target_F) of the map
    entropy_time: float
    flatness_time: float
    entropy_freq: float | None
    flatness_freq: float | None


@dataclass(frozen=True)
class Diagnosis:
    backend: str
    denoiser: str  # class name of the module whose calls are listed
    steps: int
    prompt: str
    latent_shape: tuple | None
    prefix_tokens: int  # prepended query tokens, stripped before mapping
    cfg_order: str | None
    exposes_cross_attention: bool
    frequency_resolved: bool
    query_lattice: str  # "time x frequency" | "time only" | "unknown"
    calls: list = field(default_factory=list)  # CallGroup
    attention_modules: int = 0  # attention modules inside the denoiser
    attention_module_runs: int = 0  # forward calls of those modules (hooks)
    calls_seen: int = 0  # attention calls the shims saw inside the denoiser
    escaped: int = 0  # module runs without a call reaching the shims
    escaped_modules: list = field(default_factory=list)
    outside_calls: int = 0  # calls outside the denoiser (text encoders, VAE): recorded, not mapped
    map_health: list = field(default_factory=list)  # MapHealth
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for c in d["calls"]:
            c["lattice"] = list(c["lattice"]) if c["lattice"] is not None else None
        return d


# ------------------------------------------------------------------ measures
def _entropy(p) -> float:
    """Normalised Shannon entropy of a non-negative profile (1 = uniform)."""
    import torch

    p = p.double().clamp_min(0)
    n = p.numel()
    if n < 2 or float(p.sum()) <= 0:
        return 1.0
    p = p / p.sum()
    h = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return float(h / math.log(n))


def _flatness(p) -> float:
    """Geometric mean / arithmetic mean of a non-negative profile (1 = flat)."""
    import torch

    p = p.double().clamp_min(0)
    m = float(p.mean())
    if m <= 0:
        return 1.0
    return float(torch.exp(torch.log(p.clamp_min(1e-12)).mean()) / m)


def map_health(stream: str, overall, freq_resolved: bool) -> MapHealth:
    """Health of an (B, T, F) map: item 0, profiles summed over the other axis."""
    m = overall[0]  # (T, F)
    t_prof = m.sum(dim=1)  # (T,)
    f_prof = m.sum(dim=0) if freq_resolved else None  # (F,)
    return MapHealth(stream, tuple(m.shape), _entropy(t_prof), _flatness(t_prof),
                     None if f_prof is None else _entropy(f_prof), None if f_prof is None else _flatness(f_prof))


# ------------------------------------------------------------ run watching
class _RunWatch:
    """Runs of each attention module, and the runs during which no call reached a shim.

    A run "reached a shim" when the tap gained a record while the module's forward was on the
    stack, whatever module the record is named by (an attention module may hand the kernel
    call to a child, or to a helper on its parent). An ``nn.TransformerEncoderLayer`` whose
    fused fast path computes attention without calling its ``self_attn`` counts as a run of
    ``self_attn``.
    """

    def __init__(self, modules: dict, tap) -> None:
        self.tap = tap
        self.paths = {id(m): n for n, m in modules.items()}
        self.runs = {n: 0 for n in modules}
        self.missed = {n: 0 for n in modules}
        self.layers: dict = {}  # id(encoder layer) -> path of its self_attn
        self.open: list = []  # [id(module), records when it started, [attention modules run inside]]

    def pre(self, module, args) -> None:
        key = id(module)
        if key in self.paths:
            for frame in self.open:
                frame[2].append(key)
            self.open.append([key, len(self.tap.store), []])
        elif key in self.layers:
            self.open.append([key, len(self.tap.store), []])

    def post(self, module, args, output) -> None:
        key = id(module)
        if key not in self.paths and key not in self.layers:
            return
        while self.open and self.open[-1][0] != key:  # a forward that raised left its frame open
            self.open.pop()
        if not self.open:
            return
        _, start, inner = self.open.pop()
        reached = len(self.tap.store) > start
        if key in self.paths:
            name = self.paths[key]
        else:
            name = self.layers[key]
            if any(self.paths.get(k) == name for k in inner):
                return  # self_attn ran as a module: its own run was counted
        self.runs[name] += 1
        self.missed[name] += not reached


@contextmanager
def _watch_runs(model, modules: dict, tap):
    """Count attention-module runs with global module hooks: per-module hooks would switch
    off ``nn.TransformerEncoderLayer``'s fast path (it checks its modules for hooks), so the
    model would not take the path it takes without diagnose."""
    from torch import nn
    from torch.nn.modules import module as torch_module

    watch = _RunWatch(modules, tap)
    for _, layer in model.named_modules():
        if isinstance(layer, nn.TransformerEncoderLayer) and id(layer.self_attn) in watch.paths:
            watch.layers[id(layer)] = watch.paths[id(layer.self_attn)]
    handles = [torch_module.register_module_forward_pre_hook(watch.pre),
               torch_module.register_module_forward_hook(watch.post)]
    try:
        yield watch
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------ the run
def _call_groups(inside, streams: dict, tap) -> list[CallGroup]:
    """The denoiser's calls grouped by (layer, kernel, kind, shape), with their stream and lattice."""
    import fnmatch

    from ..maps.mapping import find_lattice

    latent = tap.latent_shape

    def stream_of(name):
        return next((s for s, pats in streams.items() if any(fnmatch.fnmatchcase(name, p) for p in pats)), None)

    def lattice_of(r):
        if r.lattice is not None:
            return tuple(r.lattice)
        if latent is None:
            return None
        try:
            return find_lattice(r.q_len - tap.prefix_tokens, latent, name=r.name, extra=tap.lattices)
        except AibaError:
            return None

    groups: dict = {}
    steps_of: dict = {}
    for r in inside:
        key = (r.name, r.kernel, r.kind, r.q_len, r.k_len, r.heads)
        g = groups.setdefault(key, [r, 0])
        g[1] += 1
        steps_of.setdefault(r.name, set()).add(r.step)
    calls = []
    for (name, kernel, kind, q_len, k_len, heads), (r, n) in groups.items():
        calls.append(CallGroup(name, kernel, kind, r.kind_source, stream_of(name), q_len, k_len, heads, r.batch, n,
                               n / max(1, len(steps_of[name])), lattice_of(r)))
    return calls


def _notes(backend, tap, prompt: str, calls: list[CallGroup], inside, escaped: int, escaped_modules) -> list[str]:
    """What a reader of the diagnosis should know: the backend's own notes, the keys, stripped
    prefix tokens, calls that reached no shim."""
    notes = []
    if hasattr(backend, "infer"):
        notes += list(backend.infer().notes)
    for stream, toks in backend.tokens(prompt).items():
        k_lens = {c.k_len for c in calls if c.stream == stream and c.kind == "cross"}
        if toks and k_lens == {len(toks)}:
            notes.append(f"stream {stream}: {len(toks)} keys = {_summarise(toks)}")
    if tap.prefix_tokens:
        notes.append(f"{tap.prefix_tokens} prepended query token(s) stripped before mapping "
                     f"(q_len = {tap.prefix_tokens} + lattice cells)")
    if escaped:
        notes.append(f"{escaped} attention module run(s) reached no kernel shim (torch.compile, an unknown kernel, "
                     f"or an attention that does not call one): {escaped_modules[:4]}")
    if not inside:
        notes.append("no attention call was seen inside the denoiser")
    return notes


def diagnose(backend, *, prompt: str = "a bass solo with drums", steps: int = 2, pool: str = "max",
             seed: int = 0, seconds: float | None = None, guidance_scale: float | None = None,
             target: tuple = (64, 32), tiny: bool = False) -> Diagnosis:
    """Run ``backend`` (an adapter, or a name for :func:`aiba.backends.get`) for ``steps``
    denoising steps under capture and report what attention it exposes.

    ``pool`` pools the cross maps read for map health ("max" needs no content tokens; the
    backend restricts it to the prompt's words where it knows them).
    """
    from .. import AttnTap
    from ..backends import generic as G

    if isinstance(backend, str):
        from ..backends import get

        backend = get(backend, tiny=tiny)
    backend.streams()  # a generic backend probes its model here: before the run hooks count
    tap = AttnTap(target_T=target[0], target_F=target[1], pool=pool, kinds=("cross", "self"))
    modules = G.attention_modules(backend.denoiser)
    with _watch_runs(backend.denoiser, modules, tap) as watch:
        result = backend.generate(prompt, tap=tap, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                  seconds=seconds)
    runs, missed = watch.runs, watch.missed

    streams = backend.streams()
    latent = tap.latent_shape
    inside = [r for r in tap.store if not r.outside]  # issued by the denoiser
    outside = len(tap.store) - len(inside)

    calls = _call_groups(inside, streams, tap)

    escaped_modules = sorted(n for n in modules if missed[n])
    escaped = sum(missed.values())

    cross = [c for c in calls if c.kind == "cross"]
    exposes = bool(cross)
    if latent is None:
        lattice_kind, freq = "unknown", False
    else:
        lattice_kind = "time x frequency" if len(latent) == 2 else "time only"
        freq = any(c.lattice is not None and c.lattice[1] > 1 for c in (cross or calls)) and len(latent) == 2

    health = [map_health(s, m.overall, m.freq_resolved) for s, m in result.maps.items() if s != "self"
              and any(c.stream == s and c.kind == "cross" for c in calls)]
    notes = _notes(backend, tap, prompt, calls, inside, escaped, escaped_modules)
    return Diagnosis(
        backend=backend.name, denoiser=type(backend.denoiser).__name__, steps=steps, prompt=prompt,
        latent_shape=None if latent is None else tuple(latent), prefix_tokens=tap.prefix_tokens, cfg_order=tap.cfg_order,
        exposes_cross_attention=exposes, frequency_resolved=bool(freq), query_lattice=lattice_kind,
        calls=calls, attention_modules=len(modules), attention_module_runs=sum(runs.values()),
        calls_seen=len(inside), escaped=escaped, escaped_modules=escaped_modules, outside_calls=outside,
        map_health=health, notes=notes,
    )


def _summarise(tokens) -> str:
    """'a bass solo' + 9 x '<pad>' ... -> "3 words + </s> + 9 x <pad> + <seconds_start>"."""
    parts, words = [], 0
    for t in tokens:
        special = t.startswith("<") and t.endswith(">")
        if not special:
            words += 1
            continue
        if words:
            parts.append(f"{words} word{'s' if words > 1 else ''}")
            words = 0
        if parts and parts[-1].endswith(t):
            n = parts[-1].split(" x ")[0]
            parts[-1] = f"{int(n) + 1 if n.isdigit() else 2} x {t}"
        else:
            parts.append(t)
    if words:
        parts.append(f"{words} word{'s' if words > 1 else ''}")
    return " + ".join(parts)


# ------------------------------------------------------------------ report
def _fmt_lat(lat) -> str:
    return "-" if lat is None else f"{lat[0]}x{lat[1]}"


def _fmt_num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_report(d: Diagnosis) -> str:
    """The human-readable table."""
    inputs = d.prompt if d.prompt.startswith("the factory's") else f"prompt {d.prompt!r}"
    lines = [f"aiba diagnose: {d.backend} ({d.denoiser}), {d.steps} step(s), {inputs}",
             f"latent {d.latent_shape if d.latent_shape is not None else 'unknown'} ({d.query_lattice}); "
             f"prefix tokens {d.prefix_tokens}; CFG {d.cfg_order or 'none'}", ""]
    header = ("module path", "kernel", "kind", "stream", "q_len x k_len", "heads", "calls/step", "lattice")
    rows = [(c.name, c.kernel, c.kind + ("?" if c.kind_source == "heuristic" else ""), c.stream or "-",
             f"{c.q_len} x {c.k_len}", str(c.heads), f"{c.calls_per_step:g}", _fmt_lat(c.lattice)) for c in d.calls]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    cross = [c for c in d.calls if c.kind == "cross"]
    streams = sorted({c.stream or "?" for c in cross})
    per_step = sum(c.calls_per_step for c in cross)
    lats = sorted({c.lattice for c in (cross or d.calls) if c.lattice is not None}, reverse=True)
    lines += ["", "verdict",
              f"  exposes cross-attention: {'yes' if d.exposes_cross_attention else 'no'}"
              + (f" ({per_step:g} cross calls per step; streams {', '.join(streams)})" if cross else ""),
              "  frequency resolution:    "
              + ("2-D time x frequency" if d.frequency_resolved
                 else "time only: maps are time profiles (F = 1), never spread over frequency"
                 if d.query_lattice == "time only" else d.query_lattice if d.query_lattice == "unknown"
                 else "time x frequency latent, but queries have no frequency axis")
              + (f" (lattices {', '.join(_fmt_lat(x) for x in lats)})" if lats else ""),
              f"  escaped calls:           {d.escaped} ({d.attention_modules} attention modules ran "
              f"{d.attention_module_runs} times; {d.calls_seen} calls seen)",
              f"  outside the denoiser:    {d.outside_calls} calls (text encoders, VAE): recorded, not mapped"]
    if d.map_health:
        lines += ["", "map health (cross maps, first prompt, entropy/flatness: 1 = uniform)"]
        hh = ("stream", "map", "entropy time", "flatness time", "entropy freq", "flatness freq")
        hr = [(h.stream, f"{h.shape[0]}x{h.shape[1]}", _fmt_num(h.entropy_time), _fmt_num(h.flatness_time),
               _fmt_num(h.entropy_freq), _fmt_num(h.flatness_freq)) for h in d.map_health]
        w = [max(len(r[i]) for r in [hh] + hr) for i in range(len(hh))]
        for r in [hh] + hr:
            lines.append("  " + "  ".join(v.ljust(x) for v, x in zip(r, w)).rstrip())
    if d.notes:
        lines += ["", "notes"] + [f"  - {n}" for n in d.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------ CLI
def load_factory(spec: str):
    """``package.module:factory`` -> the factory's ``(model, run_callable | example_inputs)``."""
    import importlib

    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise AibaError(f"--model takes 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise AibaError(f"--model {spec!r}: {e}") from None
    if not callable(factory):
        raise AibaError(f"--model {spec!r}: {attr} is a {type(factory).__name__}, not a callable factory")
    try:
        out = factory()
    except AibaError:
        raise
    except Exception as e:  # the user's code failed: say where, without aiba's traceback
        raise AibaError(f"--model {spec!r}: the factory raised {type(e).__name__}: {e} "
                        "(run with --debug for its traceback)") from e
    import torch

    if not (isinstance(out, tuple) and len(out) == 2):
        raise AibaError(f"--model {spec!r}: the factory must return (model, run_callable | example_inputs), "
                        f"got {type(out).__name__}")
    if not isinstance(out[0], torch.nn.Module):
        raise AibaError(f"--model {spec!r}: the factory's first item must be a torch.nn.Module, "
                        f"got {type(out[0]).__name__} ({out[0]!r:.60})")
    if not (callable(out[1]) or isinstance(out[1], (torch.Tensor, tuple, list, dict))):
        raise AibaError(f"--model {spec!r}: the factory's second item must be a run callable or example inputs "
                        f"(tensor, tuple, list or dict), got {type(out[1]).__name__}")
    return out


def _describe_inputs(run) -> str:
    """What a ``--model`` factory's second value feeds the model (shapes of example inputs)."""
    def shape(x):
        return str(tuple(x.shape)) if hasattr(x, "shape") else type(x).__name__

    if callable(run) and not hasattr(run, "shape"):
        return f"the factory's run callable {getattr(run, '__name__', type(run).__name__)} (--prompt not used)"
    if isinstance(run, dict):
        items = ", ".join(f"{k}={shape(v)}" for k, v in run.items())
    elif isinstance(run, (tuple, list)):
        items = ", ".join(shape(v) for v in run)
    else:
        items = shape(run)
    return f"the factory's example inputs: {items} (--prompt not used)"


def _latent(text: str | None) -> tuple | None:
    """--latent-shape: ``256x16``, ``256,16`` or ``1024`` -> (T, F) or (T,), positive sizes."""
    if not text:
        return None
    try:
        sizes = tuple(int(v) for v in text.lower().replace("x", ",").split(",") if v.strip())
    except ValueError:
        sizes = ()
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise AibaError(f"--latent-shape must be T x F or T with positive sizes (e.g. 256x16 or 1024), got {text!r}")
    return sizes


def _run(args) -> int:
    import contextlib
    import sys

    from ..settings import integer

    integer("--steps", args.steps, lo=1, hi=10_000)
    integer("--seed", args.seed, lo=0)
    if args.prefix_tokens is not None:
        integer("--prefix-tokens", args.prefix_tokens, lo=0)
    if args.latent_shape and not args.model:
        raise AibaError("--latent-shape applies to --model only")
    latent = _latent(args.latent_shape)  # checked before the factory loads anything
    with contextlib.redirect_stdout(sys.stderr):  # libraries' prints never reach the report (| jq)
        d = _diagnose_args(args, latent)
    print(json.dumps(d.to_dict(), indent=2) if args.json else format_report(d))
    return 0


def _diagnose_args(args, latent: tuple | None):
    if args.model:
        from ..backends.generic import GenericBackend

        model, run = load_factory(args.model)
        backend = GenericBackend(model, run, latent_shape=latent,
                                 prefix_tokens=args.prefix_tokens, cfg_order=args.cfg_order, name=f"generic ({args.model})")
    elif args.backend:
        if args.backend == "generic":
            raise AibaError("--backend generic needs --model package.module:factory")
        from ..backends import get

        backend = get(args.backend, tiny=args.tiny)
    else:
        raise AibaError("give --backend NAME or --model package.module:factory")
    d = diagnose(backend, prompt=args.prompt, steps=args.steps, pool=args.pool, seed=args.seed)
    if args.model:  # the factory's inputs ran, not --prompt: say so
        import dataclasses

        d = dataclasses.replace(d, prompt=_describe_inputs(run))
    return d


def register(subparsers) -> None:
    p = subparsers.add_parser("diagnose", help="list a model's attention calls, lattices and map health",
                              description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--backend", choices=["audioldm2", "stable-audio", "stable-audio-diffusers", "generic", "reference"])
    src.add_argument("--model", metavar="PKG.MODULE:FACTORY",
                     help="factory returning (model, run_callable) or (model, example_inputs)")
    p.add_argument("--tiny", action="store_true", help="the offline random-weight model of --backend")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--steps", type=int, default=2, help="denoising steps (model runs for --model)")
    p.add_argument("--prompt", default="a bass solo with drums")
    p.add_argument("--pool", default="max", choices=["max", "mean"], help="text-token pooling of the cross maps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent-shape", help="--model: latent T,F (or T for time only); inferred when omitted")
    p.add_argument("--prefix-tokens", type=int, help="--model: prepended query tokens")
    p.add_argument("--cfg", dest="cfg_order", choices=["uncond_first", "cond_first"], help="--model: CFG batch order")
    p.set_defaults(func=_run)
