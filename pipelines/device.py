"""Choosing the torch device for a stage (one place for every pipeline)."""

from __future__ import annotations

import torch

from .errors import PipelineError


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
