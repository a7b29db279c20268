"""The model zoo: capture on tiny random-weight models of transformers, diffusers and torch,
each compared with the library's own attention weights.

Every row builds one tiny model in-process and runs it twice: under ``combined_patch`` with a
tap keeping each call's probabilities, and outside any block. A third, reference run on the
same weights gets the library's own probabilities: transformers with
``attn_implementation="eager"`` and ``output_attentions=True``, ``nn.MultiheadAttention``
with ``need_weights=True``, diffusers with its eager ``AttnProcessor``
(``Attention.get_attention_scores``) or, for processors that have no eager twin (SD3 joint
attention, Stable Audio), a float64 eager softmax of each ``scaled_dot_product_attention``
call whose output is checked against the kernel's before its probabilities are used.

A row holds when the calls aiba recorded per module equal the reference's, the largest
probability error is <= 1e-5, every call carries the tag the model really computes (and the
head count the reference has), and the output inside the block is bit-identical to the
output outside it (for a compiled model: to its uncompiled original's output, which is what
the block runs). A joint call (SD3) keeps the probabilities of the whole
(latent + text) x (latent + text) call, compared whole; its record's context span must be
the text tokens' span.

Fully masked query rows (a left-padded causal prefill's padding queries) are zeros in aiba
by design, while eager attention spreads them uniformly over the masked keys; likewise
``nn.TransformerEncoder`` in eval + no_grad packs a padded batch into a nested tensor and
computes no attention for padding queries at all. Such rows must be zeros in aiba; they are
excluded from the error and counted in the ``masked rows`` column.

``python tests/test_zoo.py`` prints the table of the README's "Tested models" section
(``--write-readme`` also puts it there).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

TOL = 1e-5

# --------------------------------------------------------------------------- harness


@dataclass
class RefCall:
    """One attention call of the reference run: the issuing module's path and its probabilities
    (B, H, Lq, Lk) (any float dtype)."""

    path: str
    probs: torch.Tensor


@dataclass
class Case:
    """One zoo model.

    ``run()`` runs the model and returns its output tensors; it is called under capture and
    outside it. ``reference()`` reruns it and returns the library's own probabilities.
    ``kind(path)`` is the tag the call of that module really has. ``masked(path, q_len)``
    gives a (B, Lq) bool of fully masked query rows, or None.
    """

    model: nn.Module
    run: Callable[[], tuple]
    reference: Callable[[], list]
    kind: Callable[[str], str]
    masked: Callable[[str, int], torch.Tensor | None] = lambda path, q_len: None
    note: str = ""
    context: tuple[int, int] | None = None  # joint calls: (start, stop) of the context tokens
    # compiled models: the uncompiled model's run, whose output the block must reproduce bit for
    # bit (inside the block a compiled model runs its eager original, as the README documents)
    uncompiled: Callable[[], tuple] | None = None


@dataclass(frozen=True)
class ZooRow:
    name: str
    family: str
    calls_aiba: int
    calls_ref: int
    max_err: float
    masked_rows: int
    tags_ok: bool
    identical: bool
    tags: tuple = ()
    problems: tuple = field(default_factory=tuple)
    against_uncompiled: bool = False  # output compared with the uncompiled model's

    @property
    def ok(self) -> bool:
        return not self.problems


def _flat(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat(o)]
    return []


def evaluate(name: str, family: str, case: Case) -> ZooRow:
    """Run one case three ways and compare (see the module docstring)."""
    from aiba import AttnTap, combined_patch
    from aiba.capture.tap import KINDS

    torch.manual_seed(0)
    with torch.no_grad():
        plain = _flat((case.uncompiled or case.run)())
    tap = AttnTap(kinds=KINDS, keep="probs", latent_shape=None)
    torch.manual_seed(0)
    with combined_patch(tap, model=case.model), torch.no_grad():
        inside = _flat(case.run())
    identical = len(plain) == len(inside) and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(plain, inside))
    torch.manual_seed(0)
    refs = case.reference()

    recs = [r for r in tap.store if not r.outside]
    problems = [f"{r.name}: {r.error}" for r in tap.store if getattr(r, "error", None)]
    if len(recs) != len(tap.store):
        problems.append(f"{len(tap.store) - len(recs)} call(s) attributed outside the model")
    by_path: dict = {}
    for r in refs:
        by_path.setdefault(r.path, []).append(r)
    seen: dict = {}
    for r in recs:
        seen.setdefault(r.name, []).append(r)
    if {p: len(v) for p, v in seen.items()} != {p: len(v) for p, v in by_path.items()}:
        problems.append("calls per module differ: aiba " + str(sorted((p, len(v)) for p, v in seen.items()))
                        + " reference " + str(sorted((p, len(v)) for p, v in by_path.items())))
    err, masked_rows = 0.0, 0
    for path, rs in by_path.items():
        for rec, ref in zip(seen.get(path, []), rs):
            want = ref.probs.double().mean(dim=1)  # (B, Lq, Lk)
            if case.kind(path) == "joint":
                if rec.context is None or tuple(rec.context) != case.context:
                    problems.append(f"{path}: context span {rec.context}, expected {case.context}")
            if rec.probs is None or tuple(rec.probs.shape) != tuple(want.shape):
                problems.append(f"{path}: probs {None if rec.probs is None else tuple(rec.probs.shape)} "
                                f"vs reference {tuple(want.shape)}")
                err = math.inf
                continue
            if rec.heads != ref.probs.shape[1]:
                problems.append(f"{path}: {rec.heads} heads recorded, the reference has {ref.probs.shape[1]}")
            masked = case.masked(path, want.shape[1])
            valid = torch.ones(want.shape[:2], dtype=torch.bool) if masked is None else ~masked
            masked_rows += int((~valid).sum())
            if rec.probs[~valid].abs().sum() != 0:
                problems.append(f"{path}: fully masked query rows are not zeros")
            diff = (rec.probs.double() - want).abs()[valid]
            if diff.numel():
                err = max(err, float(diff.max()))
    if err > TOL:
        problems.append(f"max probability error {err:.3g} > {TOL:g}")
    wrong = sorted({(r.name, r.kind, case.kind(r.name)) for r in recs if r.kind != case.kind(r.name)})
    if wrong:
        problems.append("tags (module, recorded, expected): " + str(wrong[:4]))
    if not identical:
        problems.append("output differs with the block")
    tags = tuple(sorted({r.kind for r in recs}))
    return ZooRow(name, family, len(recs), len(refs), err, masked_rows, not wrong, identical, tags, tuple(problems),
                  case.uncompiled is not None)


# ------------------------------------------------------------------ reference runs


def _modules_named(model: nn.Module, types) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, types)}


def hf_reference(model: nn.Module, run_eager: Callable[[], object], attn_types) -> list:
    """transformers' own eager weights: the model switched to ``attn_implementation="eager"``,
    run with ``output_attentions=True``; each attention module's returned weights (the
    tensors ``output_attentions`` collects) recorded with its path, then sdpa restored."""
    out: list = []
    handles = []
    for path, m in _modules_named(model, attn_types).items():
        def hook(mod, args, res, path=path):
            w = res[-1] if isinstance(res, tuple) else None
            assert isinstance(w, torch.Tensor) and w.dim() == 4, f"{path}: no eager weights returned"
            out.append(RefCall(path, w))
        handles.append(m.register_forward_hook(hook))
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            res = run_eager()
    finally:
        model.set_attn_implementation("sdpa")
        for h in handles:
            h.remove()
    returned = [t for k, v in res.items() if k.endswith("attentions") and v is not None for t in v]
    assert sorted(map(id, returned)) == sorted(id(r.probs) for r in out), (
        f"output_attentions returned {len(returned)} maps, not the {len(out)} the attention modules returned")
    return out


def mha_reference(model: nn.Module, run: Callable[[], object]) -> list:
    """``need_weights=True, average_attn_weights=False`` on every ``nn.MultiheadAttention``
    (grad enabled, so ``TransformerEncoderLayer`` takes its Python path and calls them)."""
    out: list = []
    mods = _modules_named(model, nn.MultiheadAttention)
    for path, m in mods.items():
        def fwd(*args, _m=m, _path=path, **kwargs):
            kwargs.update(need_weights=True, average_attn_weights=False)
            o, w = nn.MultiheadAttention.forward(_m, *args, **kwargs)
            out.append(RefCall(_path, (w if w.dim() == 4 else w.unsqueeze(0)).detach()))
            return o, w
        m.forward = fwd
    try:
        with torch.enable_grad():
            run()
    finally:
        for m in mods.values():
            del m.forward
    return out


def _call_stack_hooks(model: nn.Module, types) -> tuple[list, list]:
    """Forward pre/post hooks keeping the path of the running attention module on a stack."""
    stack, handles = [], []
    for path, m in _modules_named(model, types).items():
        handles.append(m.register_forward_pre_hook(lambda mod, a, p=path: stack.append(p)))
        handles.append(m.register_forward_hook(lambda mod, a, o: [stack.pop(), None][1]))
    return stack, handles


def diffusers_eager_reference(model: nn.Module, run: Callable[[], object]) -> list:
    """diffusers' own eager probabilities: every ``Attention`` switched to ``AttnProcessor``,
    whose ``get_attention_scores`` returns ``softmax(q k^T * scale + mask)``
    (B * heads, Lq, Lk); the original processors are restored after."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    out: list = []
    mods = _modules_named(model, Attention)
    saved = {path: m.processor for path, m in mods.items()}
    for path, m in mods.items():
        def scores(query, key, attention_mask=None, _m=m, _path=path):
            p = type(_m).get_attention_scores(_m, query, key, attention_mask)  # (B*H, Lq, Lk)
            out.append(RefCall(_path, p.detach().reshape(-1, _m.heads, *p.shape[1:])))  # (B, H, Lq, Lk)
            return p
        m.get_attention_scores = scores
    for m in mods.values():
        m.set_processor(AttnProcessor())
    try:
        with torch.no_grad():
            run()
    finally:
        for path, m in mods.items():
            m.set_processor(saved[path])
            del m.get_attention_scores
    return out


