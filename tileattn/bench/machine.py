"""Machine and software description stored as the header of every results file."""

import datetime
import os
import platform
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, if any


def _run(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def info() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    d = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
         "git": commit + ("+dirty" if dirty else ""), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
         "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()[0],  # CPU numbers need ~0
         "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                 l2_mib=getattr(p, "L2_cache_size", 0) / 2**20, capability=f"{p.major}.{p.minor}",
                 cudnn=torch.backends.cudnn.version(),
                 nvidia_smi=_run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,"
                                  "clocks.mem,temperature.gpu,power.draw,power.limit", "--format=csv,noheader"]))
    return d
