"""Backbone weights: local files (timm safetensors, DINO checkpoints), the hub with fast offline
detection, their sha256, and why a file does not fit a model."""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import logging
import os
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Optional

import torch

from .errors import BackboneError

logger = logging.getLogger(__name__)

# Prefixes wrapped around backbone keys by DINO's training code (DDP, MultiCropWrapper, torch.compile).
_WRAPPER_PREFIXES = ("module.", "backbone.", "_orig_mod.")
# Sub-dicts of a training checkpoint that hold a model, in the order tried. DINO's
# full checkpoints keep both networks; its evaluation code uses the teacher.
_CHECKPOINT_KEYS = ("teacher", "student", "state_dict", "model")
# ViT names by token width, to suggest a backbone for a weights file of another architecture.
_WIDTH_NAMES = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large", 1280: "vit_huge"}
# Seconds to wait for a TCP connection to the weights hub before treating the machine as offline.
HUB_PROBE_TIMEOUT = 2.0


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file, read in 4 MiB chunks; remembered per (path, size, mtime), so checking a
    store's settings before loading and recording them after hash the file once."""
    st = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 (hex) over a model's tensors in key order (for weights that have no file)."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode("utf-8"))
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- offline detection

def hub_address() -> tuple[str, int]:
    """``(host, port)`` a download would connect to first: the HTTPS proxy if one is set, else the hub."""
    from huggingface_hub import constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlsplit(proxy or constants.ENDPOINT)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to :func:`hub_address` opens within ``timeout`` s (name lookup included)."""
    host, port = hub_address()
    result = {"ok": False}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, name="funad-hub-probe", daemon=True)  # a stuck DNS lookup
    thread.start()                                                                 # ignores socket timeouts
    thread.join(timeout)
    return result["ok"]


@contextlib.contextmanager
def offline_if_hub_unreachable():
    """Run a download in huggingface_hub's offline mode when the hub cannot be reached.

    Offline mode still loads weights already in the local cache, and fails at once otherwise
    instead of retrying for about a minute. HF_HUB_OFFLINE=1 in the environment skips the probe.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    logger.info("cannot reach %s:%d within %.0f s; looking for the weights in the local cache only",
                *hub_address(), HUB_PROBE_TIMEOUT)
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _vit_shape(tensors: dict) -> Optional[tuple[int, int, int]]:
    """``(blocks, width, patch size)`` of a ViT state dict (or a model's), or None if it is not one."""
    proj = tensors.get("patch_embed.proj.weight")
    if proj is None or len(proj.shape) != 4:
        return None
    depth = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
    return depth, int(proj.shape[0]), int(proj.shape[-1])


def _describe(shape: Optional[tuple[int, int, int]]) -> str:
    if shape is None:
        return "no ViT (no patch_embed.proj.weight)"
    depth, width, patch = shape
    return f"a ViT with {depth} blocks of width {width} and {patch}-pixel patches"


def mismatch_message(path: Path, name: str, skeleton: torch.nn.Module, cause: BaseException) -> str:
    """Which file does not fit which model, and why, in one sentence (not timm's size-mismatch dump)."""
    file_shape = _vit_shape(normalize_state_dict(_read_checkpoint(path), str(path)))
    model_shape = _vit_shape(dict(skeleton.state_dict()))
    if file_shape is not None and file_shape != model_shape:
        depth, width, patch = file_shape
        family = _WIDTH_NAMES.get(width, "vit")
        return (f"weights file {path} does not fit {name}: the file holds {_describe(file_shape)}, {name} is "
                f"{_describe(model_shape)}. Pass the --backbone the file was trained for (a timm name like "
                f"{family}_patch{patch}_*, with {depth} blocks)")
    return (f"weights file {path} does not fit {name} (strict loading failed): {_short(str(cause))}. "
            f"Check that --backbone names the architecture the file was trained for")


def _short(message: str, limit: int = 800) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit] + " ..."


# --------------------------------------------------------------------------- weights files


def _read_checkpoint(path: Path) -> dict:
    """The tensors of a local checkpoint (safetensors or a torch pickle), without running any code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise BackboneError(f"weights file {path} is not a readable safetensors file ({exc})") from exc
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO checkpoints store their args
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # files in torch's legacy (pre-1.6) format cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"weights file {path} cannot be read as a PyTorch checkpoint ({exc}); "
                            f"use a .safetensors or .pth file of the model's weights") from exc


def normalize_state_dict(checkpoint: dict, source: str) -> dict[str, torch.Tensor]:
    """Unwrap a training checkpoint into plain backbone keys as timm names them.

    Handles the official DINO release files: the backbone-only
    ``dino_vitbase8_pretrain.pth`` (already timm's names) and full training
    checkpoints (``{"teacher": {"module.backbone.blocks.0...": ...}, "student": ...}``;
    the teacher is used, as DINO's own evaluation does). Wrapper prefixes
    (``module.``, ``backbone.``) are stripped and head weights (``head.*``:
    DINO's projection head or a classifier, not used for features) are dropped.
    """
    sd = checkpoint
    for key in _CHECKPOINT_KEYS:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            logger.info("weights %s: using the %r entry of the checkpoint", source, key)
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise BackboneError(f"weights file {source} does not hold a state dict (found {type(sd).__name__})")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise BackboneError(f"weights file {source}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                                f"pass a checkpoint that holds the model's weights")
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        if key.startswith("head.") or key == "head":
            continue
        out[key] = value
    if not out:
        raise BackboneError(f"weights file {source} has no backbone weights")
    return out


def weights_overlay(path: Path) -> dict:
    """timm ``pretrained_cfg_overlay`` for a local file: ``file=`` if timm can read it as is, else ``state_dict=``.

    ``num_classes=0`` in the overlay keeps timm's loading strict (a missing or
    unexpected key is an error, not a log line).
    """
    sd = _read_checkpoint(path)
    clean = normalize_state_dict(sd, str(path))
    if clean.keys() == sd.keys():
        return dict(file=str(path), num_classes=0)
    logger.info("weights %s: converted %d keys to timm's names", path, len(clean))
    return dict(state_dict=clean, num_classes=0)