def eager_sdpa_reference(model: nn.Module, run: Callable[[], object], attn_types) -> list:
    """For processors without an eager twin: each ``F.scaled_dot_product_attention`` call
    of the reference run recomputed as a float64 eager softmax; its output ``P v`` must match
    the kernel's (so the arguments were read right) before ``P`` is kept."""
    import torch.nn.functional as F

    out: list = []
    orig = F.scaled_dot_product_attention
    stack, handles = _call_stack_hooks(model, attn_types)

    def eager(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        res = orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                   enable_gqa=enable_gqa)
        q, k, v = query.double(), key.double(), value.double()
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if is_causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.double()
        p = torch.softmax(s, dim=-1)
        torch.testing.assert_close((p @ v).to(res.dtype), res, atol=1e-5, rtol=1e-4)
        out.append(RefCall(stack[-1], p))
        return res

    F.scaled_dot_product_attention = eager
    try:
        with torch.no_grad():
            run()
    finally:
        F.scaled_dot_product_attention = orig
        for h in handles:
            h.remove()
    return out


def kinds_by(*rules: tuple[str, str], default: str = "self") -> Callable[[str], str]:
    """Expected tag from substrings of the module path, first match wins."""

    def kind(path: str) -> str:
        return next((k for sub, k in rules if sub in path), default)

    return kind


