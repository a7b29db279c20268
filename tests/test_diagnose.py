"""``aiba diagnose``: calls by module path, verdicts, map health, JSON schema and the CLI."""
import json
import textwrap

import pytest

torch = pytest.importorskip("torch")

from aiba.cli import main  # noqa: E402
from aiba.tools.diagnose import Diagnosis, diagnose, format_report  # noqa: E402

CALL_KEYS = {"name", "kernel", "kind", "q_len", "k_len", "lattice"}


def test_diagnose_audioldm2_two_streams_2d(audioldm2_backend):
    d = diagnose(audioldm2_backend, steps=2)
    assert isinstance(d, Diagnosis)
    assert d.exposes_cross_attention and d.frequency_resolved and d.query_lattice == "time x frequency"
    assert d.latent_shape == (20, 12) and d.prefix_tokens == 0 and d.cfg_order == "uncond_first"
    assert len(d.calls) == 42 and all(c.calls_per_step == 1 for c in d.calls)
    by_stream = {}
    for c in d.calls:
        by_stream.setdefault(c.stream, set()).add((c.kind, c.k_len))
        assert c.kernel == "sdpa" and c.kind_source == "args" and c.heads == 2 and c.batch == 2
        assert c.lattice in {(10, 6), (5, 3)} and c.lattice[0] * c.lattice[1] == c.q_len
    assert by_stream["gpt2"] == {("cross", 8)} and by_stream["t5"] == {("cross", 6)}
    assert {k for k, _ in by_stream["self"]} == {"self"}
    assert d.escaped == 0 and d.attention_modules == 42
    assert d.attention_module_runs == d.calls_seen == 42 * 2
    assert d.outside_calls > 0  # text encoders and the VAE
    health = {h.stream: h for h in d.map_health}
    assert set(health) == {"gpt2", "t5"}
    for h in health.values():
        for v in (h.entropy_time, h.flatness_time, h.entropy_freq, h.flatness_freq):
            assert 0.0 <= v <= 1.0 + 1e-9
    text = format_report(d)
    assert "exposes cross-attention: yes" in text and "2-D time x frequency" in text
    assert "down_blocks.1.attentions.2.transformer_blocks.0.attn2" in text and "60 x 6" in text


def test_diagnose_sat_dit_cross_time_only_prefix(sat_backend):
    from aiba.backends.stable_audio import TinyDiTConfig

    c = TinyDiTConfig()
    d = diagnose(sat_backend, steps=2)
    assert d.exposes_cross_attention  # the paper's A.4 says none; the code has one per block
    assert not d.frequency_resolved and d.query_lattice == "time only"
    assert d.latent_shape == (c.latent_len,) and d.prefix_tokens == 1 and d.cfg_order == "cond_first"
    cross = [g for g in d.calls if g.kind == "cross"]
    assert [g.name for g in cross] == [f"transformer.layers.{i}.cross_attn" for i in range(c.depth)]
    for g in cross:
        assert (g.q_len, g.k_len, g.lattice, g.stream) == (1 + c.latent_len, c.max_text_len + 2, (c.latent_len, 1), "t5")
    assert d.escaped == 0
    (h,) = d.map_health
    assert h.shape[1] == 1 and h.entropy_freq is None and h.flatness_freq is None
    text = format_report(d)
    assert "time only" in text and "stripped" in text and "<seconds_start> + <seconds_total>" in text


def test_diagnose_sao_pipeline_time_only(sao_backend):
    d = diagnose(sao_backend, steps=1)
    assert d.exposes_cross_attention and not d.frequency_resolved and d.prefix_tokens == 1
    assert {(g.q_len, g.k_len, g.lattice) for g in d.calls if g.kind == "cross"} == {(22, 14, (21, 1))}


