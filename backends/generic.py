"""Generic backend: any ``nn.Module`` plus a way to run it.

The user states what they know (``latent_shape``, ``prefix_tokens``, ``cfg_order``, ``content``);
:meth:`GenericBackend.infer` runs the model once with a record-only tap and infers the rest
where the calls allow it: which modules attend, self or cross, and a latent shape whose
strided lattices hold every query length (from the input tensors' trailing dims). What it
could not tell is listed in ``Inference.notes``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .base import Backend

__all__ = ["GenericBackend", "Inference", "attention_modules", "as_runner"]

MAX_PREFIX = 4  # prepended tokens tried when inferring prefix_tokens


def attention_modules(model) -> dict:
    """``{path: module}`` of the attention modules inside ``model``: diffusers ``Attention``,
    stable-audio-tools ``Attention``, ``nn.MultiheadAttention`` and any class whose name ends
    in ``Attention``, innermost only (a wrapper holding another attention module is skipped)."""
    from torch import nn

    def is_attn(m):
        return isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention")

    found = {name or type(model).__name__: m for name, m in model.named_modules() if is_attn(m)}
    out = {}
    for name, m in found.items():
        if not any(other is not m for _, other in m.named_modules() if is_attn(other)):
            out[name] = m
    return out


def as_runner(model, run) -> Callable[[], object]:
    """``run`` as a no-argument callable: a callable taking the model (or nothing), or
    example inputs (tuple/list -> positional, dict -> keywords, anything else -> one argument)."""
    import inspect

    if callable(run) and not hasattr(run, "shape"):
        try:
            n = len(inspect.signature(run).parameters)
        except (TypeError, ValueError):
            n = 1
        return (lambda: run(model)) if n else run
    if isinstance(run, Mapping):
        return lambda: model(**run)
    if isinstance(run, (tuple, list)):
        return lambda: model(*run)
    return lambda: model(run)


@dataclass(frozen=True)
class Inference:
    """What a probe run of a generic model told (and did not tell)."""

    latent_shape: tuple | None  # (T, F) or (T,), None when no input fits every query length
    prefix_tokens: int
    q_lens: tuple  # distinct query lengths of the attention calls inside the model
    kinds: dict  # module path -> "cross" | "self"
    kind_sources: dict  # module path -> "module" | "heuristic"
    k_lens: dict  # module path -> key length
    notes: tuple = field(default_factory=tuple)  # what could not be inferred, and what was assumed


def _input_shapes(model, runner) -> list:
    """Shapes of the tensors the model's forward received on one run."""
    import torch

    shapes = []

    def grab(m, args, kwargs):
        for v in list(args) + list(kwargs.values()):
            if isinstance(v, torch.Tensor):
                shapes.append(tuple(v.shape))

    h = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        runner()
    finally:
        h.remove()
    return shapes


def _fits(latent, q_lens, prefix) -> bool:
    from aiba.maps.mapping import candidate_lattices

    sizes = {a * b for a, b in candidate_lattices(latent)}
    return all(q - prefix in sizes for q in q_lens)


def _guess_latent(shapes, q_lens) -> tuple:
    """First (latent, prefix) whose strided lattices hold every query length: 2-D from
    (B, C, H, W) inputs (H = time, W = frequency), else 1-D from (B, C, T) inputs."""
    two_d = [s[2:] for s in shapes if len(s) == 4]
    one_d = [(s[2],) for s in shapes if len(s) == 3] + [(s[1],) for s in shapes if len(s) == 3]
    for prefix in range(MAX_PREFIX + 1):
        for cand in two_d + one_d:
            if _fits(cand, q_lens, prefix):
                return tuple(int(v) for v in cand), prefix
    return None, 0