# ------------------------------------------------------------------ transformers rows


def _ids(gen, b, n, vocab=50):
    return torch.randint(3, vocab, (b, n), generator=gen)


def _hf(cls, cfg):
    torch.manual_seed(0)
    cfg._attn_implementation = "sdpa"
    return cls(cfg).eval()


def bert_padding() -> Case:
    from transformers import BertConfig, BertModel
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = _hf(BertModel, BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=32))
    g = torch.Generator().manual_seed(1)
    ids = _ids(g, 2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding: keys masked, no query row fully masked

    def run(**kw):
        return model(input_ids=ids, attention_mask=mask, **kw)

    return Case(model, lambda: run().last_hidden_state,
                lambda: hf_reference(model, lambda: run(output_attentions=True), BertSelfAttention),
                kinds_by())


def gpt2_cache_decode() -> Case:
    from transformers import GPT2Config, GPT2Model
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    model = _hf(GPT2Model, GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    g = torch.Generator().manual_seed(2)
    ids, nxt = _ids(g, 2, 7), _ids(g, 2, 1)

    def run(**kw):
        a = model(input_ids=ids, use_cache=True, **kw)
        b = model(input_ids=nxt, past_key_values=a.past_key_values, use_cache=True, **kw)
        return a, b

    def ref():
        return hf_reference(model, lambda: _merge(run(output_attentions=True)), GPT2Attention)

    return Case(model, lambda: [o.last_hidden_state for o in run()], ref, kinds_by(),
                note="prefill 7 tokens, then one cached decode step (q_len 1 over 8 keys: self)")


def _merge(outs):
    """Several model outputs -> one dict of their attention tuples (for hf_reference's count)."""
    merged: dict = {}
    for o in outs:
        for k, v in o.items():
            if k.endswith("attentions") and v is not None:
                merged[k] = tuple(merged.get(k, ())) + tuple(v)
    return merged


def t5_cache() -> Case:
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.models.t5.modeling_t5 import T5Attention

    model = _hf(T5ForConditionalGeneration, T5Config(vocab_size=50, d_model=16, d_ff=32, d_kv=8, num_heads=2,
                                                      num_layers=2, num_decoder_layers=2, decoder_start_token_id=0,
                                                      pad_token_id=0))
    g = torch.Generator().manual_seed(3)
    src, tgt, nxt = _ids(g, 2, 12), _ids(g, 2, 8), _ids(g, 2, 1)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 10:] = 0

    def run(**kw):
        a = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, use_cache=True, **kw)
        b = model(encoder_outputs=(a.encoder_last_hidden_state,), attention_mask=mask, decoder_input_ids=nxt,
                  past_key_values=a.past_key_values, use_cache=True, **kw)
        return a, b

    return Case(model, lambda: [o.logits for o in run()],
                lambda: hf_reference(model, lambda: _merge(run(output_attentions=True)), T5Attention),
                kinds_by(("EncDecAttention", "cross")),
                note="decoder 8 queries over 12 encoder tokens, then one cached decode step")


def bart() -> Case:
    from transformers import BartConfig, BartModel
    from transformers.models.bart.modeling_bart import BartAttention

    model = _hf(BartModel, BartConfig(vocab_size=50, d_model=16, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                      decoder_ffn_dim=32, max_position_embeddings=32))
    g = torch.Generator().manual_seed(4)
    src, tgt = _ids(g, 2, 10), _ids(g, 2, 9)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 8:] = 0

    def run(**kw):
        return model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, **kw)

    return Case(model, lambda: run().last_hidden_state,
                lambda: hf_reference(model, lambda: run(output_attentions=True), BartAttention),
                kinds_by(("encoder_attn", "cross")))


