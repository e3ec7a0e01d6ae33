"""The baseline: PatchCore-style nearest-neighbour scoring on the same features.

The memory bank holds the patch features of every training image, optionally
thinned by PatchCore's approximate greedy coreset (Roth et al., CVPR 2022,
``ApproximateGreedyCoresetSampler``). A patch's score is the Euclidean
distance to its nearest bank feature; an image's score is the maximum over
its patches. Higher = more anomalous, as for :class:`funad.model.FunAD`.

It trusts its training set: anomalies that were moved into training (the
contamination protocol) sit in the bank and mask their look-alikes in the
test set, which is why such one-class methods collapse in the overlap setting.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Union

import numpy as np
import torch

from .data import FeatureSource, as_source
from .errors import ConfigError, DataError, NotFittedError
from .nn import BACKENDS, NNIndex

logger = logging.getLogger(__name__)

# Images read from a feature source at once.
_CHUNK_IMAGES = 64

FeaturesLike = Union[FeatureSource, torch.Tensor, np.ndarray]


def _iter_chunks(source: FeatureSource, chunk: int = _CHUNK_IMAGES):
    """Yield float32 (n, P, D) tensors covering every image of ``source`` in order."""
    n = int(source.n_images)
    for start in range(0, n, chunk):
        x = source.get(np.arange(start, min(start + chunk, n)))
        if x.ndim != 3:
            raise DataError(f"the feature source returned shape {tuple(x.shape)}, expected (n, n_patches, dim)")
        yield x.float()


def greedy_coreset(features: torch.Tensor, n_select: int, seed: int = 0,
                   projection_dim: Optional[int] = 128) -> torch.Tensor:
    """PatchCore's approximate greedy coreset (k-center greedy on a random projection).

    Features are projected to ``projection_dim`` dimensions with a seeded
    Gaussian matrix (skipped when ``None`` or when D is already smaller).
    Starting from one random point, the point farthest from the selected set
    is added until ``n_select`` points are chosen. (PatchCore starts from
    the mean distance to 10 random points that it does not keep; one kept
    starting point is the plain k-center greedy.)

    Cost: one pass over the projected bank per selected point,
    O(n_select * M * projection_dim), memory-bound and sequential. On a GPU
    this takes seconds; on this project's shared 2-core CPU a 10% coreset of
    a bottle-sized bank (180k patches) takes on the order of 15 minutes
    (``benchmarks/bench_eval.py``), so leave ``coreset_ratio`` off there.

    Args:
        features: (M, D) float tensor; the work happens on its device.
        n_select: points to keep, 1 <= n_select <= M.
        seed: seeds the projection and the first point.
        projection_dim: dimension of the random projection.

    Returns:
        int64 (n_select,) indices into ``features``, in selection order.
    """
    m, d = features.shape
    if not 1 <= n_select <= m:
        raise DataError(f"cannot select {n_select} coreset points from {m} features")
    gen = torch.Generator().manual_seed(int(seed))
    x = features.float()
    if projection_dim is not None and projection_dim < d:
        proj = torch.randn(d, projection_dim, generator=gen) / math.sqrt(projection_dim)
        x = x @ proj.to(x.device)
    sqnorm = (x * x).sum(dim=1)
    selected = torch.empty(n_select, dtype=torch.int64, device=x.device)
    current = int(torch.randint(m, (1,), generator=gen))
    min_sqdist = torch.full((m,), float("inf"), device=x.device)
    for i in range(n_select):
        selected[i] = current
        # ||x - c||² = ||x||² - 2 x·c + ||c||², one matrix-vector product per step.
        sqdist = torch.addmv(sqnorm + sqnorm[current], x, x[current], alpha=-2.0)
        torch.minimum(min_sqdist, sqdist, out=min_sqdist)
        current = int(torch.argmax(min_sqdist))
    return selected


class KNNScorer:
    """Nearest-neighbour anomaly scorer (PatchCore without its feature aggregation).

    Args:
        coreset_ratio: keep this fraction (0, 1] of the bank with the greedy
            coreset; ``None`` keeps every training patch.
        seed: seeds the coreset's projection and starting point.
        backend: nearest-neighbour back-end, "auto", "torch" or "faiss"
            (:class:`funad.nn.NNIndex`).
        device: where the bank and the searches live; default: the device of
            the training features.

    Attributes (after ``fit``):
        bank_: (n_bank, dim) float32 memory bank.
        dim_: feature dimension D.
        index_: the :class:`funad.nn.NNIndex` over the bank.
    """

    def __init__(self, coreset_ratio: Optional[float] = None, seed: int = 0, backend: str = "auto",
                 device: Union[str, torch.device, None] = None) -> None:
        self.coreset_ratio = coreset_ratio
        self.seed = seed
        self.backend = backend
        self.device = device

    def _check_params(self) -> None:
        r = self.coreset_ratio
        if r is not None and not 0.0 < r <= 1.0:
            raise ConfigError(f"coreset_ratio must lie in (0, 1] or be None (keep all patches), got {r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown nearest-neighbour backend {self.backend!r}; choose one of {BACKENDS}")

    # ------------------------------------------------------------------ fitting

    def fit(self, features: FeaturesLike) -> "KNNScorer":
        """Build the memory bank from training features.

        Args:
            features: (n_images, n_patches, dim) tensor or array, or a
                FeatureSource (``n_images``, ``get(indices)``); every image is
                used for training.

        Returns:
            self.
        """
        self._check_params()
        source = as_source(features)
        if source.n_images == 0:
            raise DataError("no training images: the feature source is empty")
        parts = []
        for x in _iter_chunks(source):
            if self.device is not None:
                x = x.to(self.device)
            parts.append(x.reshape(-1, x.shape[-1]))
        bank = torch.cat(parts)
        del parts
        n_all = int(bank.shape[0])
        if self.coreset_ratio is not None and self.coreset_ratio < 1.0:
            n_keep = max(1, int(round(self.coreset_ratio * n_all)))
            keep = greedy_coreset(bank, n_keep, seed=self.seed)
            bank = bank[keep].contiguous()
        logger.info("kNN memory bank: %d of %d training patches (D=%d)", bank.shape[0], n_all, bank.shape[1])
        self._set_bank(bank)
        return self

    def _set_bank(self, bank: torch.Tensor) -> None:
        self.bank_ = bank.float().contiguous()
        self.dim_ = int(bank.shape[1])
        self.index_ = NNIndex(backend=self.backend, device=self.device).fit(self.bank_)

    def _check_fitted(self) -> None:
        if not hasattr(self, "bank_"):
            raise NotFittedError("this KNNScorer is not fitted yet; call fit(features) or load_state_dict() first")

    # ------------------------------------------------------------------ scoring

    def score_patches(self, features: FeaturesLike) -> np.ndarray:
        """Distance of every patch to its nearest bank feature.

        Args:
            features: (n_images, n_patches, dim) tensor or array, or a FeatureSource.

        Returns:
            float32 (n_images, n_patches); higher = more anomalous.
        """
        self._check_fitted()
        source = as_source(features)
        out = []
        for x in _iter_chunks(source):
            if x.shape[-1] != self.dim_:
                raise DataError(f"the kNN bank was fitted on D={self.dim_} features, input has D={x.shape[-1]}; "
                                "score features from the same backbone and layer as the training cache")
            sqdist, _ = self.index_.search(x.reshape(-1, x.shape[-1]), 1)
            out.append(sqdist.sqrt().reshape(x.shape[0], x.shape[1]).cpu().numpy())
        if not out:
            return np.empty((0, source.n_patches), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def score_images(self, features: FeaturesLike) -> np.ndarray:
        """Image scores, the maximum patch score: float32 (n_images,)."""
        return self.score_patches(features).max(axis=1)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"bank": (n_bank, dim) float32 CPU tensor}``, ready for safetensors."""
        self._check_fitted()
        return {"bank": self.bank_.detach().cpu().contiguous()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "KNNScorer":
        """Restore the bank saved by :meth:`state_dict` (onto ``device`` when set)."""
        self._check_params()
        if set(state) != {"bank"}:
            raise DataError(f"a kNN state holds exactly one tensor 'bank', got keys {sorted(state)}; "
                            "is this a FUN-AD model rather than a kNN one?")
        bank = state["bank"]
        if not isinstance(bank, torch.Tensor) or bank.ndim != 2 or bank.shape[0] == 0:
            shape = tuple(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
            raise DataError(f"the kNN bank must be a non-empty (n_bank, dim) tensor, got {shape}")
        if self.device is not None:
            bank = bank.to(self.device)
        self._set_bank(bank)
        return self
