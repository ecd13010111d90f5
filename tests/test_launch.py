"""The launch shim's residency cap: the dynamic shared memory that keeps a persistent grid at
its programs per SM (arithmetic here; the driver's occupancy of real launches in test_gpu.py)."""

import pytest
import torch

from leanattn import _launch
from leanattn._launch import RESERVED_SHARED, resident_shared

H200 = (233472, 232448)  # shared memory of an SM, the most one program may take (bytes)


@pytest.mark.parametrize("per_sm", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("shared", [0, 16 * 1024, 38 * 1024, 70 * 1024, 71680, 77000, 77824, 77825, 100 * 1024,
                                    166 * 1024, 227 * 1024])
def test_resident_shared_caps_programs_per_sm(shared, per_sm):
    sm, block = H200
    got = resident_shared(shared, per_sm, sm, block)
    assert shared <= got <= max(shared, block)
    fit = sm // (got + RESERVED_SHARED)  # programs an SM holds, by shared memory
    if (per_sm + 1) * shared > sm:
        assert got == shared  # no more than per_sm fit already: nothing to add
    else:
        assert fit == per_sm  # exactly per_sm, and none is lost to the reservations
        assert (per_sm + 1) * got > sm  # one more does not fit even without them


def test_resident_shared_known_values():
    sm, block = H200
    # The 3-stage d <= 128 kernel (70 KiB): two an SM, not three.
    assert resident_shared(71680, 2, sm, block) == sm // 3 + 1 == 77825
    # The 6-stage one (over a third of an SM) is already alone.
    assert resident_shared(166 * 1024, 1, sm, block) == 166 * 1024
    # A cap that would cost a program (per_sm programs plus their reservations no longer fit)
    # is not applied.
    assert resident_shared(1024, 16, sm, block) == 1024


class _Launcher:
    """Records what Triton's launcher is called with (its C entry point and its __call__)."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self):
        self.calls = []

    def launch(self, *args):
        self.calls.append(args)

    def __call__(self, *args):
        self.calls.append(args)


@pytest.mark.parametrize("c_launch", [True, False])  # triton 3.6's launcher, and later ones'
def test_run_direct_launches_with_the_hits_metadata(monkeypatch, c_launch):
    """A direct launch passes the hit's packed metadata (its padded shared memory), not the
    compiled kernel's own, with the grid, the arguments and the constexpr values."""

    class Compiled:
        run = _Launcher()
        function = 1234
        packed_metadata = (4, 1, 71680)

        def launch_metadata(self, *args):
            return None

    monkeypatch.setattr(_launch, "current_stream_handle", lambda device: 7)
    monkeypatch.setattr(_launch, "_C_LAUNCH", c_launch)
    compiled = Compiled()
    _launch.run_direct((compiled, (3,), (4, 1, 77825), ()), 5, torch.device("cpu"), ("a", "b"))
    (args,) = compiled.run.calls
    assert args[:4] == (5, 1, 1, 7) and args[-3:] == ("a", "b", 3)
    assert (4, 1, 77825) in args and (4, 1, 71680) not in args


@pytest.mark.parametrize("c_launch", [True, False])
def test_run_direct_passes_tensors_as_addresses(monkeypatch, c_launch):
    """The hit's tensor positions go to Triton's launcher as the tensors' addresses (ints), so it
    neither calls ``data_ptr()`` nor asks the driver about each; the launch hooks' metadata still
    sees the tensors, and the other arguments pass unchanged."""
    seen = []

    class Compiled:
        run = _Launcher()
        function = 1234

        def launch_metadata(self, grid, stream, *args):
            seen.append(args)
            return "meta"

    monkeypatch.setattr(_launch, "current_stream_handle", lambda device: 7)
    monkeypatch.setattr(_launch, "_C_LAUNCH", c_launch)
    monkeypatch.setattr(_launch.knobs.runtime, "launch_enter_hook", lambda *a: None)
    x, y = torch.zeros(3), torch.ones(5)
    compiled = Compiled()
    _launch.run_direct((compiled, (3,), (4, 1, 0), (0, 2)), 5, torch.device("cpu"), (x, 9, y, 2.5))
    (args,) = compiled.run.calls
    assert args[-5:] == (x.data_ptr(), 9, y.data_ptr(), 2.5, 3)
    assert seen[0][0] is x and seen[0][2] is y  # the hook's metadata got the tensors


def test_shared_limit_is_only_raised(monkeypatch):
    """One compiled kernel serves every programs-per-SM cap: a launch packed for two an SM (76 KiB)
    must still run after one packed for three (57 KiB) asked for less, so the driver's limit is
    raised to the largest size asked for and never lowered."""
    import ctypes

    asked = []

    class Driver:
        def cuFuncSetAttribute(self, function, attribute, size):
            asked.append((function.value, attribute, size.value))
            return 0

    class Compiled:
        function = 0xF00D

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver())
    monkeypatch.setattr(_launch, "_RAISED_SHARED", {})
    assert _launch._raise_shared_limit(Compiled, 77825)
    assert _launch._raise_shared_limit(Compiled, 58369)  # within the raised limit: no call
    assert _launch._raise_shared_limit(Compiled, 77825)
    assert _launch._raise_shared_limit(Compiled, 90000)
    assert asked == [(0xF00D, 8, 77825), (0xF00D, 8, 90000)]


def test_shared_limit_refused(monkeypatch):
    """A limit the driver refuses is reported, and not recorded as raised."""
    import ctypes

    class Driver:
        def cuFuncSetAttribute(self, function, attribute, size):
            return 1  # CUDA_ERROR_INVALID_VALUE

    class Compiled:
        function = 0xBEEF

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver())
    monkeypatch.setattr(_launch, "_RAISED_SHARED", {})
    assert not _launch._raise_shared_limit(Compiled, 77825)
    assert _launch._RAISED_SHARED == {}