def whisper() -> Case:
    from transformers import WhisperConfig, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperAttention

    model = _hf(WhisperModel, WhisperConfig(vocab_size=60, num_mel_bins=8, d_model=16, encoder_layers=1,
                                            decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                                            encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=16,
                                            max_target_positions=32, pad_token_id=0, decoder_start_token_id=1))
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 8, 32, generator=g)  # 32 frames -> 16 encoder positions
    tgt = _ids(g, 2, 12)

    def run(**kw):
        return model(input_features=feats, decoder_input_ids=tgt, **kw)

    return Case(model, lambda: run().last_hidden_state,
                lambda: hf_reference(model, lambda: run(output_attentions=True), WhisperAttention),
                kinds_by(("encoder_attn", "cross")), note="12 decoder queries over 16 encoder frames")


def _left_padded_causal(mask: torch.Tensor, q_len: int):
    """Fully masked query rows of a causal prefill with left padding: no attended key up to i."""
    return (mask.cumsum(dim=1) == 0) if q_len == mask.shape[1] else None


def llama_gqa() -> Case:
    from transformers import LlamaConfig, LlamaModel
    from transformers.models.llama.modeling_llama import LlamaAttention

    model = _hf(LlamaModel, LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    g = torch.Generator().manual_seed(6)
    ids = _ids(g, 2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding

    def run(**kw):
        return model(input_ids=ids, attention_mask=mask, **kw)

    return Case(model, lambda: run().last_hidden_state,
                lambda: hf_reference(model, lambda: run(output_attentions=True), LlamaAttention), kinds_by(),
                masked=lambda path, q_len: _left_padded_causal(mask, q_len),
                note="4 query heads over 2 key heads, left padding")


def _decode_case(cls, cfg, attn_type, seed, n=8, pad=2, note="") -> Case:
    model = _hf(cls, cfg)
    g = torch.Generator().manual_seed(seed)
    ids, nxt = _ids(g, 2, n), _ids(g, 2, 1)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :pad] = 0
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)

    def run(**kw):
        a = model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        b = model(input_ids=nxt, attention_mask=mask2, past_key_values=a.past_key_values, use_cache=True, **kw)
        return a, b

    return Case(model, lambda: [o.last_hidden_state for o in run()],
                lambda: hf_reference(model, lambda: _merge(run(output_attentions=True)), attn_type), kinds_by(),
                masked=lambda path, q_len: _left_padded_causal(mask, q_len), note=note)


def llama_masked_decode() -> Case:
    from transformers import LlamaConfig, LlamaModel
    from transformers.models.llama.modeling_llama import LlamaAttention

    return _decode_case(LlamaModel, LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=32), LlamaAttention, 7,
                        note="prefill, then one decode step with a padding mask (GQA 4/2)")


def mistral_sliding_window() -> Case:
    from transformers import MistralConfig, MistralModel
    from transformers.models.mistral.modeling_mistral import MistralAttention

    return _decode_case(MistralModel, MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=32,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    num_key_value_heads=2, max_position_embeddings=32,
                                                    sliding_window=4), MistralAttention, 8, n=9,
                        note="sliding window 4 over 9 tokens, then one masked decode step")


def vit() -> Case:
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.modeling_vit import ViTAttention

    model = _hf(ViTModel, ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))

    def run(**kw):
        return model(pixel_values=x, **kw)

    return Case(model, lambda: run().last_hidden_state,
                lambda: hf_reference(model, lambda: run(output_attentions=True), ViTAttention), kinds_by())


def clip_text() -> Case:
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.models.clip.modeling_clip import CLIPAttention

    model = _hf(CLIPTextModel, CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=2, num_attention_heads=2,
                                              max_position_embeddings=16, eos_token_id=2))
    g = torch.Generator().manual_seed(10)
    ids = _ids(g, 2, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0

    def run(**kw):
        return model(input_ids=ids, attention_mask=mask, **kw)

    return Case(model, lambda: run().last_hidden_state,
                lambda: hf_reference(model, lambda: run(output_attentions=True), CLIPAttention), kinds_by(),
                note="causal with right padding")


def bert_decoder_cross() -> Case:
    from transformers import BertConfig, BertModel
    from transformers.models.bert.modeling_bert import BertCrossAttention, BertSelfAttention

    model = _hf(BertModel, BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=32, is_decoder=True,
                                      add_cross_attention=True))
    g = torch.Generator().manual_seed(26)
    ids, enc = _ids(g, 2, 8), torch.randn(2, 10, 16, generator=g)
    emask = torch.ones(2, 10, dtype=torch.long)
    emask[1, 7:] = 0

    def run(**kw):
        return model(input_ids=ids, encoder_hidden_states=enc, encoder_attention_mask=emask, **kw)

    return Case(model, lambda: run().last_hidden_state,
                lambda: hf_reference(model, lambda: run(output_attentions=True), (BertSelfAttention, BertCrossAttention)),
                kinds_by(("crossattention", "cross")), note="causal decoder, 8 queries over 10 masked encoder states")


