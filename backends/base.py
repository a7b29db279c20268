"""The common adapter interface every backend implements (k-diffusion ``external.py`` style).

A backend knows one model family: the module whose attention calls are mapped (``denoiser``,
passed to ``combined_patch(model=...)`` so calls are named by their path inside it), its
attention streams (``streams()``: stream -> layer glob patterns), and the facts a tap needs
for a given prompt and length (``configure``: latent shape, prefix tokens, CFG order,
content tokens per stream). ``generate`` runs the model family's own sampling with the tap
active and advances ``tap.next_step()`` exactly once per denoising step, after it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiba.errors import AibaError

__all__ = ["Backend", "GenerateResult", "step_hook", "content_rows"]


@dataclass(frozen=True)
class GenerateResult:
    """What ``Backend.generate`` returns."""

    audio: Any  # numpy (B, samples) or (B, channels, samples)
    sample_rate: int
    maps: dict = field(default_factory=dict)  # stream -> TapMaps (with a tap, streams that were captured)
    latent_shape: tuple | None = None  # (T, F) or (T,) of the denoised latent
    steps: int = 0  # denoising steps run
    decoded: bool = True  # False: `audio` is the final latent (no decoder available)


@contextmanager
def step_hook(module, on_step_end: Callable[[], Any] | None):
    """Call ``on_step_end()`` after every forward of ``module`` (one forward per denoising step)."""
    if on_step_end is None:
        yield
        return
    def hook(m, args, out):
        on_step_end()  # returns None: a forward hook's return value would replace the output

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def content_rows(mask, cfg_order: str | None, batch: str):
    """Per-batch content mask (B, Lk) of the conditional prompts -> the rows the tap keeps.

    With ``batch="all"`` under CFG the tap sees the doubled batch: the unconditional rows
    reuse the conditional prompt's word positions.
    """
    import torch

    if cfg_order is None or batch != "all":
        return mask
    return torch.cat([torch.as_tensor(mask)] * 2)  # (2B, Lk): the same rows in both halves


class Backend:
    """Base adapter. Subclasses set ``name``, ``denoiser``, ``prefix_tokens`` and implement
    ``streams``, ``latent_shape``, ``cfg_order``, ``content`` and ``_generate``."""

    name = "?"
    prefix_tokens = 0
    default_steps = 3
    default_guidance = 1.0
    denoiser = None  # nn.Module passed to combined_patch(model=...)

    # ---------------------------------------------------------------- facts
    def streams(self) -> dict[str, list[str]]:
        """``{stream: [layer glob patterns]}``, paths relative to ``denoiser``."""
        raise NotImplementedError

    def latent_shape(self, seconds: float | None = None) -> tuple:
        """(T, F) or (T,) of the latent the denoiser sees for this audio length."""
        raise NotImplementedError

    def cfg_order(self, guidance_scale: float) -> str | None:
        """"uncond_first" / "cond_first" when guidance doubles the batch, else None."""
        raise NotImplementedError

    def content(self, prompts: Sequence[str]) -> dict:
        """``{layer pattern or k_len: bool mask (B, k_len)}`` of each stream's content (word)
        tokens (layer patterns keep streams with equal key lengths apart)."""
        return {}

    def tokens(self, prompt: str) -> dict[str, list[str]]:
        """``{stream: key tokens}`` for the streams whose keys are words."""
        return {}

    def configure(self, tap, prompts: Sequence[str] | str | None = None, *, seconds: float | None = None,
                  guidance_scale: float | None = None):
        """Set the tap's latent_shape, prefix_tokens, cfg_order, content (and layers, when unset, to
        every denoiser attention so calls elsewhere, e.g. text encoders, are recorded only)."""
        g = self.default_guidance if guidance_scale is None else guidance_scale
        cfg_order = self.cfg_order(g)
        settings = dict(latent_shape=self.latent_shape(seconds), prefix_tokens=self.prefix_tokens, cfg_order=cfg_order)
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            content = self.content(prompts)
            if content:
                settings["content"] = {k: content_rows(m, cfg_order, tap.batch) for k, m in content.items()}
        if tap.layers is None:
            settings["layers"] = tuple(p for pats in self.streams().values() for p in pats)
        return tap.configure(**settings)

    def stream_maps(self, tap) -> dict:
        """``{stream: TapMaps}`` for every stream with captured calls."""
        import fnmatch

        out = {}
        names = {r.name for r in tap.store if r.captured and r.lattice is not None}
        for stream, pats in self.streams().items():
            if any(fnmatch.fnmatchcase(n, p) for n in names for p in pats):
                out[stream] = tap.maps(layers=pats)
        return out

    # ------------------------------------------------------------ generation
    def generate(self, prompts, *, tap=None, steps: int | None = None, guidance_scale: float | None = None,
                 seed: int = 0, seconds: float | None = None, reset: bool = True) -> GenerateResult:
        """Generate audio with the family's own sampler; with ``tap``, capture and map attention.

        ``reset`` clears the tap first (its maps then hold this generation only).
        """
        from aiba import combined_patch

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        steps = self.default_steps if steps is None else int(steps)
        g = self.default_guidance if guidance_scale is None else float(guidance_scale)
        with ExitStack() as stack:
            on_step_end = None
            if tap is not None:
                if reset:
                    tap.reset()
                self.configure(tap, prompts, seconds=seconds, guidance_scale=g)
                stack.enter_context(combined_patch(tap, model=self.denoiser))
                on_step_end = tap.next_step
            audio, sr, decoded = self._generate(prompts, steps=steps, guidance_scale=g, seed=seed,
                                                seconds=seconds, on_step_end=on_step_end)
        maps = self.stream_maps(tap) if tap is not None and tap.latent_shape is not None else {}
        return GenerateResult(audio=audio, sample_rate=sr, maps=maps, latent_shape=self.latent_shape(seconds),
                              steps=steps, decoded=decoded)

    def _generate(self, prompts, *, steps, guidance_scale, seed, seconds, on_step_end):
        """Run the sampler; call ``on_step_end()`` once after each denoising step.
        Returns ``(audio numpy, sample_rate, decoded)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<aiba backend {self.name!r}: {type(self.denoiser).__name__}>"

