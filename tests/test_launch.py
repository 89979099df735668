"""The launch fast path (``tileattn.backends.triton.launch``) without a GPU.

A real ``JITFunction`` supplies the parameter facts; its ``kernel[grid]`` launch is replaced by a
stand-in that records calls and returns a fake compiled kernel, whose ``run`` records what the
fast path hands to Triton's C launcher. The GPU suite runs every kernel through the real thing.
"""

import threading
import time

import pytest
import torch
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction

from tileattn.backends.triton import plan
from tileattn.backends.triton.plan import configs as tables, tune
from tileattn.backends.triton import launch


def _kernel(X, Y, n, scale, seed, tune, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    pass


def _tuned_kernel(Q, seed, tune_sq, tune_sk, BLOCK: tl.constexpr):
    pass


class FakeCompiled:
    function, packed_metadata = "function", "packed metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class SlowLaunch:
    """Stands in for ``kernel[grid](*args, **kwargs)``: records calls, returns a new FakeCompiled."""

    def __init__(self, best_config=None):
        self.calls, self.compiled, self.best_config = [], [], best_config

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]
        return run


@pytest.fixture
def fake_device(monkeypatch):
    """Device 3 with stream handle 1003; returns a setter for the current device."""
    current = [3]
    monkeypatch.setattr(launch, "_current_device", lambda: current[0])
    monkeypatch.setattr(launch, "_current_stream", lambda index: 1000 + index)
    return lambda index: current.__setitem__(0, index)


def _fast(kernel=None, slow=None):
    fast = launch.FastKernel(kernel or JITFunction(_kernel, do_not_specialize=["seed", "tune"]))
    fast.kernel = slow or SlowLaunch()
    return fast


X = torch.zeros(8, dtype=torch.float16)
Y = torch.zeros(8)
BASE = ((X, Y, 5, 0.5, 7, 64), dict(BLOCK=4, FLAG=True, num_warps=4))


def _grid(meta):
    return (meta["BLOCK"] * 2, 3)


def test_known_signature_launches_compiled_kernel(fake_device):
    fast = _fast()
    args, kwargs = BASE
    assert fast[_grid](*args, **kwargs) is fast.kernel.compiled[0]
    assert fast.kernel.calls == [(_grid, args, kwargs)]
    other_x = torch.ones(16, dtype=torch.float16)
    fast[_grid](other_x, Y, 5, 0.5, 2**31 - 1, 9, **kwargs)  # new tensor, seed and tune: same signature
    assert len(fast.kernel.calls) == 1
    assert fast.kernel.compiled[0].launches == [
        (8, 3, 1, 1003, "function", "packed metadata", None, None, None,
         other_x.data_ptr(), Y.data_ptr(), 5, 0.5, 2**31 - 1, 9, None, None)]


