"""Helpers for capturing a model of your own: word indices, step counting, diffusers callbacks.

    from aiba import AttnTap, combined_patch
    from aiba.custom import word_indices, advance_steps, step_callback

    idx = word_indices(tokenizer, "bass and strings playing together", "bass")   # key positions
    tap = AttnTap(pool="subset", tokens=idx, latent_shape=(8, 64))
    with combined_patch(tap, model=unet):
        for t in timesteps:
            ...                  # one denoising step
            advance_steps()      # every active tap moves to the next step
    # or, with a diffusers pipeline:  pipe(..., callback_on_step_end=step_callback())

Word indices come from the tokenizer, never from counting by hand: an off-by-one (a
forgotten start-of-sequence token) would silently score the wrong key.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import AibaError

__all__ = ["word_indices", "word_mask", "advance_steps", "step_callback", "instrument_token_indices"]


def _tokens(tokenizer, prompt: str) -> list[str]:
    """The key tokens a tokenizer gives a prompt (special tokens included, in key order)."""
    if hasattr(tokenizer, "tokens") and not hasattr(tokenizer, "convert_ids_to_tokens"):
        return list(tokenizer.tokens(prompt))  # aiba's word tokenizer: words then <pad>
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # a transformers tokenizer
        ids = tokenizer(prompt)["input_ids"]
        return list(tokenizer.convert_ids_to_tokens(ids))
    if callable(tokenizer):
        return list(tokenizer(prompt))
    raise AibaError(f"word_indices: cannot tokenize with {type(tokenizer).__name__}; pass a transformers "
                    "tokenizer, an object with .tokens(prompt), or a callable prompt -> tokens")


def word_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Key positions of ``word`` in ``prompt`` as ``tokenizer`` splits it (subword runs included).

    ``tokenizer``: a transformers tokenizer (special tokens such as ``<s>`` count, as they
    are keys of the cross-attention), aiba's reference :class:`WordTokenizer`, or a callable
    ``prompt -> list of token strings``. AibaError naming the tokens when the word is absent.
    """
    if not re.search(r"\w", word or ""):
        raise AibaError(f"word_indices: expected a word, got {word!r}")
    return instrument_token_indices(_tokens(tokenizer, prompt), word)


def word_mask(tokenizer, prompts: Sequence[str], words, length: int | None = None):
    """``(B, Lk)`` bool mask of each prompt's word positions (``words``: one word or one per prompt).

    ``length``: the key length the model sees (padded); default the longest tokenization.
    Use as ``AttnTap(pool="subset", tokens=word_mask(...))``.
    """
    import torch

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    words = [words] * len(prompts) if isinstance(words, str) else list(words)
    if len(words) != len(prompts):
        raise AibaError(f"word_mask: {len(prompts)} prompts but {len(words)} words")
    idx = [word_indices(tokenizer, p, w) for p, w in zip(prompts, words)]
    n = max(len(_tokens(tokenizer, p)) for p in prompts) if length is None else int(length)
    if any(max(i) >= n for i in idx):
        raise AibaError(f"word_mask: a word sits at key {max(max(i) for i in idx)}, beyond the key length {n}")
    m = torch.zeros(len(prompts), n, dtype=torch.bool)
    for b, i in enumerate(idx):
        m[b, i] = True
    return m


def advance_steps(taps=None) -> list[int]:
    """Advance the denoising-step counter of every active tap (or of ``taps``); returns the new steps.

    Call once after each denoising step inside ``combined_patch(...)``; with nested blocks
    every tap moves together, so no tap is left a step behind.
    """
    from .capture.patch import active_taps

    taps = active_taps() if taps is None else tuple(taps)
    return [t.next_step() for t in taps]


def step_callback(taps=None, then=None):
    """A diffusers ``callback_on_step_end``: advances every active tap (or ``taps``) each step.

    ``then(pipe, step, timestep, callback_kwargs)``: your own callback, run afterwards (its
    returned dict is passed on). Usage: ``pipe(prompt, callback_on_step_end=step_callback())``.
    """
    def callback(pipe, step, timestep, callback_kwargs):
        advance_steps(taps)
        if then is not None:
            out = then(pipe, step, timestep, callback_kwargs)
            return callback_kwargs if out is None else out
        return callback_kwargs

    return callback


def _norm_token(tok: str) -> str:
    return re.sub(r"^(▁|Ġ|##)", "", tok).replace("</w>", "").lower()


def instrument_token_indices(tokens, words: str) -> list[int]:
    """Indices of the key tokens that spell the instrument word(s) (subword runs allowed).

    ``tokens``: the stream's key tokens as the backend's tokenizer gives them.
    """
    norm = [_norm_token(t) for t in tokens]
    out: list[int] = []
    for w in re.findall(r"[\w'-]+", words.lower()):
        for i in range(len(norm)):
            acc = ""
            for j in range(i, len(norm)):
                acc += norm[j]
                if acc == w:
                    out.extend(range(i, j + 1))
                    break
                if not w.startswith(acc):
                    break
    if not out:
        raise AibaError(f"instrument word(s) {words!r} not found among the key tokens {list(tokens)}")
    return sorted(set(out))
