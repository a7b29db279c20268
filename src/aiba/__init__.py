"""aiba: where text-to-audio diffusion models look on the time-frequency plane.

    from aiba import AttnTap, combined_patch
    tap = AttnTap(target_T=128, target_F=64, pool="mean", latent_shape=(256, 16))
    with combined_patch(tap, model=unet):
        unet(...)
    maps = tap.maps()          # .overall (B, T, F), .layers {path: (B, T, F)}
"""
from .errors import AibaError, AibaWarning
from .capture.patch import combined_patch
from .capture.tap import AttnTap, CallRecord, TapMaps

__all__ = ["AttnTap", "CallRecord", "TapMaps", "combined_patch", "AibaError", "AibaWarning"]
__version__ = "0.1.0"
