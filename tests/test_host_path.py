"""Host-side fast paths: cached forward plans, the autotuner's cached dispatch, integer helpers.

The CUDA-only pieces run here with stand-ins: a made-up sm_90 target for planning, and a fake
kernel (records its launches) under a real ``triton.autotune`` Autotuner whose timing is
stubbed, so the dispatch logic is checked without a GPU.
"""

import pytest
import torch
import triton
from triton.runtime import autotuner as triton_autotuner
from triton.runtime import KernelInterface

from tileattn.backends.triton import plan
from tileattn.backends.triton.plan import configs as tables, tune
from tileattn.score import ScoreSpec

SM90 = plan.Target("sm_90", "sm_90 (test)", 132)


def test_integer_helpers_match_triton():
    for n in [*range(1, 3000), 2**20 - 1, 2**20, 2**20 + 1, 2**31 + 5]:
        assert plan.next_pow2(n) == triton.next_power_of_2(n)
        assert plan.cdiv(n, 64) == triton.cdiv(n, 64) and plan.cdiv(n, 7) == triton.cdiv(n, 7)


@pytest.fixture
def no_knobs(monkeypatch):
    monkeypatch.delenv("TILEATTN_TMA", raising=False)
    monkeypatch.delenv("TILEATTN_AUTOTUNE", raising=False)


def _plan_cases():
    """(q, k, v, spec keywords, planner keywords) covering what a plan depends on: head dims,
    dtype, features, 16-byte alignment of pointers and strides, overrides."""
    def qkv(d, dv=None, dtype=torch.bfloat16, s=8):
        dv = dv or d
        return torch.zeros(1, s, 2, d, dtype=dtype), torch.zeros(1, s, 2, d, dtype=dtype), \
            torch.zeros(1, s, 2, dv, dtype=dtype)

    def shifted(elements):  # a (1, 8, 2, 256) bf16 tensor starting `elements` past an aligned pointer
        return torch.zeros(8 * 2 * 256 + elements, dtype=torch.bfloat16)[elements:].view(1, 8, 2, 256)

    q256, k256, v256 = qkv(256)
    big = torch.zeros(1, 8, 2, 264, dtype=torch.bfloat16)
    tiny = plan.Overrides(forward=(plan.Config(16, 16, 4, 1),), use_tma=True)
    return [
        (*qkv(64), {}, {}),
        (*qkv(128), {"window": (-1, 0)}, {}),
        (q256, k256, v256, {"window": (-1, 0)}, {}),
        (shifted(8), k256, v256, {}, {}),  # 16-byte pointer offset: aligned
        (q256, shifted(1), v256, {}, {}),  # misaligned pointer
        (big[..., :256], k256, v256, {}, {}),  # row stride 264 * 2 bytes: aligned
        (q256, k256, big[..., :250], {}, {}),  # aligned strides, Dv * 2 bytes not 16-byte aligned
        (torch.zeros(1, 8, 2, 260, dtype=torch.bfloat16)[..., :256], k256, v256, {}, {}),  # misaligned stride
        (*qkv(256, dtype=torch.float32), {}, {}),
        (*qkv(80, 48, dtype=torch.float16), {"softcap": 1.0, "sinks": torch.zeros(2)}, {}),
        (*qkv(128), {"attn_mask": torch.ones(1, 1, 8, 8, dtype=torch.bool)}, {}),
        (*qkv(128), {"attn_mask": torch.ones(1, 1, 8, 8), "alibi_slopes": torch.ones(1, 2), "dropout_p": 0.1}, {}),
        (*qkv(64), {"window": (3, 2)}, {"varlen": True}),
        (q256, k256, v256, {}, {"overrides": plan.Overrides(use_tma=False)}),
        (*qkv(64), {}, {"overrides": tiny}),
    ]


@pytest.mark.parametrize("env", [{}, {"TILEATTN_TMA": "0"}, {"TILEATTN_TMA": "1"}, {"TILEATTN_AUTOTUNE": "0"}])
def test_cached_plans_equal_fresh_ones(no_knobs, monkeypatch, env):
    """Every plan served from the cache (warm, interleaved calls, env changed at run time)
    equals the one planned from scratch, down to the describe() text."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cases = [(q, k, v, ScoreSpec.build(q.shape[-1], **kw), pkw) for q, k, v, kw, pkw in _plan_cases()]
    fresh = []
    for q, k, v, spec, pkw in cases:
        plan.cache_clear()
        fresh.append(plan.plan_forward(q, k, v, spec, target=SM90, **pkw))
    for _ in range(2):
        for (q, k, v, spec, pkw), want in zip(cases, fresh):
            got = plan.plan_forward(q, k, v, spec, target=SM90, **pkw)
            assert got == want and got.describe(spec) == want.describe(spec)


def test_cached_plans_follow_alignment_and_env(no_knobs, monkeypatch):
    q, k, v = (torch.zeros(1, 8, 2, 256, dtype=torch.bfloat16) for _ in range(3))
    spec = ScoreSpec(scale=1.0)

    def fplan(*t):
        return plan.plan_forward(*(t or (q, k, v)), spec, target=SM90)
    assert fplan().use_tma
    odd = torch.zeros(1 * 8 * 2 * 256 + 1, dtype=torch.bfloat16)[1:].view(1, 8, 2, 256)
    p = fplan(q, odd, v)
    assert not p.use_tma and "k pointer or strides (4096, 512, 256, 1) not 16-byte aligned" in p.loads_why
    assert fplan().use_tma
    monkeypatch.setenv("TILEATTN_TMA", "0")
    assert not fplan().use_tma
    monkeypatch.setenv("TILEATTN_TMA", "1")
    small = [t[..., :64] for t in (q, k, v)]
    assert fplan(*small).use_tma
    monkeypatch.delenv("TILEATTN_TMA")
    assert not fplan(*small).use_tma
    assert len(fplan().configs) > 1
    monkeypatch.setenv("TILEATTN_AUTOTUNE", "0")
    assert len(fplan().configs) == 1


class FakeKernel(KernelInterface):
    """Stands in for a JITFunction: records each launch's positional args, grid and kwargs."""

    arg_names = ["Q", "Out", "n", "tune_sq", "tune_sk", "BLOCK_D", "BLOCK_DV", "BLOCK_M", "BLOCK_N"]

    def __init__(self):
        self.fn = lambda: None  # the Autotuner looks for the Python function under .fn
        self.launches = []

    def run(self, *args, grid, warmup, **kwargs):
        self.launches.append((args, grid(kwargs) if callable(grid) else grid, kwargs))


