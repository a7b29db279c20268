"""Tags from facts (forward arguments, module attributes, overrides, the length rule last),
packed grouped-query decode, DETR-style MHA, names by the running module. References are
each library's own eager attention weights."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aiba import AibaError, AttnTap, combined_patch


def _eager_and_sdpa(model):
    """Run ``fn`` with eager attention (weights returned) and with SDPA (captured)."""
    def set_impl(name):
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(name)
        else:
            model.config._attn_implementation = name
    return set_impl


def _head_mean(w: torch.Tensor) -> torch.Tensor:
    return w.double().mean(dim=1)  # (B, H, Lq, Lk) -> (B, Lq, Lk)


# ------------------------------------------------------ transformers decoders
@pytest.fixture(scope="module")
def tiny_llama():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _llama_decode(m, impl, capture=False, output_attentions=False):
    set_impl = _eager_and_sdpa(m)
    set_impl(impl)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 7, dtype=torch.long)
    am[0, :2] = 0  # left padding: the decode step gets a mask, so transformers packs the grouped heads
    nxt = torch.tensor([[5], [9]])
    am2 = torch.cat([am, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        cache = m(ids, attention_mask=am, use_cache=True).past_key_values
        tap = AttnTap(kinds=("cross", "self"), keep="probs")
        if capture:
            with combined_patch(tap, model=m):
                out = m(nxt, attention_mask=am2, past_key_values=cache, use_cache=True)
        else:
            out = m(nxt, attention_mask=am2, past_key_values=cache, use_cache=True, output_attentions=output_attentions)
    return out, tap


def test_packed_gqa_decode_unpacked_and_exact(tiny_llama):
    ref, _ = _llama_decode(tiny_llama, "eager", output_attentions=True)
    plain, _ = _llama_decode(tiny_llama, "sdpa")
    out, tap = _llama_decode(tiny_llama, "sdpa", capture=True)
    assert torch.equal(out.logits, plain.logits)
    assert [(r.name, r.kind, r.kind_source, r.q_len, r.k_len, r.heads) for r in tap.store] == [
        (f"model.layers.{i}.self_attn", "self", "cache", 1, 8, 4) for i in range(2)]
    for rec, w in zip(tap.store, ref.attentions):
        assert w.shape == (2, 4, 1, 8)
        assert (rec.probs.double() - _head_mean(w)).abs().max() < 1e-6


@pytest.fixture(scope="module")
def tiny_bart():
    pytest.importorskip("transformers")
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return BartForConditionalGeneration(cfg).eval()


def test_encoder_decoder_cross_by_key_value_states_and_cached_decode(tiny_bart):
    """Decoder cross-attention over 12 encoder tokens from 8 queries (the length rule alone
    would say "self"), and a cached one-token decode step (it would say "cross")."""
    m = tiny_bart
    src = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    tgt = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    set_impl = _eager_and_sdpa(m)
    with torch.no_grad():
        set_impl("eager")
        ref = m(src, decoder_input_ids=tgt, output_attentions=True)
        set_impl("sdpa")
        plain = m(src, decoder_input_ids=tgt)
        tap = AttnTap(kinds=("cross", "self"), keep="probs")
        with combined_patch(tap, model=m):
            out = m(src, decoder_input_ids=tgt, use_cache=True)
            tap.next_step()
            out2 = m(src, decoder_input_ids=tgt[:, :1] + 1, encoder_outputs=(out.encoder_last_hidden_state,),
                     past_key_values=out.past_key_values, use_cache=True)
    assert torch.equal(out.logits, plain.logits)
    got = [(r.name, r.kind, r.kind_source, r.q_len, r.k_len) for r in tap.store]
    assert got == [
        ("model.encoder.layers.0.self_attn", "self", "args", 12, 12),
        ("model.decoder.layers.0.self_attn", "self", "args", 8, 8),
        ("model.decoder.layers.0.encoder_attn", "cross", "args", 8, 12),
        ("model.decoder.layers.0.self_attn", "self", "args", 1, 9),
        ("model.decoder.layers.0.encoder_attn", "cross", "args", 1, 12),
    ]
    refs = [ref.encoder_attentions[0], ref.decoder_attentions[0], ref.cross_attentions[0]]
    for rec, w in zip(tap.store[:3], refs):
        assert (rec.probs.double() - _head_mean(w)).abs().max() < 1e-6
    assert out2.logits.shape == (2, 1, 64)


# --------------------------------------------------------------- MHA / DETR
class _DetrLayer(nn.Module):
    """DETR's decoder layer: ``self_attn(x + pos, x + pos, x)`` computes x + pos twice."""

    def __init__(self, d=16, h=4):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.cross = nn.MultiheadAttention(d, h, batch_first=True)

    def forward(self, x, pos, memory):
        x = x + self.self_attn(x + pos, x + pos, x)[0]
        return x + self.cross(x + pos, memory, memory)[0]


