"""Loading real checkpoints: one clear error when the weights are not here."""

from __future__ import annotations

import contextlib
from pathlib import Path

from aiba.errors import AibaError

__all__ = ["checkpoint_guard", "hub_cache_dir"]


def hub_cache_dir() -> str:
    """The Hugging Face cache ``from_pretrained`` reads (HF_HUB_CACHE / HF_HOME aware)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - transformers/diffusers depend on it
        return "~/.cache/huggingface/hub"


def _load_errors() -> tuple:
    errs: list = [OSError]
    try:
        from huggingface_hub import errors as hub_errors

        errs += [getattr(hub_errors, n) for n in ("HfHubHTTPError", "LocalEntryNotFoundError", "EntryNotFoundError",
                                                  "RepositoryNotFoundError", "RevisionNotFoundError",
                                                  "HFValidationError", "GatedRepoError") if hasattr(hub_errors, n)]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


@contextlib.contextmanager
def checkpoint_guard(model_id: str, family: str):
    """Turn a failed ``from_pretrained`` / hub download of ``model_id`` into one AibaError
    (kind ``missing``) that names the model, the cache and how to fetch the weights."""
    try:
        yield
    except _load_errors() as e:
        reason = " ".join(str(e).split())
        reason = (reason[:200] + "...") if len(reason) > 200 else reason or type(e).__name__
        if Path(model_id).is_dir():
            raise AibaError(f"{family}: the checkpoint folder {model_id} cannot be loaded ({type(e).__name__}: "
                            f"{reason}); it needs the files the hub serves for this model family",
                            kind="missing") from e
        raise AibaError(f"{family}: the weights of {model_id} are not present in the Hugging Face cache "
                        f"{hub_cache_dir()} and could not be fetched ({type(e).__name__}: {reason}); fetch them with "
                        f"`huggingface-cli download {model_id}` (with network access), or set HF_HOME to a cache "
                        "that holds them; --tiny runs offline", kind="missing") from e