@pytest.fixture
def timed(monkeypatch):
    """Stub the Autotuner's timing (a config's time: BLOCK_N, so the smallest key tile wins) and the
    device's shared memory; returns the list of timed configs."""
    timed = []

    def bench(self, *args, config, **meta):
        timed.append(config)
        return [float(config.kwargs["BLOCK_N"])] * 3

    monkeypatch.setattr(triton_autotuner.Autotuner, "_bench", bench)
    monkeypatch.setattr(tune, "_max_shared_mem", lambda index: 100 * 1024)
    monkeypatch.setattr(tune, "_TUNED", {})
    return timed


def test_tuned_kernel_dispatch(timed):
    """First call per tuning key: the Autotuner prunes, times and launches; later calls launch the
    remembered config directly with the same meta-parameters; a new key (tune value or dtype) tunes again."""
    kernel = FakeKernel()
    configs = [plan.Config(128, 64, 8, 3), plan.Config(64, 32, 4, 2), plan.Config(256, 256, 8, 4)]
    tuned = plan.autotuner(kernel, ("test", 1), configs, tables.forward_smem, lambda c: c.block_m, "tune_sq")
    assert plan.autotuner(kernel, ("test", 1), configs, tables.forward_smem, lambda c: c.block_m, "tune_sq") is tuned
    through_autotuner = []
    autotuner_run = tuned.tuner.run
    tuned.tuner.run = lambda *a, **k: through_autotuner.append(1) or autotuner_run(*a, **k)
    q = torch.zeros(4, dtype=torch.float16)
    grid = lambda meta: (triton.cdiv(1000, meta["BLOCK_M"]),)  # noqa: E731

    def launch(tune_sq, x=q):
        tuned[grid](x, x, 7, tune_sq, 1024, BLOCK_D=64, BLOCK_DV=64)
        return kernel.launches[-1]

    first = launch(1024)
    # pruned: 256x256 needs > 100 KB of shared memory; the two others timed, 64x32 (BLOCK_N 32) wins
    assert sorted(c.kwargs["BLOCK_M"] for c in timed) == [64, 128]
    assert first[2] == dict(BLOCK_D=64, BLOCK_DV=64, BLOCK_M=64, BLOCK_N=32, num_warps=4, num_ctas=1,
                            num_stages=2)
    assert first[1] == (16,) and first[0] == (q, q, 7, 1024, 1024)
    assert tuned.best_config.kwargs == {"BLOCK_M": 64, "BLOCK_N": 32}
    for _ in range(3):
        assert launch(1024) == first
    assert len(timed) == 2 and len(kernel.launches) == 4 and len(through_autotuner) == 1

    # tune_sq = 64: the 128-row config holds only padding and is pruned; 64x32 chosen again, but timed
    launch(64)
    assert len(timed) == 3 and kernel.launches[-1][2]["BLOCK_M"] == 64
    # another dtype is another Autotuner key: timed again
    launch(1024, torch.zeros(4, dtype=torch.bfloat16))
    assert len(timed) == 5
    launch(64)
    launch(1024, torch.zeros(4, dtype=torch.bfloat16))
    assert len(timed) == 5 and len(through_autotuner) == 3


def test_tuned_kernel_follows_autotuner_choice(timed, monkeypatch):
    """The remembered config is the one the Autotuner picked (here the largest fitting tile)."""
    monkeypatch.setattr(triton_autotuner.Autotuner, "_bench",
                        lambda self, *a, config, **k: [1.0 / config.kwargs["BLOCK_M"]] * 3)
    kernel = FakeKernel()
    configs = [plan.Config(64, 32, 4, 2), plan.Config(128, 64, 8, 3)]
    tuned = plan.autotuner(kernel, ("test", 2), configs, tables.forward_smem, lambda c: c.block_m, "tune_sq")
    q = torch.zeros(4, dtype=torch.float16)
    for _ in range(3):
        tuned[(5,)](q, q, 7, 1024, 1024, BLOCK_D=64, BLOCK_DV=64)
    assert [launch[2]["BLOCK_M"] for launch in kernel.launches] == [128, 128, 128]
    assert [launch[1] for launch in kernel.launches] == [(5,)] * 3
