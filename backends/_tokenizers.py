"""Word-level tokenizers built in-process, so the tiny backends never touch the hub.

Each word of a small vocabulary is one token, which keeps per-word maps readable in tests:
the prompt "a bass solo" becomes exactly the tokens ``a``, ``bass``, ``solo`` (plus the
family's special tokens). Unknown words map to ``<unk>``.
"""
from __future__ import annotations

__all__ = ["TINY_WORDS", "roberta_style", "t5_style", "t5_unigram"]

# Instrument words (the paper's six classes and their plurals) and the glue words of
# typical prompts. Order fixes the token ids: keep it stable.
TINY_WORDS = (
    "a", "an", "the", "of", "with", "and", "in", "on", "solo", "recording", "music", "song",
    "playing", "loud", "soft", "fast", "slow", "bass", "drums", "drum", "guitar", "guitars",
    "piano", "strings", "string", "organ", "synth", "violin", "cello", "jazz", "rock", "pop",
    "electric", "acoustic", "melody", "beat", "noise", "quiet", "this", "is", "negative",
    "prompt", "hammer", "hitting", "wooden", "surface",
)


def _word_level(specials: list[str], words, unk: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(list(specials) + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok, vocab


def roberta_style(model_max_length: int = 16, words=TINY_WORDS):
    """A ``RobertaTokenizerFast`` (CLAP's text tokenizer family): ``<s> words </s>``, pad id 1."""
    from tokenizers import processors
    from transformers import RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # Roberta's ids 0..4
    tok, vocab = _word_level(specials, words, "<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])],
    )
    return RobertaTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )


def t5_style(model_max_length: int = 16, words=TINY_WORDS):
    """A ``T5TokenizerFast`` (Flan-T5 family): ``words </s>``, pad id 0, no sentinel ids."""
    from tokenizers import processors
    from transformers import T5TokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids 0..2
    tok, vocab = _word_level(specials, words, "<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>",
        pair="$A </s> $B </s>",
        special_tokens=[("</s>", vocab["</s>"])],
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        extra_ids=0,
        eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )


def t5_unigram(model_max_length: int = 16, words=TINY_WORDS):
    """The :func:`t5_style` vocabulary (same ids) as the hub's T5 tokenizers are: a SentencePiece
    Unigram model over ``▁word`` pieces, so ``save_pretrained`` / ``from_pretrained`` round-trip
    it like a real checkpoint's ``tokenizer.json``."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length,
                           eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
