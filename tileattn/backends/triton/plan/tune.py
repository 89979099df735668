"""Autotuning, small and explained: a pass's config list, pruned, timed once per tuning key.

:func:`kernel_for` gives a launcher the kernel to launch for a pass's configs: the kernel
itself with one config's meta-parameters, or a cached :class:`TunedKernel` over a
``triton.autotune`` Autotuner whose prune (from ``configs.TUNING``) drops configs that cannot
fit in shared memory or would compute only padding.
"""

import threading
from itertools import repeat

import triton
from triton.runtime import KernelInterface

from .configs import TUNING, Config

_TUNED = {}
_TUNED_LOCK = threading.Lock()


def _max_shared_mem(device_index) -> int:
    """Shared memory one program may use on this CUDA device (bytes)."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


class TunedKernel(KernelInterface):
    """A ``triton.autotune`` Autotuner's choice, launched without its per-call overhead.

    Called like the Autotuner (``kernel[grid](*args, **kwargs)``). The first call per tuning key
    runs the Autotuner itself, which prunes, times the configs and launches the fastest; later
    calls launch ``fn`` with that config's meta-parameters directly (``fn.run``, as the
    Autotuner does), skipping its per-call argument dicts and key building.

    The tuning key refines the Autotuner's (the values of ``tune_sq`` and ``tune_sk`` plus the
    dtype of every tensor argument), see :meth:`_key`; tensors must be passed positionally, as
    our launchers do. ``best_config`` is the config of the latest launch, as on the Autotuner.
    """

    def __init__(self, fn, tuner):
        self.fn = fn
        self.tuner = tuner
        self.best_config = None
        self._key_args = [(fn.arg_names.index(name), name) for name in tuner.keys]
        self._chosen = {}  # tuning key -> (triton.Config, its launch kwargs)

    def _key(self, args, kwargs):
        """Key values, then each positional argument's dtype or None: a key at least as fine as
        the Autotuner's (so a call never reuses a choice made for another Autotuner key)."""
        values = [args[i] if i < len(args) else kwargs[name] for i, name in self._key_args]
        return (*values, *map(getattr, args, repeat("dtype"), repeat(None)))

    def run(self, *args, grid, warmup, **kwargs):
        key = self._key(args, kwargs)
        chosen = self._chosen.get(key)
        if chosen is None:
            ret = self.tuner.run(*args, grid=grid, warmup=warmup, **kwargs)
            config = self.tuner.best_config
            self._chosen[key] = (config, config.all_kwargs())
            self.best_config = config
            return ret
        self.best_config, meta = chosen
        return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **meta)


def autotuner(kernel, key, configs, smem_bytes, tile_rows, tune_len):
    """``triton.autotune`` of ``kernel`` over ``configs`` (as a :class:`TunedKernel`), cached under ``key``.

    configs: :class:`~.configs.Config` objects; the prune callbacks see each candidate as one.
    The tuning key is the kernel's ``tune_sq``/``tune_sk`` (power-of-two buckets). Before
    timing, configs are pruned (at least one kept, the smallest tile):

    - ``smem_bytes(config, block_d, block_dv, elt_size)`` above the device's per-block shared
      memory fails to launch;
    - ``tile_rows(config)`` (the rows one program holds) above the bucketed length
      ``tune_len`` ("tune_sq" or "tune_sk") computes only padding.
    """
    tuned = _TUNED.get(key)
    if tuned is not None:
        return tuned

    def prune(candidates, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        limit = _max_shared_mem(q.device.index)

        def fits(tc):
            c = Config(tc.kwargs["BLOCK_M"], tc.kwargs["BLOCK_N"], tc.num_warps, tc.num_stages)
            return (smem_bytes(c, args["BLOCK_D"], args["BLOCK_DV"], q.element_size()) <= limit
                    and tile_rows(c) <= max(args[tune_len], 64))
        return [tc for tc in candidates if fits(tc)] or [
            min(candidates, key=lambda tc: tc.kwargs["BLOCK_M"] * tc.kwargs["BLOCK_N"])]

    cfgs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in configs]
    with _TUNED_LOCK:  # several threads may plan at once: one TunedKernel per key
        tuned = _TUNED.get(key)
        if tuned is None:
            tuner = triton.autotune(cfgs, key=["tune_sq", "tune_sk"],
                                    prune_configs_by={"early_config_prune": prune})(kernel)
            tuned = _TUNED[key] = TunedKernel(kernel, tuner)
    return tuned


def kernel_for(kernel, which, configs, autotune, key):
    """(kernel to launch, direct-launch meta-parameters) of pass ``which`` ("forward", "dq",
    "dkdv"): when ``autotune``, an autotuner over ``configs`` cached under (which, configs,
    ``key``: the kernel variant's constexprs), else ``kernel`` with the first config's
    meta-parameters."""
    if not autotune:
        return kernel, configs[0].meta()
    return autotuner(kernel, (which, configs, key), configs, *TUNING[which]), {}