class GenericBackend(Backend):
    """Any ``nn.Module`` and a way to run it (see :func:`as_runner`). One ``generate`` "step"
    is one run of the model; ``generate(steps=N)`` runs it N times."""

    name = "generic"
    default_steps = 1

    def __init__(self, model, run, *, latent_shape=None, prefix_tokens: int | None = None, cfg_order: str | None = None,
                 content=None, streams: dict | None = None, name: str = "generic"):
        self.denoiser = model
        self.name = name
        self._runner = as_runner(model, run)
        self._latent = None if latent_shape is None else tuple(int(v) for v in latent_shape)
        self._prefix = prefix_tokens
        self._cfg_order = cfg_order
        self._content = content
        self._streams = streams
        self._inference: Inference | None = None

    # -------------------------------------------------------------- inference
    def infer(self) -> Inference:
        """Run the model once (record only) and infer what the calls allow; cached."""
        if self._inference is not None:
            return self._inference
        from aiba import AttnTap, combined_patch

        tap = AttnTap(kinds=(), latent_shape=None)
        import torch

        with combined_patch(tap, model=self.denoiser), torch.no_grad():
            shapes = _input_shapes(self.denoiser, self._runner)
        recs = [r for r in tap.store if not r.outside]  # issued by the model
        notes = []
        if not recs:
            notes.append("no attention call was seen inside the model (unknown kernel or compiled?)")
        q_lens = tuple(sorted({r.q_len for r in recs}))
        kinds = {r.name: r.kind for r in recs}
        sources = {r.name: r.kind_source for r in recs}
        k_lens = {r.name: r.k_len for r in recs}
        if any(s == "heuristic" for s in sources.values()):
            notes.append("self/cross of some calls guessed from q_len vs k_len (cross_ratio): no module context")
        latent, prefix = self._latent, self._prefix
        if latent is None and recs:
            latent, guessed_prefix = _guess_latent(shapes, q_lens)
            if latent is None:
                notes.append(f"latent_shape: no input's trailing dims {sorted(set(s[2:] for s in shapes if len(s) > 2))} "
                             f"hold every query length {list(q_lens)} (prefix 0..{MAX_PREFIX}); pass latent_shape=")
            else:
                notes.append(f"latent_shape {latent} inferred from the inputs"
                             + (" (H = time, W = frequency assumed)" if len(latent) == 2 else " (time only)"))
                if prefix is None:
                    prefix = guessed_prefix
                    if prefix:
                        notes.append(f"prefix_tokens {prefix} inferred (query lengths exceed the lattice by {prefix})")
        if prefix is None:
            prefix = 0
        if self._cfg_order is None:
            notes.append("cfg_order: unknown, the batch is taken as not CFG-doubled (pass cfg_order='uncond_first'|'cond_first')")
        if self._content is None and any(k == "cross" for k in kinds.values()):
            notes.append("content tokens unknown: pool='mean' would be the constant 1/k_len (pass content= or use pool='max')")
        self._inference = Inference(latent, int(prefix), q_lens, kinds, sources, k_lens, tuple(notes))
        return self._inference

    # ------------------------------------------------------------------ facts
    def streams(self) -> dict:
        if self._streams is not None:
            return self._streams
        inf = self.infer()
        cross = {n: inf.k_lens[n] for n, k in inf.kinds.items() if k == "cross"}
        out = {}
        if len(set(cross.values())) <= 1:
            if cross:
                out["cross"] = sorted(cross)
        else:  # one stream per key length
            for n, k in sorted(cross.items()):
                out.setdefault(f"cross_k{k}", []).append(n)
        selfs = sorted(n for n, k in inf.kinds.items() if k == "self")
        if selfs:
            out["self"] = selfs
        return out

    @property
    def prefix_tokens(self) -> int:
        return self._prefix if self._prefix is not None else self.infer().prefix_tokens

    def latent_shape(self, seconds=None):
        return self._latent if self._latent is not None else self.infer().latent_shape

    def cfg_order(self, guidance_scale) -> str | None:
        return self._cfg_order

    def configure(self, tap, prompts=None, *, seconds=None, guidance_scale=None):
        settings = dict(latent_shape=self.latent_shape(), prefix_tokens=self.prefix_tokens, cfg_order=self._cfg_order)
        if self._content is not None:
            settings["content"] = self._content
        if tap.layers is None:
            settings["layers"] = tuple(p for pats in self.streams().values() for p in pats)
        return tap.configure(**settings)

    def generate(self, prompts=None, *, tap=None, steps=None, guidance_scale=None, seed=0, seconds=None, reset=True):
        return super().generate([] if prompts is None else prompts, tap=tap, steps=steps, guidance_scale=guidance_scale,
                                seed=seed, seconds=seconds, reset=reset)

    def _generate(self, prompts, *, steps, guidance_scale, seed, seconds, on_step_end):
        import numpy as np
        import torch

        out = None
        for _ in range(steps):
            torch.manual_seed(seed)
            with torch.no_grad():
                out = self._runner()
            if on_step_end is not None:
                on_step_end()
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, torch.Tensor):
            out = out.detach().float().cpu().numpy()
        return (np.asarray(out) if out is not None else None), 0, False
