"""Shared test helpers. Tiny models are built in fixtures, never at import."""


# ---- tiny backend fixtures (backends/audioldm2.py, backends/stable_audio.py) ---------------
# Built once per session; each skips cleanly when its optional dependency is missing.

import pytest  # noqa: E402  (kept so this block stands alone)


@pytest.fixture(scope="session")
def tiny_audioldm2():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from aiba.backends.audioldm2 import build_tiny

    return build_tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_sat_dit():
    """``(DiffusionTransformer, conditioner)`` of stable-audio-tools, tiny and random."""
    pytest.importorskip("stable_audio_tools")
    pytest.importorskip("transformers")
    from aiba.backends.stable_audio import build_tiny_conditioner, build_tiny_dit

    return build_tiny_dit(seed=0), build_tiny_conditioner(seed=0)


@pytest.fixture(scope="session")
def tiny_sao_pipeline():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from aiba.backends.stable_audio import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


# ---- end of tiny backend fixtures -----------------------------------------------------------


# --------------------------------------------------------------------------- band alignment
# (data, render, templates, tables): a rendered mini-Slakh shared by the session.
@pytest.fixture(scope="session")
def mini_slakh(tmp_path_factory):
    """Two 3 s mini-Slakh tracks at 16 kHz, rendered once; skipped when FluidSynth is absent."""
    from aiba.data.render import RenderConfig, fluidsynth_available, make_dataset

    if not fluidsynth_available():
        pytest.skip("FluidSynth (libfluidsynth3 + pyfluidsynth) not loadable")
    root = tmp_path_factory.mktemp("mini_slakh")
    make_dataset(root, RenderConfig(tracks=2, seconds=3.0, seed=0, sr=16000, synth="fluidsynth"),
                 progress=False)
    return root
