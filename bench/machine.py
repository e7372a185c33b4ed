"""The machine a benchmark ran on, recorded with its results: cores, CPU model, Python, torch threads."""

from __future__ import annotations

import os
import platform


def machine(torch_threads: bool = True) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}
    if torch_threads:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    return info
