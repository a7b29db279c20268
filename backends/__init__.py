"""Model-family adapters for aiba, installed as ``aiba.backends``.

Nothing here is imported by ``aiba`` itself: a backend's heavy dependency is only imported
when that backend is asked for.

    from aiba import AttnTap
    from aiba.backends import get
    backend = get("audioldm2", tiny=True)        # or get("audioldm2") for the real checkpoint
    result = backend.generate("a bass solo", tap=AttnTap(pool="max"), steps=3)
    result.audio, result.maps["t5"].overall      # numpy audio, (B, T, F) map of the T5 stream
"""
from __future__ import annotations

import importlib
import importlib.util

from aiba.errors import AibaError

__all__ = ["get", "available", "BACKENDS"]

# name -> (module, adapter class, modules its dependencies need)
BACKENDS = {
    "audioldm2": ("audioldm2", "AudioLDM2Backend", ("diffusers", "transformers")),
    "stable-audio": ("stable_audio", "StableAudioBackend", ("stable_audio_tools", "transformers")),
    "stable-audio-diffusers": ("stable_audio", "StableAudioDiffusersBackend", ("diffusers", "transformers")),
    "generic": ("generic", "GenericBackend", ()),
    "reference": ("reference", "ReferenceBackend", ("diffusers", "safetensors")),
}
_EXTRAS = {"reference": "audioldm2", "audioldm2": "audioldm2", "stable-audio": "stable-audio", "stable-audio-diffusers": "stable-audio"}


def _missing(name: str) -> list[str]:
    return [m for m in BACKENDS[name][2] if importlib.util.find_spec(m) is None]


def available() -> list[str]:
    """Names of the backends whose dependencies are importable here."""
    return [n for n in BACKENDS if not _missing(n)]


def get(name: str, tiny: bool = False, **kw):
    """A backend adapter by name.

    ``tiny=True`` builds the offline random-weight model (``seed=``, ``config=``); otherwise
    the real checkpoint is loaded (``model_id=``, ``device=``, ``dtype=``). ``generic`` takes
    ``model=`` and ``run=`` (a callable or example inputs) plus what the user knows.
    """
    if name not in BACKENDS:
        raise AibaError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
    missing = _missing(name)
    if missing:
        raise AibaError(f"backend {name!r} needs {missing}: pip install 'aiba[{_EXTRAS.get(name, name)}]'"
                        + (" and pip install --no-deps stable-audio-tools" if "stable_audio_tools" in missing else ""),
                        kind="missing")
    module, cls_name, _ = BACKENDS[name]
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), cls_name)
    if name == "generic":
        if tiny:
            raise AibaError("backend 'generic' has no tiny model: pass model= and run=")
        return cls(**kw)
    return cls.tiny(**kw) if tiny else cls.from_pretrained(**kw)
