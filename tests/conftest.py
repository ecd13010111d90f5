"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture
def fresh_decode_calls():
    """decode's built calls and known layouts, cleared before and after a test that patches what
    they are built from (a monkeypatched constant or rule), so that none built under the patch
    outlives the test, even one that fails."""
    from leanattn._testing import DECODE_CALLS, DECODE_KNOWN

    DECODE_CALLS.clear()
    DECODE_KNOWN.clear()
    yield
    DECODE_CALLS.clear()
    DECODE_KNOWN.clear()