def gpt2_cross() -> Case:
    from transformers import GPT2Config, GPT2Model
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    model = _hf(GPT2Model, GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      add_cross_attention=True))
    g = torch.Generator().manual_seed(27)
    ids, enc = _ids(g, 2, 7), torch.randn(2, 9, 16, generator=g)

    def run(**kw):
        return model(input_ids=ids, encoder_hidden_states=enc, **kw)

    return Case(model, lambda: run().last_hidden_state,
                lambda: hf_reference(model, lambda: run(output_attentions=True), GPT2Attention),
                kinds_by(("crossattention", "cross")), note="7 queries over 9 encoder states")


# ------------------------------------------------------------------ diffusers rows


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


def unet_encoder_mask() -> Case:
    from diffusers import UNet2DConditionModel

    model = _seeded(lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8))
    g = torch.Generator().manual_seed(11)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 16, generator=g)
    emask = torch.ones(2, 6)
    emask[1, 4:] = 0

    def run():
        return model(x, 3, encoder_hidden_states=ctx, encoder_attention_mask=emask).sample

    return Case(model, run, lambda: diffusers_eager_reference(model, run), kinds_by(("attn2", "cross")),
                note="text keys 4 of 6 kept for the second prompt")


def unet_added_kv() -> Case:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    model = _seeded(lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8))
    g = torch.Generator().manual_seed(31)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 16, generator=g)

    def run():
        return model(x, 3, encoder_hidden_states=ctx).sample

    # AttnAddedKVProcessor2_0: latent queries over [6 text; latent] keys in one call
    return Case(model, run, lambda: eager_sdpa_reference(model, run, Attention), kinds_by(default="joint"),
                note="latent queries over [text; latent] keys", context=(0, 6))


def transformer2d() -> Case:
    from diffusers import Transformer2DModel

    model = _seeded(lambda: Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                               num_layers=2, cross_attention_dim=12, norm_num_groups=8))
    g = torch.Generator().manual_seed(12)
    x, ctx = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 5, 12, generator=g)

    def run():
        return model(x, encoder_hidden_states=ctx).sample

    return Case(model, run, lambda: diffusers_eager_reference(model, run), kinds_by(("attn2", "cross")))


def dit() -> Case:
    from diffusers import DiTTransformer2DModel

    model = _seeded(lambda: DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                  out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                                  num_embeds_ada_norm=10, norm_num_groups=8))
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 4, 8, 8, generator=g)

    def run():
        return model(x, timestep=torch.tensor([3, 5]), class_labels=torch.tensor([1, 2])).sample

    return Case(model, run, lambda: diffusers_eager_reference(model, run), kinds_by())


def sd3_joint() -> Case:
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention_processor import Attention

    model = _seeded(lambda: SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                                  attention_head_dim=8, num_attention_heads=2,
                                                  joint_attention_dim=16, caption_projection_dim=16,
                                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8))
    g = torch.Generator().manual_seed(14)
    x, ctx, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 16, generator=g), torch.randn(2, 8, generator=g)

    def run():
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                     timestep=torch.tensor([3, 5])).sample

    return Case(model, run, lambda: eager_sdpa_reference(model, run, Attention), kinds_by(default="joint"),
                note="16 latent + 6 text tokens in one call", context=(16, 22))


def audioldm2_unet() -> Case:
    from diffusers import AudioLDM2UNet2DConditionModel

    model = _seeded(lambda: AudioLDM2UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=[[None, 16, 24]] * 2, attention_head_dim=2, norm_num_groups=8))
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 4, 8, 6, generator=g)
    gpt2, t5 = torch.randn(2, 8, 16, generator=g), torch.randn(2, 5, 24, generator=g)
    t5_mask = torch.ones(2, 5)
    t5_mask[0, 3:] = 0

    def run():
        return model(x, 3, encoder_hidden_states=gpt2, encoder_hidden_states_1=t5,
                     encoder_attention_mask_1=t5_mask).sample

    def kind(path):  # per block: transformers 0 (cross dim None: attn2 is self), 1 (GPT-2), 2 (T5)
        i = int(path.split(".attentions.")[1].split(".")[0]) if ".attentions." in path else 0
        return "cross" if path.endswith("attn2") and i % 3 else "self"

    return Case(model, run, lambda: diffusers_eager_reference(model, run), kind,
                note="self, GPT-2 stream and masked T5 stream per block")


def stable_audio_dit() -> Case:
    from diffusers import StableAudioDiTModel
    from diffusers.models.attention_processor import Attention

    model = _seeded(lambda: StableAudioDiTModel(sample_size=9, in_channels=4, num_layers=2, attention_head_dim=8,
                                                num_attention_heads=4, num_key_value_attention_heads=2,
                                                out_channels=4, cross_attention_dim=16, time_proj_dim=16,
                                                global_states_input_dim=32, cross_attention_input_dim=16))
    g = torch.Generator().manual_seed(16)
    x, ctx, glob = torch.randn(2, 4, 9, generator=g), torch.randn(2, 7, 16, generator=g), torch.randn(2, 1, 32, generator=g)
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    rot = get_1d_rotary_pos_embed(4, 10, use_real=True, repeat_interleave_real=False)

    def run():
        return model(x, torch.tensor([3.0, 5.0]), encoder_hidden_states=ctx, global_hidden_states=glob,
                     rotary_embedding=rot).sample

    return Case(model, run, lambda: eager_sdpa_reference(model, run, Attention), kinds_by(("attn2", "cross")),
                note="GQA 4/2 with rotary self-attention, 1 global token prepended")


