"""Choosing the torch device for a stage (one place for every pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from funad.ops import cpu_field

from .errors import PipelineError

# CPU flags (Linux /proc/cpuinfo) of native bf16 matrix arithmetic. Without one, autocast to bf16
# emulates it and ran the backbone about 7x slower than fp32 on this project's AVX2 CPUs
# (benchmarks/results/fit.md); with one it ran 1.3-1.6x faster (benchmarks/results/extract.md).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"--device {device} was asked for but torch sees no CUDA device; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise PipelineError(f"unknown device {device!r}; use auto, cpu or cuda") from exc


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU lists AVX512-BF16 or AMX-BF16 (False where /proc/cpuinfo is absent)."""
    flags = set(cpu_field("flags", str(cpuinfo)).split())
    return any(f in flags for f in BF16_CPU_FLAGS)


def auto_precision(device: torch.device, recorded: Optional[str] = None) -> str:
    """The backbone's autocast precision for ``--precision auto``.

    ``recorded`` (the precision an existing store was extracted with) wins, so
    a resumed store stays consistent. Otherwise: bf16 on a CUDA device that
    supports it (else fp16); on the CPU bf16 only with native bf16 arithmetic
    (:data:`BF16_CPU_FLAGS`), else fp32.
    """
    if recorded:
        return recorded
    if has_native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def has_native_bf16(device: torch.device) -> bool:
    """Whether ``device`` does bf16 arithmetic natively: a CUDA device that supports it, or a CPU with
    :data:`BF16_CPU_FLAGS`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()