def test_diagnose_counts_escaped_attention(mha_model):
    """An attention module computing its own softmax never reaches a shim: counted as escaped."""
    from torch import nn

    from aiba.backends.generic import GenericBackend

    class HandRolledAttention(nn.Module):
        def forward(self, q, k):
            return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ k

    class Model(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.extra = HandRolledAttention()

        def forward(self, x, ctx):
            y = self.inner(x, ctx)
            self.extra(torch.randn(1, 3, 4), torch.randn(1, 3, 4))
            return y

    model, inputs = mha_model
    d = diagnose(GenericBackend(Model(model), inputs), steps=2)
    assert d.escaped == 2 and d.escaped_modules == ["extra"]
    assert d.attention_modules == 3 and d.calls_seen == 4
    assert d.exposes_cross_attention and d.frequency_resolved and d.latent_shape == (6, 5)
    assert any("escaped" in n or "reached no kernel shim" in n for n in d.notes)


def test_cli_json_schema_sat_dit(capsys):
    pytest.importorskip("stable_audio_tools")
    assert main(["diagnose", "--backend", "stable-audio", "--tiny", "--json", "--steps", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exposes_cross_attention"] is True and out["frequency_resolved"] is False
    assert isinstance(out["calls"], list) and out["calls"]
    for c in out["calls"]:
        assert CALL_KEYS <= set(c)
        assert isinstance(c["lattice"], list) and len(c["lattice"]) == 2
    assert {c["kind"] for c in out["calls"]} == {"self", "cross"}
    assert all(c["lattice"][1] == 1 for c in out["calls"])


def test_cli_model_factory_human(tmp_path, monkeypatch, capsys):
    (tmp_path / "mha_factory.py").write_text(textwrap.dedent("""
        import torch
        from conftest import make_mha_model

        def build():
            g = torch.Generator().manual_seed(1)
            return make_mha_model(), (torch.randn(1, 4, 6, 5, generator=g), torch.randn(1, 7, 8, generator=g))

        def bad():
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["diagnose", "--model", "mha_factory:build", "--steps", "1"]) == 0
    text = capsys.readouterr().out
    assert "cross_attn" in text and "mha" in text and "30 x 7" in text and "6x5" in text
    assert "exposes cross-attention: yes" in text and "cfg_order: unknown" in text
    # the header shows what the factory fed the model, not a default prompt it never saw
    assert "the factory's example inputs: (1, 4, 6, 5), (1, 7, 8) (--prompt not used)" in text
    assert "a bass solo" not in text
    assert main(["diagnose", "--model", "mha_factory:bad"]) == 3  # EXIT_CODES["input"]
    assert "factory must return" in capsys.readouterr().err
    assert main(["diagnose", "--model", "mha_factory:build", "--latent-shape", "30", "--json", "--steps", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frequency_resolved"] is False and out["latent_shape"] == [30]


def test_cli_needs_a_source(capsys):
    assert main(["diagnose"]) == 3  # EXIT_CODES["input"]
    assert "--backend" in capsys.readouterr().err


def _encoder_model():
    from torch import nn

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def test_diagnose_keeps_the_encoder_fast_path(fused_encoder_calls):
    """diagnose watches nn.TransformerEncoderLayer without switching off its fused fast path
    (per-module hooks would), and reports the layers' attention runs that reached no shim."""
    from aiba import AttnTap, combined_patch
    from aiba.backends.generic import GenericBackend

    count = fused_encoder_calls
    model, x = _encoder_model(), torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(x)
    assert count[0] == 2  # the fast path runs without diagnose
    tap = AttnTap(kinds=("cross", "self"))
    with combined_patch(tap, model=model), torch.no_grad():
        model(x)
    captured = len([r for r in tap.store if not r.outside])  # calls capture sees per run (0 while it cannot)

    backend = GenericBackend(model, (x,), latent_shape=(8,))
    backend.streams()
    count[0] = 0
    d = diagnose(backend, steps=3)
    assert count[0] == 2 * 3  # every layer run of the diagnosed steps took the fused path
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    assert d.attention_modules == 2 and d.attention_module_runs == 2 * 3
    assert d.escaped == (2 - captured) * 3
    if d.escaped:
        assert d.escaped_modules == ["layers.0.self_attn", "layers.1.self_attn"]
        assert any("reached no kernel shim" in n for n in d.notes)


def test_diagnose_encoder_slow_path_not_escaped():
    """In training mode the layer calls its self_attn module: one run each, none escaped."""
    from aiba.backends.generic import GenericBackend

    model = _encoder_model().train()
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3))
    d = diagnose(GenericBackend(model, (x,), latent_shape=(8,)), steps=2)
    assert d.attention_module_runs == 2 * 2 and d.escaped == 0 and d.calls_seen == 4


def test_diagnose_delegated_kernel_call_is_not_escaped():
    """An attention module handing SDPA to a child module: its calls are captured (named by
    the child), so none is reported as escaped; a sibling that computes its own softmax is."""
    from torch import nn
    import torch.nn.functional as F

    from aiba.backends.generic import GenericBackend

    class Kernel(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    class DelegatingAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_qkv = nn.Linear(8, 24)
            self.kernel = Kernel()

        def forward(self, x):
            q, k, v = self.to_qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, 4)
            return self.kernel(q, k, v).transpose(1, 2).flatten(2)

    class HandRolledAttention(nn.Module):
        def forward(self, x):
            return torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([DelegatingAttention(), DelegatingAttention()])
            self.extra = HandRolledAttention()

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return self.extra(x)

    torch.manual_seed(0)
    d = diagnose(GenericBackend(Model(), (torch.randn(1, 6, 8),), latent_shape=(6,)), steps=2)
    assert d.attention_modules == 3 and d.attention_module_runs == 3 * 2
    assert {c.name for c in d.calls} == {"blocks.0.kernel", "blocks.1.kernel"} and d.calls_seen == 4
    assert d.escaped == 2 and d.escaped_modules == ["extra"]


def test_diagnose_encoder_layer_attention_without_self_attn_is_escaped():
    """A TransformerEncoderLayer that computes attention without calling its self_attn (as
    the fused path does) counts as a run of self_attn; with no call recorded, it escaped."""
    from torch import nn

    from aiba.backends.generic import GenericBackend

    class HandLayer(nn.TransformerEncoderLayer):
        def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
            return src + torch.softmax(src @ src.transpose(-1, -2), dim=-1) @ src

    torch.manual_seed(0)
    model = nn.TransformerEncoder(HandLayer(16, 2, dim_feedforward=32, batch_first=True), 2,
                                  enable_nested_tensor=False).eval()
    d = diagnose(GenericBackend(model, (torch.randn(2, 8, 16),), latent_shape=(8,)), steps=2)
    assert d.attention_modules == 2 and d.attention_module_runs == 2 * 2 and d.calls_seen == 0
    assert d.escaped == 4 and d.escaped_modules == ["layers.0.self_attn", "layers.1.self_attn"]
