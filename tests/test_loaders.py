"""The real loaders, offline: each tiny pipeline is saved in the format the hub serves, placed
in a Hugging Face cache under the real model id, and loaded by the same ``from_pretrained``
code a user runs (``aiba.backends.get(name)`` in a fresh process with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

REV = "0123456789abcdef0123456789abcdef01234567"
PROMPT = "a bass solo with drums"

# run in a fresh process: the backend a user gets from the hub id, one generation under capture
GENERATE = """
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from aiba import AttnTap
from aiba.backends import get
name, out = sys.argv[1], sys.argv[2]
backend = get(name, device="cpu")
tap = AttnTap(16, 8, pool="max")
res = backend.generate({prompt!r}, tap=tap, steps=2, seed=3)
maps = res.maps
stream = sorted(s for s in maps if s != "self")[0]
np.savez(out, audio=np.asarray(res.audio), map=maps[stream].overall.numpy())
print(json.dumps({{"calls": len(tap.store), "sample_rate": res.sample_rate}}))
""".format(prompt=PROMPT)


def hub_snapshot(cache: Path, repo: str) -> Path:
    """``cache/models--org--name/snapshots/REV`` with ``refs/main``: the hub cache layout."""
    d = cache / ("models--" + repo.replace("/", "--"))
    (d / "refs").mkdir(parents=True, exist_ok=True)
    (d / "refs" / "main").write_text(REV)
    snap = d / "snapshots" / REV
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def offline_env(tmp_path: Path, cache: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf_home"),
               OMP_NUM_THREADS="1")
    env.pop("TRANSFORMERS_CACHE", None)
    return env


def generate_offline(tmp_path: Path, cache: Path, name: str):
    out = tmp_path / f"{name}.npz"
    r = subprocess.run([sys.executable, "-c", GENERATE, name, str(out)], capture_output=True, text=True,
                       env=offline_env(tmp_path, cache), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    with np.load(out) as z:
        return info, z["audio"], z["map"]


def reference(backend):
    """The in-memory pipeline's own generation, the same call as in GENERATE."""
    import torch

    from aiba import AttnTap

    torch.manual_seed(0)
    tap = AttnTap(16, 8, pool="max")
    res = backend.generate(PROMPT, tap=tap, steps=2, seed=3)
    stream = sorted(s for s in res.maps if s != "self")[0]
    return len(tap.store), np.asarray(res.audio), res.maps[stream].overall.numpy()


def hub_tokenizer(tok):
    """The tiny word-level T5 tokenizer as the hub's T5 checkpoints ship it (Unigram, same ids)."""
    from aiba.backends._tokenizers import t5_unigram

    new = t5_unigram(tok.model_max_length)
    for p in (PROMPT, "a solo bass recording", "unknown kazoo words"):
        assert new(p).input_ids == tok(p).input_ids
    return new


def test_audioldm2_from_pretrained_offline(tmp_path):
    from aiba.backends.audioldm2 import AudioLDM2Backend, build_tiny

    pipe = build_tiny(0)
    pipe.tokenizer_2 = hub_tokenizer(pipe.tokenizer_2)
    cache = tmp_path / "cache"
    pipe.save_pretrained(hub_snapshot(cache, "cvssp/audioldm2-music"))  # what the hub serves
    calls, audio, grid = reference(AudioLDM2Backend(pipe))
    info, audio2, grid2 = generate_offline(tmp_path, cache, "audioldm2")
    assert info["calls"] == calls > 0 and info["sample_rate"] == pipe.vocoder.config.sampling_rate
    np.testing.assert_allclose(audio2, audio, rtol=1e-4, atol=1e-6)  # the saved weights, loaded
    np.testing.assert_allclose(grid2, grid, rtol=1e-4, atol=1e-7)
    assert grid.std() > 0


