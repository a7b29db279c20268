"""Mel features on the project's T x F grid (AIBA Sec. 2.1-2.2).

One mel implementation for everything that compares audio energy with attention maps:
stems, mixes and generated clips go through :func:`mel_spectrogram` and :func:`to_grid`,
and the templates map Hz to grid rows with :func:`grid_row_hz`, which uses the same mel
scale and the same resize convention. Defaults match AudioLDM2's feature extractor
(16 kHz, n_fft 1024, hop 160, 64 mel bands, 0-8000 Hz, Slaney mel scale as in
``librosa.filters.mel(htk=False)``).

Grid convention used across aiba: a map is ``(T, F)``, axis 0 = time frames, axis 1 =
mel rows in ascending frequency (row 0 = lowest band). The resize from the native
``(frames, n_mels)`` spectrogram to ``(T, F)`` is bilinear with ``align_corners=False``
(antialiased when shrinking), the same resize the attention mapping uses, so grid row
``f`` sits at native mel index ``(f + 0.5) * n_mels / F - 0.5``.

librosa and soundfile are imported inside the functions that need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AibaError

__all__ = [
    "MelConfig",
    "AUDIOLDM2_MEL",
    "hz_to_mel",
    "mel_to_hz",
    "mel_band_hz",
    "grid_row_hz",
    "load_audio",
    "mel_spectrogram",
    "to_grid",
    "mel_grid",
]


@dataclass(frozen=True)
class MelConfig:
    """Mel feature settings; the defaults are AudioLDM2's (16 kHz, 64 mels, hop 160)."""

    sr: int = 16000
    n_fft: int = 1024
    hop_length: int = 160  # 10 ms frames at 16 kHz
    win_length: int = 1024
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 8000.0  # Nyquist at 16 kHz
    htk: bool = False  # False: Slaney mel scale (librosa default, AudioLDM2)
    power: float = 2.0  # 2: energy, 1: magnitude

    def __post_init__(self):
        if not (0 <= self.fmin < self.fmax <= self.sr / 2):
            raise AibaError(
                f"MelConfig: need 0 <= fmin < fmax <= sr/2, got fmin={self.fmin}, "
                f"fmax={self.fmax}, sr={self.sr}"
            )
        if self.n_mels < 1 or self.hop_length < 1 or self.n_fft < 1:
            raise AibaError(
                f"MelConfig: n_mels, hop_length, n_fft must be >= 1, got "
                f"{self.n_mels}, {self.hop_length}, {self.n_fft}"
            )


AUDIOLDM2_MEL = MelConfig()


def hz_to_mel(hz, htk: bool = False):
    """Hz to mel: Slaney scale (linear below 1 kHz, log above) or HTK (2595 log10(1+f/700))."""
    hz = np.asarray(hz, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    f_sp = 200.0 / 3
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    lin = hz / f_sp
    log = min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, log, lin)


def mel_to_hz(mel, htk: bool = False):
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    f_sp = 200.0 / 3
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    lin = f_sp * mel
    log = min_log_hz * np.exp(logstep * (mel - min_log_mel))
    return np.where(mel >= min_log_mel, log, lin)


def mel_band_hz(cfg: MelConfig = AUDIOLDM2_MEL) -> np.ndarray:
    """Centre frequency (Hz) of each of the ``n_mels`` filters, ascending.

    The filters' centres are ``n_mels`` of ``n_mels + 2`` points equally spaced in mel
    between fmin and fmax (the outer two are the first and last filter edges), as in
    ``librosa.mel_frequencies(n_mels + 2)[1:-1]``.
    """
    lo, hi = hz_to_mel(cfg.fmin, cfg.htk), hz_to_mel(cfg.fmax, cfg.htk)
    mels = np.linspace(lo, hi, cfg.n_mels + 2)[1:-1]
    return mel_to_hz(mels, cfg.htk)


