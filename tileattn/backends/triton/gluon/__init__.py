"""Gluon kernels for Hopper (sm_90): the FA3-design forward (``forward_sm90.py``, launched by
``launch.py``). Gluon has no interpreter and changed its API after triton 3.6, so nothing here
is imported until :func:`available` says this triton has the 3.6 Gluon Hopper API; CPU runs
and the interpreter never import it.
"""

import functools


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when ``triton.experimental.gluon`` with the Hopper wgmma/TMA API imports."""
    try:
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except (ImportError, AttributeError):
        return False
    return True


def forward(q, k, v, out, lse, scale: float, causal: bool):
    """Launch the sm_90 forward (see ``launch.forward``); the caller checked the plan's rule."""
    from .launch import forward as _forward
    return _forward(q, k, v, out, lse, scale, causal)
