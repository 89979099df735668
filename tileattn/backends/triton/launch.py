"""Kernel launches that bind Triton's arguments once per launch signature.

``kernel[grid](*args, **kwargs)`` (``JITFunction.run``) specializes every argument, builds a
string cache key, assembles launch metadata for its hook chains, and its C launcher looks up
every tensor pointer with a driver call: tens of microseconds of host time per launch, enough
to leave the GPU idle in a short training step. ``fast(kernel)[grid](*args, **kwargs)`` launches
the same compiled kernel with less work once it has seen the call's *signature*:

- the type of every positional argument;
- each tensor's dtype and its pointer's offset from 16-byte alignment;
- the exact value of every other positional argument, except ``do_not_specialize`` ints that
  are not an autotuner key: only their width (i32, i64 or u64), so a new dropout seed or
  sequence length per call still hits;
- the keyword arguments (constexprs and options) and the current device.

That refines what Triton specializes on (dtypes, pointer alignment, int values equal to 1 or
divisible by 16, int widths, constexpr values, options), so a known signature runs the kernel
Triton would have picked. A signature's first call goes through ``kernel[grid]`` (compiling or
autotuning as needed), which returns the compiled kernel; it is kept with the call's
meta-parameters, and later calls hand the tensors' pointers as ints straight to its launcher.

Rules for callers: tensors (or None) and scalars positionally, constexprs and options
(``num_warps``, ``num_stages``) by keyword, every parameter after the positional ones a
constexpr. Active launch hooks (``triton.knobs.runtime.launch_enter_hook``, e.g. proton) and
the interpreter take ``kernel[grid]`` every time. Triton's global knobs (debug,
instrumentation) are assumed not to change while the process runs.

Threads: a signature's first call (compile, autotune, reading the tuner's ``best_config``) runs
under the kernel's lock, so concurrent first calls cannot store another call's meta-parameters;
known signatures launch without locking (dict reads are atomic).

Example::

    fast(_combine_kernel)[(rows,)](part_o, part_lse, None, out, lse, *strides, Sn, Hq,
                                   NUM_SPLITS=4, HEAD_DIM_V=128, ..., num_warps=4)
"""

import functools
import operator
import threading

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# signatures kept per kernel; past this the cache starts over (e.g. varlen calls whose
# autotuned length buckets keep changing)
MAX_SIGNATURES = 256
_I32, _I64 = 1 << 31, 1 << 63
_DTYPE = operator.attrgetter("dtype")
_LOW_BITS = (15).__and__  # pointer -> its offset from 16-byte alignment


def int_width(value) -> int:
    """Triton's width class of a non-specialized int: 0 i32, 1 i64, 2 u64 (0 for other types)."""
    if type(value) is not int or -_I32 <= value < _I32:
        return 0
    return 1 if -_I64 <= value < _I64 else 2


def _getter(positions):
    """``args -> tuple(args[i] for i in positions)`` at C speed."""
    if len(positions) == 1:
        return lambda args, i=positions[0]: (args[i],)
    return operator.itemgetter(*positions) if positions else lambda args: ()


class _Layout:
    """Where the tensors, the exactly keyed scalars and the width-keyed ints sit in one call's
    positional arguments. One per tuple of argument types, so it stands for them in signatures."""

    def __init__(self, kinds, width_names, arg_names):
        widths = {arg_names.index(name) for name in width_names}
        # the parameters after the positional ones are constexprs: the launcher skips their values
        self.constexpr_slots = (None,) * (len(arg_names) - len(kinds))
        self.tensor_pos = tuple(i for i, kind in enumerate(kinds) if issubclass(kind, torch.Tensor))
        self.tensors = _getter(self.tensor_pos)
        self.widths = _getter(tuple(i for i in range(len(kinds)) if i in widths and i not in self.tensor_pos))
        self.exact = _getter(tuple(i for i in range(len(kinds)) if i not in self.tensor_pos and i not in widths))


def _widths(values):
    """Key of width-keyed ints: 0 when all are i32 (the usual case, checked at C speed), else
    each one's :func:`int_width`."""
    try:
        if not values or (-_I32 <= min(values) and max(values) < _I32):
            return 0
    except TypeError:  # None or another non-int
        pass
    return tuple(map(int_width, values))


