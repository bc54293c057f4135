"""The module lists in tests/conftest.py (`TIMING_MODULES`, run alone by `make test`; `LONGEST_MODULES`, run
first) name test files that exist: a renamed module would otherwise drop out of them without a word."""

from __future__ import annotations

import pytest
from conftest import LONGEST_MODULES, TIMING_MODULES
from helpers import REPO


@pytest.mark.parametrize("module", sorted(TIMING_MODULES) + list(LONGEST_MODULES))
def test_listed_module_exists(module: str) -> None:
    assert (REPO / module).is_file(), f"tests/conftest.py lists {module}, which does not exist"

