"""Fixtures of the contract tests shared by several modules."""

from __future__ import annotations

import pytest

from tests.support.places import NAMES as BACKENDS
from tests.support.places import Store as Place
from tests.support.places import make_store


@pytest.fixture(params=BACKENDS)
def place(request) -> Place:
    """A backend under test: where files go and how to put one there directly."""
    return make_store(request, request.param)