def grid_row_hz(F: int = 64, cfg: MelConfig = AUDIOLDM2_MEL) -> np.ndarray:
    """Centre frequency (Hz) of each of the ``F`` grid rows (row 0 lowest).

    Follows the bilinear ``align_corners=False`` resize of :func:`to_grid`: row ``f``
    samples the native mel index ``x = (f + 0.5) * n_mels / F - 0.5``; its centre is the
    mel-scale interpolation of the filter centres at ``x``. With ``F == n_mels`` this is
    exactly :func:`mel_band_hz`.
    """
    if F < 1:
        raise AibaError(f"grid_row_hz: F must be >= 1, got {F}")
    lo, hi = hz_to_mel(cfg.fmin, cfg.htk), hz_to_mel(cfg.fmax, cfg.htk)
    step = (hi - lo) / (cfg.n_mels + 1)
    x = (np.arange(F) + 0.5) * cfg.n_mels / F - 0.5
    x = np.clip(x, 0, cfg.n_mels - 1)  # the resize clamps at the edges
    return mel_to_hz(lo + (x + 1) * step, cfg.htk)


def load_audio(path, sr: int | None = 16000, *, what: str | None = None) -> np.ndarray:
    """Read an audio file as mono float32, resampled to ``sr`` (None: keep the file's rate).

    ``what`` names the item (track/stem) in the error when the file is missing or corrupt.
    """
    import soundfile as sf

    label = what or str(path)
    path = Path(path)
    if not path.is_file():
        raise AibaError(f"{label}: audio file not found: {path}")
    try:
        y, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError
        raise AibaError(f"{label}: cannot decode audio file {path}: {e}") from None
    y = y.mean(axis=1)  # (n,) mono
    if sr is not None and file_sr != sr:
        import librosa

        y = librosa.resample(y, orig_sr=file_sr, target_sr=sr).astype(np.float32)
    return y


def mel_spectrogram(y, cfg: MelConfig = AUDIOLDM2_MEL) -> np.ndarray:
    """Mel spectrogram of a mono signal at ``cfg.sr``: ``(frames, n_mels)``, low to high.

    Power ``cfg.power`` (2 = energy), no log; frames are centred (librosa default).
    """
    import librosa

    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1:
        raise AibaError(f"mel_spectrogram: expected a mono signal (n,), got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise AibaError("mel_spectrogram: signal contains NaN or inf")
    S = librosa.feature.melspectrogram(
        y=y, sr=cfg.sr, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
        win_length=cfg.win_length, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax,
        htk=cfg.htk, power=cfg.power,
    )  # (n_mels, frames)
    return np.ascontiguousarray(S.T)  # (frames, n_mels)


def to_grid(spec, T: int = 128, F: int = 64) -> np.ndarray:
    """Resize a ``(frames, bins)`` array to ``(T, F)``: bilinear, align_corners=False.

    Antialiased when shrinking, so energy of short events is averaged, not skipped.
    """
    import torch
    import torch.nn.functional as tF

    spec = np.asarray(spec, dtype=np.float32)
    if spec.ndim != 2 or min(spec.shape) < 1:
        raise AibaError(f"to_grid: expected a non-empty (frames, bins) array, got shape {spec.shape}")
    if spec.shape == (T, F):
        return spec.copy()
    x = torch.from_numpy(spec)[None, None]  # (1, 1, frames, bins)
    out = tF.interpolate(x, size=(T, F), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy().clip(min=0) if spec.min() >= 0 else out[0, 0].numpy()  # (T, F)


def mel_grid(audio, cfg: MelConfig = AUDIOLDM2_MEL, T: int = 128, F: int = 64,
             *, what: str | None = None) -> np.ndarray:
    """Mel energy of a file path or mono signal (at ``cfg.sr``) on the ``(T, F)`` grid."""
    if isinstance(audio, (str, Path)):
        audio = load_audio(audio, cfg.sr, what=what)
    return to_grid(mel_spectrogram(audio, cfg), T, F)