def _variants():
    """Calls whose signature differs from BASE: each must take the slow path once, then hit."""
    (x, y, n, scale, seed, tune), kwargs = BASE
    misaligned = torch.zeros(9, dtype=torch.float16)[1:]
    return {
        "int value": ((x, y, 16, scale, seed, tune), kwargs),
        "int one": ((x, y, 1, scale, seed, tune), kwargs),
        "float value": ((x, y, n, 0.25, seed, tune), kwargs),
        "int for float": ((x, y, n, 1, seed, tune), kwargs),
        "bool for int": ((x, y, True, scale, seed, tune), kwargs),
        "i64 seed": ((x, y, n, scale, 2**31, tune), kwargs),
        "u64 seed": ((x, y, n, scale, 2**63, tune), kwargs),
        "misaligned tensor": ((misaligned, y, n, scale, seed, tune), kwargs),
        "dtype": ((x, y.bfloat16(), n, scale, seed, tune), kwargs),
        "None tensor": ((x, None, n, scale, seed, tune), kwargs),
        "constexpr": ((x, y, n, scale, seed, tune), dict(kwargs, FLAG=False)),
        "option": ((x, y, n, scale, seed, tune), dict(kwargs, num_warps=8)),
        "keyword order": ((x, y, n, scale, seed, tune), dict(FLAG=True, BLOCK=4, num_warps=4)),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_new_signature_takes_slow_path(fake_device, name):
    fast = _fast()
    fast[_grid](*BASE[0], **BASE[1])
    args, kwargs = _variants()[name]
    fast[_grid](*args, **kwargs)
    assert len(fast.kernel.calls) == 2
    fast[_grid](*args, **kwargs)
    fast[_grid](*BASE[0], **BASE[1])
    assert len(fast.kernel.calls) == 2
    assert [len(c.launches) for c in fast.kernel.compiled] == [1, 1]


def test_device_is_part_of_signature(fake_device):
    fast = _fast()
    fast[_grid](*BASE[0], **BASE[1])
    fake_device(4)
    fast[_grid](*BASE[0], **BASE[1])
    fast[_grid](*BASE[0], **BASE[1])
    assert len(fast.kernel.calls) == 2 and fast.kernel.compiled[1].launches[0][3] == 1004


def test_launch_hooks_take_slow_path(fake_device, monkeypatch):
    chain = type(knobs.runtime.launch_enter_hook)()
    chain.add(lambda metadata: None)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", chain)
    fast = _fast()
    for _ in range(3):
        fast[_grid](*BASE[0], **BASE[1])
    assert len(fast.kernel.calls) == 3


def test_runtime_argument_by_keyword_is_refused(fake_device):
    fast = _fast()
    with pytest.raises(TypeError, match="tileattn: tune must be passed positionally"):
        fast[_grid](X, Y, 5, 0.5, 7, tune=3, BLOCK=4, FLAG=True)
    assert fast.kernel.calls == []


def test_cache_starts_over_past_its_limit(fake_device, monkeypatch):
    monkeypatch.setattr(launch, "MAX_SIGNATURES", 3)
    fast = _fast()
    for n in range(4):
        fast[(1,)](X, Y, n, 0.5, 7, 64, BLOCK=4, FLAG=True)
    assert len(fast._compiled) == 1
    fast[(1,)](X, Y, 3, 0.5, 7, 64, BLOCK=4, FLAG=True)
    assert len(fast.kernel.calls) == 4


def test_tuned_kernel_keys_tuning_values_exactly(fake_device, monkeypatch):
    """Over a TunedKernel, the autotuner's keys (do_not_specialize ints) are exact signature
    values, and the grid gets the tuned config's meta-parameters."""
    monkeypatch.setattr(tune, "_TUNED", {})
    jit = JITFunction(_tuned_kernel, do_not_specialize=["seed", "tune_sq", "tune_sk"])
    tuned = plan.autotuner(jit, ("launch test",), [plan.Config(4, 4, 4, 1)], tables.forward_smem,
                           lambda c: c.block_m, "tune_sq")
    best = type("Config", (), {"kwargs": {"BLOCK": 16}})()
    fast = _fast(tuned, SlowLaunch(best_config=best))
    grid = lambda meta: (meta["BLOCK"] * 2,)  # noqa: E731
    for seed, tune_sq in ((1, 64), (2, 64), (3, 128), (4, 64)):
        fast[grid](X, seed, tune_sq, 256)
    assert [call[1][2] for call in fast.kernel.calls] == [64, 128]
    assert [launch[:3] for launch in fast.kernel.compiled[0].launches] == [(32, 1, 1)] * 2


def test_interpreted_kernels_launch_as_is():
    interpreted = object()
    assert launch.fast(interpreted) is interpreted
    jit = JITFunction(_kernel)
    assert isinstance(launch.fast(jit), launch.FastKernel) and launch.fast(jit) is launch.fast(jit)


@pytest.mark.parametrize("value, width", [(0, 0), (-2**31, 0), (2**31 - 1, 0), (2**31, 1), (-2**31 - 1, 1),
                                          (2**63 - 1, 1), (2**63, 2), (0.5, 0), (None, 0)])
def test_int_width(value, width):
    assert launch.int_width(value) == width


class RacyTuner(SlowLaunch):
    """A tuned kernel whose slow call sets ``best_config`` from its tune_sq argument, then
    yields the GIL, as the autotuner's shared state does: a thread that read ``best_config``
    after another thread's call would store that call's meta-parameters."""

    def __init__(self):
        super().__init__()
        self.fn = JITFunction(_tuned_kernel, do_not_specialize=["seed", "tune_sq", "tune_sk"])
        self.tuner = type("Tuner", (), {"keys": ["tune_sq", "tune_sk"]})()

    def __getitem__(self, grid):
        slow = super().__getitem__(grid)

        def run(*args, **kwargs):
            self.best_config = type("Config", (), {"kwargs": {"BLOCK": args[2] // 4}})()
            time.sleep(0.01)
            return slow(*args, **kwargs)
        return run


def test_threads_launch_the_serial_answers(fake_device):
    """Threads calling new and known signatures at once: each signature is compiled once, and
    every launch gets its own signature's meta-parameters (grid) and pointers, as serial calls."""
    fast = launch.FastKernel(RacyTuner())
    tunes = [16 * (i + 1) for i in range(8)]
    xs = [torch.zeros(8, dtype=torch.float16) for _ in tunes]
    grid = lambda meta: (meta["BLOCK"] * 2,)  # noqa: E731
    start = threading.Barrier(len(tunes))

    def worker(i):
        start.wait()
        for seed in range(3):
            fast[grid](xs[i], seed, tunes[i], 256)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(tunes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(call[1][2] for call in fast.kernel.calls) == tunes  # one slow call per signature
    for call, compiled in zip(fast.kernel.calls, fast.kernel.compiled):
        i = tunes.index(call[1][2])
        assert [launch[:3] for launch in compiled.launches] == [(tunes[i] // 2, 1, 1)] * 2
        assert [launch[9] for launch in compiled.launches] == [xs[i].data_ptr()] * 2
        assert [launch[10] for launch in compiled.launches] == [1, 2]  # the hit calls' seeds


def test_fast_is_one_launcher_per_kernel_across_threads():
    jit = JITFunction(_kernel)
    got = []
    start = threading.Barrier(8)

    def worker():
        start.wait()
        got.append(launch.fast(jit))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(x) for x in got}) == 1 and got[0] is launch.fast(jit)
