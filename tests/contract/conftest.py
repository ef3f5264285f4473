"""Helpers of the contract suite: a second, independent view of the same store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests import servers

Reopen = Callable[[Any], Any]


@pytest.fixture
def reopen() -> Reopen:
    """Opens the same store through new connections, to see only what was committed."""
    return servers.second_holder
