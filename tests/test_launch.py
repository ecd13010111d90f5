"""The launch shim's residency cap: the dynamic shared memory that keeps a persistent grid at
its programs per SM (arithmetic here; the driver's occupancy of real launches in test_gpu.py)."""

import pytest

from leanattn._launch import RESERVED_SHARED, resident_shared

H200 = (233472, 232448)  # shared memory of an SM, the most one program may take (bytes)


@pytest.mark.parametrize("per_sm", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("shared", [0, 16 * 1024, 38 * 1024, 70 * 1024, 71680, 77825, 100 * 1024, 166 * 1024,
                                    227 * 1024])
def test_resident_shared_caps_programs_per_sm(shared, per_sm):
    sm, block = H200
    got = resident_shared(shared, per_sm, sm, block)
    assert shared <= got <= max(shared, block)
    fit = sm // (got + RESERVED_SHARED)  # programs an SM holds, by shared memory
    if (per_sm + 1) * (shared + RESERVED_SHARED) > sm:
        assert got == shared  # no more than per_sm fit already: nothing to add
    else:
        assert fit == per_sm  # exactly per_sm: one more no longer fits, and none is lost
        assert (per_sm + 1) * got > sm


def test_resident_shared_known_values():
    sm, block = H200
    # The 3-stage d <= 128 kernel (70 KiB): two an SM, not three.
    assert resident_shared(71680, 2, sm, block) == sm // 3 + 1 == 77825
    # The 6-stage one (over a third of an SM) is already alone.
    assert resident_shared(166 * 1024, 1, sm, block) == 166 * 1024
    # A cap that would cost a program (per_sm programs plus their reservations no longer fit)
    # is not applied.
    assert resident_shared(1024, 16, sm, block) == 1024