def test_mha_same_values_is_self_and_matches_need_weights():
    torch.manual_seed(0)
    layer = _DetrLayer().eval()
    x, pos, mem = torch.randn(2, 6, 16), torch.randn(2, 6, 16), torch.randn(2, 6, 16)  # equal lengths
    with torch.no_grad():
        expected = layer(x, pos, mem)
        _, w_self = layer.self_attn(x + pos, x + pos, x, need_weights=True)
        tap = AttnTap(kinds=("cross", "self"), keep="probs")
        with combined_patch(tap, model=layer):
            out = layer(x, pos, mem)
    assert torch.equal(out, expected)
    assert [(r.name, r.kind, r.kind_source) for r in tap.store] == [("self_attn", "self", "args"), ("cross", "cross", "args")]
    torch.testing.assert_close(tap.store[0].probs, w_self, atol=1e-6, rtol=0)
    # a view of the same memory (same offset, shape, strides) is the same sequence
    t = torch.randn(2, 6, 16)
    tap2 = AttnTap(kinds=("cross", "self"))
    with torch.no_grad(), combined_patch(tap2):
        layer.self_attn(t, t.view(2, 6, 16), t)
        layer.self_attn(t, t + 1, t)
    assert [r.kind for r in tap2.store] == ["self", "cross"]


# ---------------------------------------------------------- rule order, override
class _Attn(nn.Module):
    """An attention module whose forward takes no context argument."""

    def __init__(self, cross: bool | None = None):
        super().__init__()
        if cross is not None:
            self.is_cross_attention = cross

    def forward(self, q, k):
        return F.scaled_dot_product_attention(q, k, k)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.flagged = _Attn(cross=True)
        self.attn2 = _Attn()
        self.plain = _Attn()

    def forward(self, q, k):
        return self.flagged(q, q) + self.attn2(q, q) + self.plain(q, k)


def test_rule_order_attribute_name_override_length():
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 3, 4)
    net = _Net()
    tap = AttnTap(kinds=("cross", "self"))
    with combined_patch(tap, model=net):
        net(q, k)
    assert [(r.name, r.kind, r.kind_source) for r in tap.store] == [
        ("flagged", "cross", "attribute"), ("attn2", "cross", "attribute"), ("plain", "cross", "heuristic")]
    # the override comes after the module's facts and before the length rule
    tap = AttnTap(kinds=("cross", "self"), kind_rules={"plain": "self", "flagged": "self"})
    with combined_patch(tap, model=net):
        net(q, k)
    assert [(r.kind, r.kind_source) for r in tap.store] == [("cross", "attribute"), ("cross", "attribute"), ("self", "override")]
    tap = AttnTap(kinds=("cross", "self"), kind_rules=lambda name, lq, lk: "self" if lk == 3 else None)
    with combined_patch(tap):
        net(q, k)
    assert [(r.kind, r.kind_source) for r in tap.store][-1] == ("self", "override")
    with pytest.raises(AibaError, match="kind_rules"):
        AttnTap(kind_rules={"x": "crosss"})
    with pytest.raises(AibaError, match="kind_rules"):
        AttnTap(kind_rules=3)
    # a callable returning nonsense: recorded as an error, not raised in the forward
    tap = AttnTap(kinds=("cross", "self"), latent_shape=(8,), kind_rules=lambda *a: "diagonal")
    with warnings.catch_warnings(record=True) as w, combined_patch(tap):
        warnings.simplefilter("always")
        out = net(q, k)
    assert out.shape == q.shape and tap.errors and any("kind_rules" in str(x.message) for x in w)
    with pytest.raises(AibaError, match="kind_rules returned 'diagonal'"):
        tap.maps()


# --------------------------------------------------------- attribution
class _Parent(nn.Module):
    """Children call a helper method of their parent, which issues the kernel call."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _Child(self), _Child(self)

    def helper(self, q, k):
        return F.scaled_dot_product_attention(q, k, k)

    def forward(self, q, k1, k2):
        return self.a(q, k1) + self.b(q, k2)


class _Child(nn.Module):
    def __init__(self, parent):
        super().__init__()
        self.__dict__["parent"] = parent  # not a submodule

    def forward(self, q, k):
        return self.parent.helper(q, k)


def test_helper_method_attributed_to_running_child_and_lattices_split():
    p = _Parent()
    q = torch.randn(1, 2, 8, 4)
    k1, k2 = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    tap = AttnTap(kinds=("cross",), pool="max", latent_shape=(8, 4))
    with combined_patch(tap, model=p):
        p(q, k1, k2)
    assert [r.name for r in tap.store] == ["a", "b"]
    # one module issuing calls on two lattices: one layer per lattice, no error
    tap2 = AttnTap(kinds=("cross",), pool="max", latent_shape=(8, 4), cross_ratio=1.0)
    with combined_patch(tap2, model=p):
        p.a(q, k1)
        p.a(q[:, :, :2], k1)  # 2 queries: lattice (2, 1)
    assert not tap2.errors
    assert sorted(tap2.maps().layers) == ["a", "a@2x1"]


def test_kind_follows_the_arguments_a_forward_pre_hook_gave():
    """A forward pre-hook that drops the context makes the call a self call: the kind is read
    from what the forward received, not from what the caller passed."""

    class Attn(nn.Module):
        def forward(self, x, encoder_hidden_states=None):
            ctx = x if encoder_hidden_states is None else encoder_hidden_states
            return F.scaled_dot_product_attention(x, ctx, ctx)

    net = nn.ModuleDict({"hooked": Attn(), "plain": Attn()})
    net["hooked"].register_forward_pre_hook(lambda m, args, kwargs: (args, {}), with_kwargs=True)
    x, ctx = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 10, 8)
    tap = AttnTap(kinds=("cross", "self"))
    with combined_patch(tap, model=net):
        net["hooked"](x, encoder_hidden_states=ctx)
        net["plain"](x, encoder_hidden_states=ctx)
    assert [(r.name, r.kind, r.kind_source, r.k_len) for r in tap.store] == [("hooked", "self", "args", 16),
                                                                           ("plain", "cross", "args", 10)]
