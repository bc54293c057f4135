"""The warm start is the CPU demo's plain PyTorch loop: under DeepSpeed it refuses with a clear error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trainer.config import ConfigError
from trainer.warmstart import warm_start


def test_refused_under_deepspeed() -> None:
    """A DeepSpeed engine needs its own backward/step and partitions parameters (ZeRO-3): a torch AdamW
    over them would train nothing or crash, so the warm start stops before touching the model."""
    session = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=object())),
                              cfg=SimpleNamespace(warmstart=SimpleNamespace(steps=300)))
    with pytest.raises(ConfigError, match=r"warmstart\.steps=300 under DeepSpeed.*set warmstart\.steps=0"):
        warm_start(session)  # type: ignore[arg-type]
