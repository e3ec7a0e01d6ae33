"""Training features straight from the store: in memory, on the GPU, or streamed.

A fit sees its N training images through the ``funad.data.FeatureSource``
protocol (``n_images``, ``n_patches``, ``dim``, ``get(indices) -> (n, P, D)
float32`` on the source's ``device``). This module builds that source from a
store, choosing where the features live ("residency"):

``memory``
    The N training images are read once, chunk by chunk, into one float32
    tensor of shape (N, P, D): on the GPU when the fit runs on CUDA and the
    tensor fits in the GPU budget, else in host RAM. Needs ``N * P * D * 4``
    bytes (plus the store's chunk being decoded), e.g.

    - MVTec AD bottle, stand-in backbone (P = 784, D = 768), 209 train images
      + 10% contamination = 230 images: 230 * 784 * 768 * 4 B = 554 MB;
    - the same at DINO ViT-B/8 (D = 1536): 1.1 GB;
    - a 1000-image VisA category at P = 784, D = 1536: 4.8 GB.

    Every ``get`` is then an in-memory gather (no I/O), which the IRMB needs:
    it re-scores the whole training set at every bank rebuild.

``stream``
    Nothing is kept: every ``get`` reads its images from the store (one chunk
    per image, decompressed) and converts them to float32. Needs
    ``n * P * D * 4`` bytes for the ``n`` images of one request, but pays the
    read and decompression at every call, i.e. a full pass over the store at
    every bank rebuild. Use it when the features do not fit.

``auto``
    ``memory`` when ``N * P * D * 4`` bytes fit in the budget, else
    ``stream``. The budget is :data:`RAM_FRACTION` of the available host RAM
    (``MemAvailable`` on Linux), and for the GPU :data:`GPU_FRACTION` of the free device
    memory (``torch.cuda.mem_get_info``); the choice is logged with the byte
    counts.

:class:`StoreSource` streams; in-memory sources are ``funad.data.TensorSource``.
:func:`load_features` is also what ``funad sweep`` uses to read every image
once and slice cells out of it.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from funad.data import SubsetSource, source_device

from .errors import PipelineError
from .progress import NullProgress, Progress

logger = logging.getLogger(__name__)

RESIDENCIES = ("auto", "memory", "stream")
# What a fit trains on: "patch" = (P, 2C) per image, the class token beside each patch token (the paper's
# f = [c, p]); "class" = (1, C), the class token alone (the image-level variant, P = 1, f_i = c_i).
TOKENS = ("patch", "class")
# Share of the available host RAM / free GPU memory that in-memory features may take.
RAM_FRACTION = 0.5
GPU_FRACTION = 0.5
_BYTES_PER_VALUE = 4  # features are float32 once loaded


def feature_bytes(n_images: int, n_patches: int, dim: int) -> int:
    """Bytes of an (n_images, n_patches, dim) float32 tensor."""
    return int(n_images) * int(n_patches) * int(dim) * _BYTES_PER_VALUE


def available_ram(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of host RAM available now; 0 when unknown.

    Linux's ``MemAvailable`` counts the page cache the kernel can drop, which
    on a machine that has just read a feature store is most of the RAM; the
    free pages (``os.sysconf``, the fallback elsewhere) leave it out and
    understated the budget 3-4x here (5.2 of 20.8 GB).
    """
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def free_gpu_memory(device: torch.device) -> int:
    """Free bytes on CUDA ``device`` (``torch.cuda.mem_get_info``); 0 for other devices."""
    if device.type != "cuda":
        return 0
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _mb(n: int) -> str:
    """Bytes for a log line: "554 MB", "1.2 MB", "45 kB"."""
    if n >= 1e8:
        return f"{n / 1e6:,.0f} MB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.0f} kB"


