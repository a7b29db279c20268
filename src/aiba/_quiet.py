"""Keep third-party notices a user cannot act on off the command line's output.

Each filter is narrow (one message of one library), so every other warning still shows:

- xformers logs "WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions" when its
  compiled kernels do not match the installed torch. aiba only uses xformers' Python
  layouts and bias classes on the CPU and calls its kernels only where they run.
- transformers' GPT-2 warns "`past_key_values` is deprecated" (FutureWarning) each time
  diffusers' AudioLDM2 pipeline generates its language-model tokens; the call is diffusers'.
- torch warns that ``torch.nn.utils.weight_norm`` is deprecated when diffusers builds the
  Oobleck autoencoder of Stable Audio; the call is diffusers'.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_third_party", "WARNING_FILTERS"]

# (action, message regex, category name, module regex): the warnings filters applied
WARNING_FILTERS = (
    ("ignore", r"`past_key_values` is deprecated", FutureWarning, r"transformers(\.|$)"),
    ("ignore", r"`torch.nn.utils.weight_norm` is deprecated", FutureWarning, r"torch\.nn\.utils\.weight_norm$"),
)


class _XformersExtensionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("WARNING[XFORMERS]") and "C++/CUDA extensions" in msg)


_FILTER = _XformersExtensionFilter()


def quiet_third_party() -> None:
    """Install the filters (idempotent)."""
    for action, message, category, module in WARNING_FILTERS:
        warnings.filterwarnings(action, message=message, category=category, module=module)
    log = logging.getLogger("xformers")
    if _FILTER not in log.filters:
        log.addFilter(_FILTER)
