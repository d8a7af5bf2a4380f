"""Description of the machine and software a result was measured on."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Dict, Optional

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(cmd) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None


def gpu_info() -> Dict[str, Optional[str]]:
    if not torch.cuda.is_available():
        return {"gpu": None, "driver": None, "cuda_runtime": torch.version.cuda}
    p = torch.cuda.get_device_properties(0)
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return {
        "gpu": p.name,
        "gpu_memory_gib": round(p.total_memory / 2 ** 30, 1),
        "compute_capability": f"{p.major}.{p.minor}",
        "driver": driver.splitlines()[0] if driver else None,
        "cuda_runtime": torch.version.cuda,
        "gpu_count": torch.cuda.device_count(),
    }


def machine_info() -> Dict:
    import grl_kernels

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "grl_kernels": grl_kernels.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    info.update(gpu_info())
    return info


def nvidia_smi() -> Optional[str]:
    return _run(["nvidia-smi"])
