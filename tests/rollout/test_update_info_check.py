"""The guard's check of a collective update's announcement (`rollout.reload_check.check_update_info`), on
hand-written listings against a hand-written layout, and `rollout.transfer.update_info` building one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from rollout.reload_check import ModelLayout, ReloadRefused, check_update_info
from rollout.transfer import update_info
from rollout.weights import TensorMeta

LAYOUT = ModelLayout(
    shapes={"embed.weight": (10, 4), "lm_head.weight": (10, 4), "norm.weight": (4,), "step": ()},
    floating=frozenset({"embed.weight", "lm_head.weight", "norm.weight"}),
    groups=(("embed.weight", "lm_head.weight"), ("norm.weight",)),
)
GOOD = [TensorMeta("embed.weight", torch.bfloat16, (10, 4)), TensorMeta("norm.weight", torch.float32, (4,))]


def test_update_info_lists_names_dtype_names_and_shapes() -> None:
    assert update_info(GOOD) == {
        "names": ["embed.weight", "norm.weight"], "dtype_names": ["bfloat16", "float32"], "shapes": [[10, 4], [4]],
    }  # fmt: skip
    check_update_info(update_info(GOOD), LAYOUT)  # a tied alias may be left out; a buffer may come along
    check_update_info(update_info([*GOOD, TensorMeta("step", torch.int64, ())]), LAYOUT)


def edited(**changes: Any) -> dict[str, Any]:
    return {**update_info(GOOD), **changes}


@pytest.mark.parametrize(
    ("info", "status", "message"),
    [
        ([], 400, "update_info must be an object"),
        (edited(shapes=[[10, 4]]), 400, "lists of one length"),
        (edited(names="embed.weight"), 400, "lists of one length"),
        (edited(dtype_names=["bfloat16", "complex64"]), 422, "'norm.weight' has dtype 'complex64'"),
        (edited(shapes=[[10, 4], [4.0]]), 422, "'norm.weight' has dtype 'float32' and shape [4.0]"),
        (edited(names=["embed.weight", "embed.weight"]), 422, "'embed.weight' is announced twice"),
        (edited(shapes=[[10, 4], [5]]), 422, "norm.weight has shape [5], the served model's is [4]"),
        (edited(dtype_names=["bfloat16", "int32"]), 422, "norm.weight has dtype int32, the served model's is floating"),
        (edited(names=["embed.weight", "other.weight"]), 422, "unknown tensors: other.weight"),
        (edited(names=["lm_head.weight", "bias"], shapes=[[10, 4], [4]]), 422, "1 of the served model's "
         "parameters missing: norm.weight"),
        (edited(dtype_names=[["x"], "float32"]), 422, "update_info.dtype_names[0] must be a string, not ['x']"),
        (edited(dtype_names=["bfloat16", {"x": 1}]), 422, "update_info.dtype_names[1] must be a string"),
        (edited(names=[["embed.weight"], "norm.weight"]), 422, "update_info.names[0] must be a string"),
        (edited(names=["embed.weight", {"n": 1}]), 422, "update_info.names[1] must be a string, not {'n': 1}"),
        (edited(shapes=[[10, 4], [True]]), 422, "'norm.weight' has dtype 'float32' and shape [True]"),
    ],
)
def test_update_info_refused(info: Any, status: int, message: str) -> None:
    with pytest.raises(ReloadRefused) as caught:
        check_update_info(info, LAYOUT)
    assert caught.value.status == status and message in str(caught.value), str(caught.value)
