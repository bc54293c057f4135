"""The warm start is the CPU demo's plain PyTorch loop: under DeepSpeed it is refused with a clear error,
before the learner loads anything (`Session` checks it right after the cluster checks)."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError
from trainer.learners.warmstart import check_warm_start


def test_refused_under_deepspeed() -> None:
    """A DeepSpeed engine needs its own backward/step and partitions parameters (ZeRO-3): a torch AdamW
    over them would train nothing or crash."""
    with pytest.raises(ConfigError, match=r"warmstart\.steps=300 under DeepSpeed.*set warmstart\.steps=0"):
        check_warm_start(300, deepspeed=True)
    check_warm_start(300, deepspeed=False)
    check_warm_start(0, deepspeed=True)