def choose_residency(resident: str, n_bytes: int, device: torch.device,
                     ram: Optional[int] = None, gpu_free: Optional[int] = None) -> tuple[str, torch.device]:
    """Decide where N*P*D float32 features of ``n_bytes`` live.

    Returns ``(mode, feature_device)``: mode "memory" or "stream";
    feature_device is the device the loaded tensor sits on (``device`` for a
    CUDA fit whose features fit on the GPU, else the CPU). ``ram`` and
    ``gpu_free`` default to the measured values (injectable for tests).
    """
    if resident not in RESIDENCIES:
        raise PipelineError(f"--resident must be one of {list(RESIDENCIES)}, got {resident!r}")
    ram = available_ram() if ram is None else ram
    gpu_free = free_gpu_memory(device) if gpu_free is None else gpu_free
    ram_budget, gpu_budget = int(ram * RAM_FRACTION), int(gpu_free * GPU_FRACTION)
    if resident == "stream":
        logger.info("features streamed from the store (%s would be needed in memory)", _mb(n_bytes))
        return "stream", torch.device("cpu")
    if device.type == "cuda" and n_bytes <= gpu_budget:
        logger.info("features resident on %s: %s of a %s budget (%.0f%% of %s free)", device, _mb(n_bytes),
                    _mb(gpu_budget), GPU_FRACTION * 100, _mb(gpu_free))
        return "memory", device
    if resident == "memory" or n_bytes <= ram_budget or ram == 0:
        if n_bytes > ram_budget and ram:
            logger.warning("--resident memory: features need %s but only %s of RAM is available; "
                           "the fit may swap or fail, use --resident stream if it does", _mb(n_bytes), _mb(ram))
        logger.info("features resident in host RAM: %s of a %s budget (%.0f%% of %s available)", _mb(n_bytes),
                    _mb(ram_budget), RAM_FRACTION * 100, _mb(ram))
        return "memory", torch.device("cpu")
    logger.info("features streamed from the store: %s exceed the %s RAM budget (%.0f%% of %s available)",
                _mb(n_bytes), _mb(ram_budget), RAM_FRACTION * 100, _mb(ram))
    return "stream", torch.device("cpu")


def token_shape(store, tokens: str = "patch") -> tuple[int, int]:
    """(n_patches, dim) of one image's features of kind ``tokens``."""
    check_tokens(store, tokens)
    return (1, int(store.token_dim)) if tokens == "class" else (int(store.n_patches), int(store.feature_dim))


def check_tokens(store, tokens: str) -> None:
    """PipelineError unless ``tokens`` is known and the store holds them."""
    if tokens not in TOKENS:
        raise PipelineError(f"--tokens must be one of {list(TOKENS)}, got {tokens!r}")
    if tokens == "class" and not getattr(store, "has_class_tokens", True):
        raise PipelineError(f"--tokens class: cache {store.path} stores no class tokens (it was written by an "
                            "older funad); re-extract it with `funad extract`, or fit on --tokens patch")


def read_tokens(store, indices: np.ndarray, tokens: str = "patch") -> np.ndarray:
    """float32 features of store images ``indices``: (n, P, 2C) patch features or (n, 1, C) class tokens."""
    if tokens == "class":
        return np.asarray(store.read_class_tokens(np.asarray(indices, dtype=np.int64)), dtype=np.float32)[:, None]
    return store.read_features(np.asarray(indices, dtype=np.int64), dtype="float32")


