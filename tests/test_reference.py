"""The reference backend, its shipped weights, the positive-control scoring and the custom-model helpers."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from aiba import AttnTap, combined_patch  # noqa: E402
from aiba.errors import AibaError  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def untrained():
    from aiba.backends import get

    return get("reference", tiny=True, seed=0)


def test_tokenizer_gives_word_positions():
    from aiba.backends.reference import WordTokenizer, default_vocab

    tok = WordTokenizer(default_vocab(), max_len=8)
    assert tok.tokens("Bass and strings playing together") == [
        "bass", "and", "strings", "playing", "together", "<pad>", "<pad>", "<pad>"]
    assert tok.index("bass and strings playing together", "strings") == [2]
    assert tok.index("the sound of organ playing alone", "organ") == [3]
    assert tok.tokens("a kazoo")[:2] == ["a", "<unk>"]
    assert tok.encode([""]).tolist() == [[0] * 8]  # the unconditional prompt is all padding
    with pytest.raises(AibaError, match="not a token"):
        tok.index("a solo bass recording", "piano")
    with pytest.raises(AibaError, match="at most 8"):
        tok.tokens("one two three four five six seven eight nine")


def test_backend_generates_and_captures(untrained):
    be = untrained
    assert be.n_params() if hasattr(be, "n_params") else be.model.n_params() > 100_000
    tap = AttnTap(target_T=8, target_F=64, pool="mean")
    res = be.generate(["a solo bass recording", "drums and organ playing together"], tap=tap, steps=2,
                      guidance_scale=3.0, seconds=0.08)
    assert res.audio.ndim == 2 and res.audio.shape[0] == 2 and np.isfinite(res.audio).all()
    assert res.sample_rate == 16000 and res.latent_shape == (8, 64) and res.steps == 2
    assert tap.step == 2  # one advance per denoising step
    words = res.maps["words"].overall
    assert tuple(words.shape) == (2, 8, 64) and res.maps["words"].freq_resolved
    names = {r.name for r in tap.store if r.captured}
    assert any(n.startswith("down_blocks.0") and n.endswith("attn1") for n in names)  # only_cross_attention
    assert all(r.kind == "cross" for r in tap.store if r.captured)
    # the features are the mel image the sampler produced; untrained weights still give finite values
    assert be.last_features.shape == (2, 8, 64) and np.isfinite(be.last_features).all()


def test_shipped_weights_match_their_provenance():
    from aiba.backends.reference import load_weights, sha256_file, shipped_weights

    have = shipped_weights()
    assert "seed0" in have and "seed1" in have, have
    for name, path in have.items():
        prov = json.loads(path.with_suffix(".json").read_text())
        assert sha256_file(path) == prov["sha256"], name
        assert prov["seed"] == int(name.removeprefix("seed")) and prov["steps"] > 0
        assert "train-reference" in prov["command"] and prov["data"]["stems"] > 0
        assert path.stat().st_size < 8 * 2**20
        m = load_weights(name)
        assert m.meta["steps"] == prov["steps"]
        assert m.n_params() == prov["parameters"]


def test_control_scoring_hand_computed():
    from aiba.tools.control import WordItems, class_summary, paired_bootstrap

    bands = {"Bass": np.array([1, 1, 0, 0], bool), "Organ": np.array([0, 0, 1, 1], bool)}
    up, down = np.array([[3.0, 2, 1, 0]]), np.array([[0.0, 1, 2, 3]])  # (T=1, F=4) maps
    it = WordItems()
    for c, m in (("Bass", up), ("Bass", up), ("Organ", down), ("Organ", down)):
        it.kind.append("single"), it.cls.append(c), it.other.append(""), it.prompt.append("")
        it.maps.append(m), it.other_maps.append(None)
    # one pair generation, scored both ways: bass's map is `up`, organ's map is `up` as well
    for c, o in (("Bass", "Organ"), ("Organ", "Bass")):
        it.kind.append("pair"), it.cls.append(c), it.other.append(o), it.prompt.append("")
        it.maps.append(up), it.other_maps.append(up)
    s = class_summary(it, bands, n_boot=0)
    # matched: `up` ranks rows 0, 1 first -> AP 1. Shuffled null for Bass: Organ's map `down`
    # ranks rows 3, 2, 1, 0 -> hits at ranks 3 and 4 -> AP = (1/3 + 2/4) / 2
    assert s["Bass"]["single"]["ap"]["matched"] == pytest.approx(1.0)
    assert s["Bass"]["single"]["ap"]["null"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert s["Bass"]["single"]["pointing"]["null"] == 0.0 and s["Organ"]["single"]["pointing"]["matched"] == 1.0
    # pair: Organ's word map `up` vs the organ band -> AP (1/3 + 2/4) / 2; the other word's (Bass) map too
    assert s["Organ"]["pair"]["ap"]["matched"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert s["Organ"]["pair"]["ap"]["null"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert s["Bass"]["coverage"] == 0.5 and not s["Organ"]["holds"]
    # identical maps for both words: the difference is zero, no sign agreement is counted
    assert s["_sign_agreement"]["n"] == 0
    # bootstrap: a clear separation is detected, an overlap is not
    rng = np.random.default_rng(0)
    r = paired_bootstrap([0.9, 0.95, 0.92, 0.97], [0.1, 0.2, 0.15, 0.12], 500, rng)
    assert r["separated"] and r["matched_ci"][0] > r["null_ci"][1]
    assert r["matched"] == pytest.approx(np.mean([0.9, 0.95, 0.92, 0.97]))
    r = paired_bootstrap([0.5, 0.6, 0.4, 0.5], [0.55, 0.45, 0.5, 0.5], 500, rng)
    assert not r["separated"]


def test_class_table_from_maps_templates_labels_reports_coverage():
    from aiba.align.tables import build_table3, class_table, flagged_classes

    rng = np.random.default_rng(1)
    maps = rng.random((6, 4, 8))
    labels = ["Bass"] * 3 + ["Drums"] * 3
    bands = {"Bass": np.r_[np.ones(2), np.zeros(6)].astype(bool), "Drums": np.ones(8, bool)}
    t = class_table(maps, bands, labels, n_boot=50)
    gts = np.stack([np.tile(bands[c], (4, 1)) for c in labels])  # (6, 4, 8) built by hand
    ref = build_table3(maps, gts, labels, n_boot=50)
    np.testing.assert_allclose(t.values, ref.values)
    assert t.settings["coverage"] == {"Bass": 0.25, "Drums": 1.0}
    assert flagged_classes(t) == ["Drums"]
    assert "FLAGGED" in t.to_markdown() and "Bass 25%" in t.to_markdown()
    with pytest.raises(AibaError, match="no template for class"):
        class_table(maps, {"Bass": bands["Bass"]}, labels)


def test_custom_helpers_word_indices_and_steps():
    from aiba.backends.reference import WordTokenizer, default_vocab
    from aiba.custom import advance_steps, step_callback, word_indices, word_mask

    tok = WordTokenizer(default_vocab())
    assert word_indices(tok, "bass and strings playing together", "strings") == [2]
    # a callable tokenizer with a start token: the index counts it
    sos = lambda p: ["<s>"] + p.split() + ["</s>"]  # noqa: E731
    assert word_indices(sos, "a solo bass recording", "bass") == [3]
    with pytest.raises(AibaError, match="not found"):
        word_indices(sos, "a solo bass recording", "piano")
    m = word_mask(tok, ["a solo bass recording", "drums and organ playing together"], ["bass", "organ"], 8)
    assert m.shape == (2, 8) and m[0].nonzero().flatten().tolist() == [2] and m[1].nonzero().flatten().tolist() == [2]
    a, b = AttnTap(), AttnTap()
    with combined_patch(a):
        with combined_patch(b):
            assert advance_steps() == [1, 1]
            cb = step_callback()
            kw = {"latents": 1}
            assert cb(None, 0, 999, kw) is kw
        assert advance_steps() == [3]  # only `a` is active here
    assert (a.step, b.step) == (3, 2)
    assert advance_steps() == []  # nothing active


def _readme_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- custom-model example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its custom-model example"
    return m.group(1)


def test_readme_custom_model_example_runs():
    ns: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), ns)
    table = ns["table"]
    assert table.rows[-1] == "Macro-avg" and set(table.rows[:-1]) == {"Bass", "Strings"}
    assert ns["maps"].shape == (4, 8, 64)


def test_train_reference_resumes_to_the_same_weights(tmp_path):
    from aiba.tools.train_reference import TrainSettings, train

    pytest.importorskip("librosa")
    from aiba.cli import main

    data = tmp_path / "mini"
    assert main(["make-dataset", str(data), "--tracks", "2", "--seconds", "1", "--synth", "sine", "-q"]) == 0
    kw = dict(data=str(data), split="train", batch=2, checkpoint_every=1, warmup=2)
    straight = train(TrainSettings(out=str(tmp_path / "a"), steps=3, **kw), progress=False)
    train(TrainSettings(out=str(tmp_path / "b"), steps=2, **kw), progress=False)
    resumed = train(TrainSettings(out=str(tmp_path / "b"), steps=3, **kw), progress=False)
    assert straight["steps"] == resumed["steps"] == 3
    assert straight["sha256"] == resumed["sha256"]
    assert (tmp_path / "a" / "loss.json").is_file() and len(json.loads((tmp_path / "a" / "loss.json").read_text())["loss"]) == 3
