"""vLLM's own log lines during training, kept off the progress bar.

An in-process engine logs at INFO on every weight sync ("Reloading weights inplace...", "Reloading and
processing weights took ...", "Successfully reset prefix cache"), and its layer-wise reload warns
"RotaryEmbedding: Failed to load weights" for every rotary layer: these have no weights in any checkpoint
(their cos/sin cache is computed, and vLLM puts it back), so the warning says nothing. `quiet_vllm` raises
the ``vllm`` logger to WARNING around generation and weight reloads and drops that one warning; every other
vLLM warning and error still shows, start-up logs as vLLM configures them, and the project's own loggers
are untouched. A user who sets ``VLLM_LOGGING_LEVEL`` keeps exactly that level.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

LEVEL_ENV = "VLLM_LOGGING_LEVEL"
# the logger of vLLM's layer-wise reload (vllm/model_executor/model_loader/reload/layerwise.py)
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _not_rotary(record: logging.LogRecord) -> bool:
    """False for "<...>RotaryEmbedding: Failed to load weights" (any rotary variant), True otherwise."""
    message = record.getMessage()
    return not (message.endswith(": Failed to load weights") and message.split(":")[0].endswith("RotaryEmbedding"))


@contextlib.contextmanager
def quiet_vllm() -> Iterator[None]:
    """vLLM logs at WARNING and above, without the rotary reload warning, while active; as before after."""
    reload_logger = logging.getLogger(RELOAD_LOGGER)
    added = _not_rotary not in reload_logger.filters  # nested: the outermost removes it
    reload_logger.addFilter(_not_rotary)
    vllm_logger = logging.getLogger("vllm")
    saved = vllm_logger.level
    if LEVEL_ENV not in os.environ and vllm_logger.getEffectiveLevel() < logging.WARNING:
        vllm_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        vllm_logger.setLevel(saved)
        if added:
            reload_logger.removeFilter(_not_rotary)