def load_features(store, indices: np.ndarray, *, device: torch.device = torch.device("cpu"),
                  chunk: int = 64, progress: Progress = NullProgress(),
                  description: str = "loading features", tokens: str = "patch") -> torch.Tensor:
    """Read the features of ``indices`` into one float32 tensor.

    Args:
        store: an open ``funad.cache`` store.
        indices: (n,) image indices into the store.
        device: where the tensor goes; chunks are copied there as they are read.
        tokens: "patch" or "class" (:data:`TOKENS`).
    Returns:
        float32 (n, P, D) on ``device`` ((n, 1, C) for class tokens), rows in the order of ``indices``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    out = torch.empty((len(indices), *token_shape(store, tokens)), dtype=torch.float32, device=device)
    task = progress.task(description, total=len(indices), unit="img")
    pos = 0
    chunks = (store.iter_features(indices, chunk=chunk, dtype="float32") if tokens == "patch" else
              ((indices[i:i + chunk], read_tokens(store, indices[i:i + chunk], tokens))
               for i in range(0, len(indices), chunk)))
    for idx, feats in chunks:
        n = len(idx)
        out[pos:pos + n] = torch.from_numpy(feats).to(device)
        pos += n
        task.advance(n)
    if pos != len(indices):
        raise PipelineError(f"{store.path}: read {pos} of {len(indices)} images; the store is inconsistent, "
                            "re-run `funad extract`")
    return out


class StoreSource:
    """A FeatureSource that reads every request from the store (``--resident stream``).

    Image ``i`` of the source is store image ``indices[i]``. Each ``get``
    reads the requested images (the store reads runs of consecutive images at
    once), widened to float32, and moves them to ``device``.
    """

    def __init__(self, store, indices: np.ndarray, device: torch.device = torch.device("cpu"),
                 tokens: str = "patch") -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.device = torch.device(device)
        self.tokens = tokens
        self.n_images = len(self.indices)
        self.n_patches, self.dim = token_shape(store, tokens)

    def get(self, indices) -> torch.Tensor:
        """(n,) source indices -> float32 (n, P, D) on ``self.device``."""
        local = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        return torch.from_numpy(read_tokens(self.store, self.indices[local], self.tokens)).to(self.device)


class FirstImages(SubsetSource):
    """The FeatureSource of a source's first ``n`` images (the real ones, before FUN-AD*'s synthetic ones)."""

    def __init__(self, source, n: int) -> None:
        super().__init__(source, np.arange(int(n)))


class ProgressSource:
    """``source`` seen through a progress task: each ``get`` advances ``task`` by the images it returns.

    Scoring reads each image once, so the task counts images scored whatever
    the model does with them (``FunAD.score_held_out`` splits them in two).
    """

    def __init__(self, source, task) -> None:
        self.source, self.task = source, task
        self.n_images, self.n_patches, self.dim = source.n_images, source.n_patches, source.dim
        self.device = source_device(source)

    def get(self, indices) -> torch.Tensor:
        out = self.source.get(indices)
        self.task.advance(len(out))
        return out


def make_source(store, indices: np.ndarray, *, resident: str = "auto", device: torch.device = torch.device("cpu"),
                progress: Progress = NullProgress(), tokens: str = "patch"):
    """The FeatureSource over store images ``indices`` for a fit on ``device``.

    Returns a ``funad.data.TensorSource`` (memory) or a :class:`StoreSource`
    (stream); the choice follows :func:`choose_residency`.
    """
    from funad.data import TensorSource

    n_bytes = feature_bytes(len(indices), *token_shape(store, tokens))
    mode, where = choose_residency(resident, n_bytes, torch.device(device))
    if mode == "stream":
        return StoreSource(store, indices, device=torch.device("cpu"), tokens=tokens)
    return TensorSource(load_features(store, indices, device=where, progress=progress, tokens=tokens))


def patch_labels(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Max-pool pixel masks onto the patch grid.

    Args:
        masks: (n, H, W) uint8, nonzero = anomalous.
        grid: (grid_h, grid_w) of the store.
    Returns:
        uint8 (n, grid_h * grid_w), 1 where any pixel of the patch's cell is
        anomalous (adaptive max pooling, so H need not divide by grid_h).
    """
    grid_h, grid_w = (int(g) for g in grid)
    if len(masks) == 0:
        return np.zeros((0, grid_h * grid_w), dtype=np.uint8)
    x = torch.from_numpy((np.asarray(masks) > 0).astype(np.float32))[:, None]
    pooled = F.adaptive_max_pool2d(x, (grid_h, grid_w))
    return pooled.reshape(len(masks), grid_h * grid_w).to(torch.uint8).numpy()