def test_stable_audio_pipeline_from_pretrained_offline(tmp_path):
    from aiba.backends.stable_audio import StableAudioDiffusersBackend, build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    pipe.tokenizer = hub_tokenizer(pipe.tokenizer)
    cache = tmp_path / "cache"
    pipe.save_pretrained(hub_snapshot(cache, "stabilityai/stable-audio-open-1.0"))
    calls, audio, grid = reference(StableAudioDiffusersBackend(pipe))
    info, audio2, grid2 = generate_offline(tmp_path, cache, "stable-audio-diffusers")
    assert info["calls"] == calls > 0
    np.testing.assert_allclose(audio2, audio, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grid2, grid, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend, model_id", [("audioldm2", "cvssp/audioldm2-music"),
                                               ("stable-audio-diffusers", "stabilityai/stable-audio-open-1.0"),
                                               ("stable-audio", "stabilityai/stable-audio-open-1.0")])
def test_missing_checkpoint_is_one_line(tmp_path, backend, model_id):
    if backend == "stable-audio":
        pytest.importorskip("stable_audio_tools")
    cache = tmp_path / "empty-cache"
    r = subprocess.run([sys.executable, "-m", "aiba", "diagnose", "--backend", backend, "--steps", "1", "--json"],
                       capture_output=True, text=True, env=offline_env(tmp_path, cache), timeout=300)
    assert r.returncode == 5, r.stderr[-2000:]
    assert r.stdout == "" and "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("aiba: error:")]
    assert len(lines) == 1
    assert model_id in lines[0] and str(cache) in lines[0] and f"huggingface-cli download {model_id}" in lines[0]


def test_stable_audio_tools_checkpoint_layout_reaches_the_model_factory(tmp_path):
    """stable-audio-tools' get_pretrained_model reads model_config.json and the safetensors from
    the hub cache; building the model from the config then needs its generation dependencies
    (torchaudio, k-diffusion, einops-exts). Where they are missing the user gets one line
    naming what to install; where they are present the tiny checkpoint loads and generates."""
    pytest.importorskip("stable_audio_tools")
    import torch
    from safetensors.torch import save_file

    cache = tmp_path / "cache"
    snap = hub_snapshot(cache, "stabilityai/stable-audio-open-1.0")
    config = {"model_type": "diffusion_cond", "sample_size": 84, "sample_rate": 4000, "audio_channels": 2,
              "model": {"diffusion": {"type": "dit", "config": {"io_channels": 8, "embed_dim": 128, "depth": 2,
                                                                  "num_heads": 4, "cond_token_dim": 64,
                                                                  "global_cond_dim": 128, "project_cond_tokens": False,
                                                                  "transformer_type": "continuous_transformer"},
                                      "cross_attention_cond_ids": ["prompt", "seconds_start", "seconds_total"],
                                      "global_cond_ids": ["seconds_start", "seconds_total"], "type": "dit"},
                        "io_channels": 8},
              "training": {}}
    (snap / "model_config.json").write_text(json.dumps(config))
    save_file({"dummy": torch.zeros(1)}, str(snap / "model.safetensors"))
    probe = ("import importlib.util as u; import sys; "
             "sys.exit(0 if all(u.find_spec(m) for m in ('torchaudio', 'k_diffusion', 'einops_exts')) else 3)")
    has_deps = subprocess.run([sys.executable, "-c", probe]).returncode == 0
    r = subprocess.run([sys.executable, "-m", "aiba", "diagnose", "--backend", "stable-audio", "--steps", "1",
                        "--json"], capture_output=True, text=True, env=offline_env(tmp_path, cache), timeout=300)
    if has_deps:
        pytest.skip("stable-audio-tools' generation dependencies are installed: the full-model path is "
                    "covered by its own checkpoint, not this reduced one")
    assert r.returncode == 5, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("aiba: error:")]
    assert len(lines) == 1 and "model_config.json needs" in lines[0], r.stderr[-2000:]
    assert r.stdout == ""