def flux_joint() -> Case:
    from diffusers import FluxTransformer2DModel

    model = _seeded(lambda: FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)))
    g = torch.Generator().manual_seed(28)
    inputs = dict(hidden_states=torch.randn(2, 16, 4, generator=g), encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                  pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([0.5, 0.5]),
                  img_ids=torch.randn(16, 3, generator=g), txt_ids=torch.zeros(5, 3))

    def run():
        return model(**inputs).sample

    attn_types = tuple({type(m) for m in model.modules() if type(m).__name__.endswith("Attention")})
    return Case(model, run, lambda: eager_sdpa_reference(model, run, attn_types), kinds_by(default="joint"),
                note="5 text + 16 latent tokens, double- and single-stream blocks", context=(0, 5))


# ------------------------------------------------------------------ torch rows


class _Wrap(nn.Module):
    """Holds one ``nn.MultiheadAttention`` as ``attn`` and calls it as ``call(attn, x)`` does."""

    def __init__(self, attn: nn.MultiheadAttention, call):
        super().__init__()
        self.attn, self._call = attn, call

    def forward(self, *xs):
        return self._call(self.attn, *xs)


def _mha_case(attn, call, inputs, kind, note="") -> Case:
    model = _Wrap(attn, call).eval()

    def run():
        return model(*inputs)

    return Case(model, run, lambda: mha_reference(model, run), kinds_by(default=kind), note=note)


def mha_self_padding() -> Case:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    g = torch.Generator().manual_seed(17)
    x = torch.randn(2, 7, 16, generator=g)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    return _mha_case(attn, lambda a, x: a(x, x, x, key_padding_mask=kpm, need_weights=False)[0], (x,), "self",
                     note="batch_first, key padding, fused fast path")


def mha_cross_kdim() -> Case:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, kdim=12, vdim=10, bias=False)
    g = torch.Generator().manual_seed(18)
    x, ctx, val = torch.randn(9, 2, 16, generator=g), torch.randn(11, 2, 12, generator=g), torch.randn(11, 2, 10, generator=g)
    return _mha_case(attn, lambda a, x, c, v: a(x, c, v, need_weights=False)[0], (x, ctx, val), "cross",
                     note="sequence-first, kdim 12, vdim 10, no bias")


def mha_detr() -> Case:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    g = torch.Generator().manual_seed(19)
    x, pos = torch.randn(2, 10, 16, generator=g), torch.randn(1, 10, 16, generator=g)

    def call_detr(a, x, pos):  # DETR writes the sum twice: equal tensors, not the same object
        return a(x + pos, x + pos, x, need_weights=False)[0]

    return _mha_case(attn, call_detr, (x, pos), "self", note="attn(x + pos, x + pos, x)")


def mha_bias_kv_causal() -> Case:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, add_bias_kv=True, add_zero_attn=True)
    g = torch.Generator().manual_seed(20)
    x = torch.randn(6, 2, 16, generator=g)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    return _mha_case(attn, lambda a, x: a(x, x, x, attn_mask=causal, need_weights=False)[0], (x,), "self",
                     note="bias_k/bias_v, add_zero_attn, float causal mask")


def _layer_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 7, 16, generator=g), torch.randn(2, 5, 16, generator=g)


def encoder_eval_fastpath() -> Case:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x, _ = _layer_inputs(21)
    return Case(model, lambda: model(x), lambda: mha_reference(model, lambda: model(x)), kinds_by(),
                note="eval + no_grad: torch._transformer_encoder_layer_fwd")


def encoder_train_padding() -> Case:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train()
    x, _ = _layer_inputs(22)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 5:] = True

    def run():
        return model(x, src_key_padding_mask=kpm)

    return Case(model, run, lambda: mha_reference(model, run), kinds_by(), note="train, pre-norm, key padding")


def decoder_causal() -> Case:
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerDecoder(layer, 2).eval()
    tgt, mem = _layer_inputs(23)
    tgt = tgt[:, :6]
    causal = nn.Transformer.generate_square_subsequent_mask(6)

    def run():
        return model(tgt, mem, tgt_mask=causal, tgt_is_causal=True)

    return Case(model, run, lambda: mha_reference(model, run), kinds_by(("multihead_attn", "cross")),
                note="6 causal queries, 5 memory tokens")


