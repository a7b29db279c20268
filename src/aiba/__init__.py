"""aiba: where text-to-audio diffusion models look on the time-frequency plane."""
from .errors import AibaError, AibaWarning

__all__ = ["AibaError", "AibaWarning"]
__version__ = "0.1.0"
