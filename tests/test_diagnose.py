"""``aiba diagnose``: calls by module path, verdicts, map health, JSON schema and the CLI."""
import json
import textwrap

import pytest

torch = pytest.importorskip("torch")

from aiba.cli import main  # noqa: E402
from aiba.diagnose import Diagnosis, diagnose, format_report  # noqa: E402

CALL_KEYS = {"name", "kernel", "kind", "q_len", "k_len", "lattice"}


def test_diagnose_audioldm2_two_streams_2d(audioldm2_backend):
    d = diagnose(audioldm2_backend, steps=2)
    assert isinstance(d, Diagnosis)
    assert d.exposes_cross_attention and d.frequency_resolved and d.query_lattice == "time x frequency"
    assert d.latent_shape == (20, 12) and d.prefix_tokens == 0 and d.cfg == "uncond_first"
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
    assert d.latent_shape == (c.latent_len,) and d.prefix_tokens == 1 and d.cfg == "cond_first"
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
    assert "exposes cross-attention: yes" in text and "cfg: unknown" in text
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
