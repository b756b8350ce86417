"""Peak memory of the work between ``reset_peak`` and ``peak_mb``: the CUDA allocator's peak on a GPU; on a (Linux)
CPU the process' resident high-water mark, VmHWM, which writing 5 to /proc/self/clear_refs resets to the current
resident size (``ru_maxrss`` cannot be reset, so it would still hold the imports and the model's loading)."""

from pathlib import Path

import torch


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB
