"""Tooling around the recipe, run as modules from the repository root (`python -m tools.plan --trace`, `python -m
tools.bench --roofline`): the memory plan and its fake-tensor trace, speed measurements, the computed roofline.
The recipe never imports this package."""
import os
import platform
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: tiny_configs/, tests/


def machine() -> dict:
    """Date, CPU model, cores, GPU (None without one), Python and torch versions."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return dict(date=time.strftime("%Y-%m-%d %H:%M %Z"), cpu=cpu, cores=os.cpu_count(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                python=platform.python_version(), torch=torch.__version__)