class FastKernel:
    """``kernel[grid](*args, **kwargs)`` with the compiled kernel cached per signature.

    kernel: a ``@triton.jit`` function, or a ``tileattn.plan.TunedKernel`` over one (``tuned``)
    whose autotuner keys are keyed exactly, so each tuning choice is its own signature.
    ``fn`` is the ``@triton.jit`` function either way.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.tuned = not isinstance(kernel, JITFunction)
        self.fn = kernel.fn if self.tuned else kernel
        self.arg_names = self.fn.arg_names
        self.constexprs = frozenset(i for i, p in enumerate(self.fn.params) if p.is_constexpr)
        tune_keys = set(kernel.tuner.keys) if self.tuned else set()
        self.width_names = tuple(p.name for p in self.fn.params if p.do_not_specialize and p.name not in tune_keys)
        self._layouts = {}
        self._compiled = {}  # signature -> (compiled kernel, meta-parameters for the grid)
        self._lock = threading.Lock()  # first calls of a signature (see the module docstring)

    def __getitem__(self, grid):
        return functools.partial(self.run, grid)

    def _layout(self, kinds):
        layout = self._layouts.get(kinds)
        if layout is None:
            missing = [name for i, name in enumerate(self.arg_names) if i >= len(kinds) and i not in self.constexprs]
            if missing:
                raise TypeError(f"tileattn: {missing[0]} must be passed positionally (only constexprs by keyword)")
            # setdefault: a layout stands for its kinds in signatures, so threads must share one
            layout = self._layouts.setdefault(kinds, _Layout(kinds, self.width_names, self.arg_names))
        return layout

    def signature(self, args, kwargs, device):
        """(signature key, tensor pointers as ints, layout) of a call."""
        kinds = tuple(map(type, args))
        layout = self._layout(kinds)
        tensors = layout.tensors(args)
        ptrs = list(map(torch.Tensor.data_ptr, tensors))
        key = (layout, device, tuple(map(_DTYPE, tensors)), tuple(map(_LOW_BITS, ptrs)), layout.exact(args),
               _widths(layout.widths(args)), tuple(kwargs.items()))
        return key, ptrs, layout

    def run(self, grid, *args, **kwargs):
        if _hooks_active():
            return self.kernel[grid](*args, **kwargs)
        device = _current_device()
        key, ptrs, layout = self.signature(args, kwargs, device)
        entry = self._compiled.get(key)
        if entry is None:
            with self._lock:
                entry = self._compiled.get(key)  # another thread's first call may have won
                if entry is None:
                    compiled = self.kernel[grid](*args, **kwargs)
                    meta = dict(kwargs, **self.kernel.best_config.kwargs) if self.tuned else dict(kwargs)
                    if len(self._compiled) >= MAX_SIGNATURES:
                        self._compiled.clear()
                    self._compiled[key] = (compiled, meta)
                    return compiled
        compiled, meta = entry
        grid = grid(meta) if callable(grid) else grid
        launch_args = list(args)
        for i, ptr in zip(layout.tensor_pos, ptrs):
            launch_args[i] = ptr
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     _current_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *launch_args, *layout.constexpr_slots)
        return compiled


def _current_device() -> int:
    """Triton's current device index, as ``JITFunction.run`` reads it (tests stub these two)."""
    return driver.active.get_current_device()


def _current_stream(device: int):
    """The raw handle of ``device``'s current torch stream, as ``JITFunction.run`` reads it."""
    return driver.active.get_current_stream(device)


def _hooks_active() -> bool:
    """Launch hooks installed (their metadata needs ``kernel[grid]``'s bound arguments)?
    The hooks are HookChains (empty ``calls`` when idle) or, set by a user, None or a callable."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(leave, "calls", leave))


_FAST = {}


def fast(kernel):
    """The :class:`FastKernel` of ``kernel`` (one per kernel); an interpreted kernel as is."""
    launcher = _FAST.get(kernel)
    if launcher is None:
        is_jit = isinstance(kernel, JITFunction) or isinstance(getattr(kernel, "fn", None), JITFunction)
        launcher = _FAST.setdefault(kernel, FastKernel(kernel) if is_jit else kernel)  # one per kernel, any thread
    return launcher