def _transformer(train: bool) -> Case:
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0,
                           batch_first=True).train(train)
    src, tgt = _layer_inputs(24 + train)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 6:] = True

    def run():
        return model(src, tgt, tgt_mask=causal, src_key_padding_mask=kpm, memory_key_padding_mask=kpm)

    def skipped(path, q_len):
        # eval + no_grad: the encoder packs the batch into a nested tensor without its padding
        # positions, so the fused layer computes no attention for padded queries (output 0 there)
        return kpm if not train and path.startswith("encoder.") else None

    return Case(model, run, lambda: mha_reference(model, run), kinds_by(("multihead_attn", "cross")),
                masked=skipped, note=("train" if train else "eval") + ", src padding, causal target")


def transformer_train() -> Case:
    return _transformer(True)


def transformer_eval() -> Case:
    return _transformer(False)


def encoder_compiled() -> Case:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    compiled = torch.compile(model, backend="eager")
    x, _ = _layer_inputs(29)
    causal = nn.Transformer.generate_square_subsequent_mask(7)

    def run():
        return compiled(x, mask=causal)

    return Case(compiled, run, lambda: mha_reference(model, lambda: model(x, mask=causal)), kinds_by(),
                note='torch.compile(backend="eager"), causal mask', uncompiled=lambda: model(x, mask=causal))


def mha_compiled_fullgraph() -> Case:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    model = _Wrap(attn, lambda a, x: a(x, x, x, need_weights=False)[0]).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(30))
    return Case(compiled, lambda: compiled(x), lambda: mha_reference(model, lambda: model(x)), kinds_by(),
                note='torch.compile(backend="eager", fullgraph=True)', uncompiled=lambda: model(x))


# ------------------------------------------------------------------ the table

# name -> (family, builder, model description, xfail reason while a capture fix is pending, else None)
ZOO = {
    "bert_padding": ("transformers", bert_padding, "BertModel, right padding", None),
    "gpt2_cache_decode": ("transformers", gpt2_cache_decode, "GPT2Model, prefill + cached decode", None),
    "t5_cache": ("transformers", t5_cache, "T5ForConditionalGeneration, encoder-decoder + cached decode", None),
    "bart": ("transformers", bart, "BartModel, encoder padding", None),
    "whisper": ("transformers", whisper, "WhisperModel, 12 queries over 16 frames", None),
    "llama_gqa": ("transformers", llama_gqa, "LlamaModel, GQA 4/2, left-padded prefill", None),
    "llama_masked_decode": ("transformers", llama_masked_decode, "LlamaModel, GQA 4/2, masked cached decode", None),
    "mistral_sliding_window": ("transformers", mistral_sliding_window,
                               "MistralModel, sliding window 4, masked cached decode", None),
    "bert_decoder_cross": ("transformers", bert_decoder_cross, "BertModel decoder, cross-attention + encoder mask",
                           None),
    "gpt2_cross": ("transformers", gpt2_cross, "GPT2Model, cross-attention", None),
    "vit": ("transformers", vit, "ViTModel", None),
    "clip_text": ("transformers", clip_text, "CLIPTextModel, causal + padding", None),
    "unet_encoder_mask": ("diffusers", unet_encoder_mask, "UNet2DConditionModel, encoder_attention_mask", None),
    "unet_added_kv": ("diffusers", unet_added_kv, "UNet2DConditionModel, added-KV attention (SimpleCrossAttn)", None),
    "transformer2d": ("diffusers", transformer2d, "Transformer2DModel, continuous input", None),
    "dit": ("diffusers", dit, "DiTTransformer2DModel", None),
    "sd3_joint": ("diffusers", sd3_joint, "SD3Transformer2DModel, joint attention", None),
    "flux_joint": ("diffusers", flux_joint, "FluxTransformer2DModel, joint attention (double + single stream)", None),
    "audioldm2_unet": ("diffusers", audioldm2_unet, "AudioLDM2UNet2DConditionModel, two text streams", None),
    "stable_audio_dit": ("diffusers", stable_audio_dit, "StableAudioDiTModel, GQA + rotary", None),
    "mha_self_padding": ("torch", mha_self_padding, "nn.MultiheadAttention self, key padding", None),
    "mha_cross_kdim": ("torch", mha_cross_kdim, "nn.MultiheadAttention cross, kdim/vdim", None),
    "mha_detr": ("torch", mha_detr, "nn.MultiheadAttention, attn(x + pos, x + pos, x)", None),
    "mha_bias_kv_causal": ("torch", mha_bias_kv_causal, "nn.MultiheadAttention, bias_kv + zero_attn + causal", None),
    "encoder_eval_fastpath": ("torch", encoder_eval_fastpath, "nn.TransformerEncoder, eval + no_grad (fast path)",
                              None),
    "encoder_train_padding": ("torch", encoder_train_padding, "nn.TransformerEncoder, train, padding", None),
    "encoder_compiled": ("torch", encoder_compiled, 'nn.TransformerEncoder, torch.compile(backend="eager")', None),
    "mha_compiled_fullgraph": ("torch", mha_compiled_fullgraph,
                               'nn.MultiheadAttention, torch.compile(backend="eager", fullgraph=True)', None),
    "decoder_causal": ("torch", decoder_causal, "nn.TransformerDecoder, causal + memory", None),
    "transformer_train": ("torch", transformer_train, "nn.Transformer, train", None),
    "transformer_eval": ("torch", transformer_eval, "nn.Transformer, eval + no_grad (nested fast path)", None),
}

