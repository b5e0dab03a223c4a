"""Shared fixtures: one gloo process pool per test module and world size."""

from __future__ import annotations

import pytest

from tests._dist import DistPool


@pytest.fixture(scope="module")
def pool2():
    pool = DistPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool4():
    pool = DistPool(4)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool8():
    pool = DistPool(8)
    yield pool
    pool.close()
