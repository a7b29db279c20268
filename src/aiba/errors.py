"""The one error type aiba raises, and its one warning category."""

__all__ = ["AibaError", "AibaWarning"]


class AibaError(RuntimeError):
    """Raised for invalid input or state; the message names the layer, shapes and expectation."""


class AibaWarning(UserWarning):
    """Something works but is probably not what the user meant (e.g. a constant pooled map)."""
