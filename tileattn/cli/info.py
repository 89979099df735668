"""Versions, the device and its capability, and which fast paths apply here (and why not)."""

import importlib
import os
import platform

import torch

HELP = "versions, device, which fast paths apply here"


def add_arguments(p):
    pass


def _version(name) -> str:
    try:
        return importlib.import_module(name).__version__
    except ImportError:
        return "not installed"


def _paths(triton_ok: bool) -> list:
    """[(fast path, applies?, why)] on this machine."""
    cuda = torch.cuda.is_available()
    major = torch.cuda.get_device_capability()[0] if cuda else 0
    knobs = ", ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("TILEATTN_")) or "none set"
    rows = [("Triton kernels", cuda and triton_ok,
             "CUDA tensors run them" if cuda and triton_ok else
             "Triton is not installed" if not triton_ok else
             "no CUDA device: CPU tensors run the tiled CPU backend (backend='triton' only under TRITON_INTERPRET=1)")]
    if cuda and triton_ok:
        from ..backends.triton.plan import configs as C
        rows += [("Hopper (sm_90) config tables", major >= 9,
                  "sm_90 lists (HGMMA, no spills)" if major >= 9 else f"sm_{major}x: the generic CUDA lists"),
                 ("TMA tile loads", major >= 9,
                  f"16-bit dtypes, 16-byte aligned rows; forward at head-dim block {C.FWD_TMA_MIN_HEAD_BLOCK}, "
                  f"backward from {C.BWD_TMA_MIN_SEQLEN} keys or rows" if major >= 9 else "need sm_90"),
                 ("autotuning", os.environ.get("TILEATTN_AUTOTUNE") != "0",
                  "once per Sq/Sk power-of-two bucket" if os.environ.get("TILEATTN_AUTOTUNE") != "0"
                  else "TILEATTN_AUTOTUNE=0: first config only"),
                 ("bf16", torch.cuda.is_bf16_supported(), "supported by the device"
                  if torch.cuda.is_bf16_supported() else "not supported by this device"),
                 ("CUDA-graph decode", True, "attention_with_kvcache does no host sync: capture decode steps")]
    else:
        rows.append(("bf16 / fp16 on CPU", True, "computed in fp32 by the CPU backend, cast back"))
    rows.append(("environment knobs", True, knobs))
    try:
        import matplotlib  # noqa: F401
        rows.append(("bench plots", True, "matplotlib installed"))
    except ImportError:
        rows.append(("bench plots", False, "matplotlib missing: pip install 'tileattn[plot]'"))
    return rows


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    import tileattn
    triton_version = _version("triton")
    console = Console()
    console.print(f"tileattn {tileattn.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
                  f"triton {triton_version}, python {platform.python_version()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        console.print(f"device: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                      f"{p.total_memory / 2**30:.0f} GiB")
    else:
        console.print(f"device: CPU only ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})")
    table = Table(title="fast paths")
    for col in ("path", "applies", "why"):
        table.add_column(col)
    for name, on, why in _paths(triton_version != "not installed"):
        table.add_row(name, "yes" if on else "no", why)
    console.print(table)
    return 0