_NEEDS = {"transformers": ("transformers",), "diffusers": ("diffusers",), "torch": ()}


def zoo_row(name: str) -> ZooRow:
    family, build, _, _ = ZOO[name]
    return evaluate(name, family, build())


def _params():
    for name, (family, _, _, xfail) in ZOO.items():
        marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
        yield pytest.param(name, family, marks=marks, id=name)


@pytest.mark.parametrize("name, family", list(_params()))
def test_zoo_row(name, family):
    for mod in _NEEDS[family]:
        pytest.importorskip(mod)
    row = zoo_row(name)
    assert row.calls_ref > 0, f"{name}: the reference saw no attention call"
    assert row.ok, f"{name}: " + "; ".join(row.problems)


def test_zoo_has_twenty_models():
    assert len(ZOO) >= 20 and {f for f, *_ in ZOO.values()} == {"transformers", "diffusers", "torch"}


def test_harness_catches_a_wrong_tag_and_a_changed_output():
    """The comparison can fail: a case expecting the wrong tag, and a run whose output
    changes between calls, are both reported."""
    case = mha_cross_kdim()
    case.kind = kinds_by(default="self")
    row = evaluate("wrong tag", "torch", case)
    assert not row.tags_ok and not row.ok and row.calls_aiba == row.calls_ref == 1
    counter = iter(range(10))
    case = mha_self_padding()
    base = case.run
    case.run = lambda: base() + next(counter)
    row = evaluate("changing output", "torch", case)
    assert not row.identical and not row.ok


def markdown_table(rows: list) -> str:
    """The README's "Tested models" table."""
    lines = ["| model | library | aiba calls | reference calls | max prob. error | masked rows excluded | tags | "
             "output identical | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        desc = ZOO[r.name][2]
        status = "ok" if r.ok else "open: " + ZOO[r.name][3] if ZOO[r.name][3] else "FAILS: " + "; ".join(r.problems)
        err = "-" if r.calls_aiba == 0 else "inf" if math.isinf(r.max_err) else f"{r.max_err:.1e}"
        lines.append(f"| {desc} | {r.family} | {r.calls_aiba} | {r.calls_ref} | {err} | {r.masked_rows} | "
                     f"{'/'.join(r.tags) or '-'}{'' if r.tags_ok else ' (wrong)'} | "
                     f"{'yes' if r.identical else 'no'}{' (uncompiled run)' if r.against_uncompiled else ''} | {status} |")
    return "\n".join(lines)


def write_readme_table(table: str, readme) -> None:
    """Replace the table of the README's "Tested models" section with ``table``."""
    from aiba.atomic import atomic_write

    text = readme.read_text()
    head, rest = text.split("## Tested models", 1)
    section, sep, tail = rest.partition("\n## ")
    lines = section.split("\n")
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not rows:
        raise SystemExit(f"{readme}: no table under 'Tested models'")
    lines[rows[0]: rows[-1] + 1] = table.split("\n")
    atomic_write(readme, head + "## Tested models" + "\n".join(lines) + sep + tail)


@pytest.mark.parametrize("name, fused_calls", [("encoder_eval_fastpath", 2), ("transformer_eval", 1)])
def test_fast_path_rows_keep_the_fused_path(name, fused_calls, fused_encoder_calls):
    """The eval rows are only worth their name if the fused encoder layer really runs, with
    the block as without it."""
    from aiba import AttnTap, combined_patch

    count = fused_encoder_calls
    case = ZOO[name][1]()
    with torch.no_grad():
        case.run()
    assert count[0] == fused_calls
    tap = AttnTap(kinds=("cross", "self"), keep="probs")
    with combined_patch(tap, model=case.model), torch.no_grad():
        case.run()
    assert count[0] == 2 * fused_calls


def test_readme_lists_every_zoo_model():
    """The README's "Tested models" table has a row for each model of the zoo."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Tested models", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")}
    assert {desc for _, _, desc, _ in ZOO.values()} <= rows


def test_compiled_row_runs_compiled_again_after_the_block():
    """The compiled rows compare the block's output with the uncompiled run; outside the
    block the compiled graph still runs, unchanged, before and after."""
    from aiba import AttnTap, combined_patch

    case = mha_compiled_fullgraph()
    with torch.no_grad():
        before = case.run()
        with combined_patch(AttnTap(kinds=("self",)), model=case.model):
            inside = case.run()
        after = case.run()
        eager = case.uncompiled()
    assert torch.equal(before, after) and torch.equal(inside, eager)


if __name__ == "__main__":
    import sys
    import warnings
    from pathlib import Path

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    table = markdown_table([zoo_row(n) for n in ZOO])
    print(table)
    if "--write-readme" in sys.argv:
        write_readme_table(table, Path(__file__).resolve().parents[1] / "README.md")
