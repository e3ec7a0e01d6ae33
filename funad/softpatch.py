"""SoftPatch (Jiang et al., NeurIPS 2022): PatchCore with patch-level denoising and soft outlier weights.

Built from the paper, checked against the authors' public code where the
paper leaves a detail open. On the cache's features:

1. **Outlier scores, per patch position.** Training features are projected
   as for the coreset (:func:`funad.coreset.project`, 128 dimensions). At
   each patch position j, the N training images' patches at j form one set,
   and every patch gets an outlier score within its set:

   - ``"lof"`` (default, as in the paper's main results and the authors'
     code): the Local Outlier Factor with ``lof_k`` neighbours (default 6,
     the authors' stated default), the ratio of the neighbours' local
     reachability density to the patch's own (about 1 for inliers);
   - ``"gaussian"``: 1 + the Mahalanobis distance to a Gaussian fitted to the
     set (covariance + ``GAUSSIAN_EPS`` * I).

2. **Denoising.** The ``noise_ratio`` share (default 0.15, the authors'
   ``threshold``) of all training patches with the highest scores is
   dropped; ties are broken by the lower patch index.
3. **Coreset.** The approximate greedy coreset (:mod:`funad.coreset`) keeps
   ``coreset_ratio`` of the remaining patches.
4. **Soft scoring.** Each bank feature keeps its outlier score w as a weight.
   A test patch's score is w(m) * ||f - m||, m its nearest bank feature; the
   image score is the largest patch score (the authors' code; PatchCore's
   image reweighting is not used).

A patch that looks like many others at its position (a normal one) keeps a
weight near 1; contamination that survives the drop sits in sparse regions,
gets a large weight and so raises, instead of masking, the score of test
patches that match it.
"""

from __future__ import annotations

import logging
from typing import Union

import torch

from .coreset import PROJECTION_DIM, approximate_greedy_coreset, coreset_size, project
from .data import FeaturesLike, as_source
from .errors import ConfigError, DataError
from .knn import DEFAULT_CORESET_RATIO, KNNScorer, _checked_bank, gather_bank, keep_two_images

logger = logging.getLogger(__name__)

WEIGHTINGS = ("lof", "gaussian")
DEFAULT_NOISE_RATIO = 0.15
DEFAULT_LOF_K = 6
# Ridge added to each position's covariance (as PaDiM and SoftPatch's Gaussian).
GAUSSIAN_EPS = 0.01
# Patch positions scored at once (bounds the (positions, N, N) distance tensor).
_POSITIONS_PER_CHUNK = 64


def lof_scores(x: torch.Tensor, k: int) -> torch.Tensor:
    """Local Outlier Factor of every point within its own set.

    Args:
        x: (n_sets, n, d) points; each set is scored on its own.
        k: neighbours, 1 <= k < n. A point is not its own neighbour.

    Returns:
        (n_sets, n) LOF values (about 1 for inliers, larger for outliers),
        defined as in scikit-learn's ``LocalOutlierFactor`` (reachability
        distance max(k-distance(o), d(p, o)); lrd = 1 / (mean + 1e-10)).
    """
    n_sets, n, _ = x.shape
    if not 1 <= k < n:
        raise DataError(f"LOF with k={k} neighbours needs more than k points per set, got {n}")
    out = torch.empty(n_sets, n, dtype=torch.float32, device=x.device)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    for start in range(0, n_sets, _POSITIONS_PER_CHUNK):
        xc = x[start:start + _POSITIONS_PER_CHUNK].float()
        sq = (xc * xc).sum(dim=2)
        dist = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2.0 * xc @ xc.transpose(1, 2)).clamp_(min=0.0).sqrt_()
        dist.masked_fill_(eye, float("inf"))
        knn_dist, knn_idx = torch.topk(dist, k, dim=2, largest=False, sorted=True)  # (s, n, k)
        k_distance = knn_dist[..., -1]  # (s, n)
        reach = torch.maximum(knn_dist, torch.gather(k_distance.unsqueeze(1).expand(-1, n, -1), 2, knn_idx))
        lrd = 1.0 / (reach.mean(dim=2) + 1e-10)
        neighbour_lrd = torch.gather(lrd.unsqueeze(1).expand(-1, n, -1), 2, knn_idx)
        out[start:start + xc.shape[0]] = neighbour_lrd.mean(dim=2) / lrd
    return out


def gaussian_scores(x: torch.Tensor, eps: float = GAUSSIAN_EPS) -> torch.Tensor:
    """1 + the Mahalanobis distance of every point to a Gaussian fitted to its own set.

    Args:
        x: (n_sets, n, d), n >= 2.

    Returns:
        (n_sets, n) float32 scores >= 1.
    """
    n_sets, n, d = x.shape
    if n < 2:
        raise DataError(f"a Gaussian needs at least 2 points per set, got {n}")
    out = torch.empty(n_sets, n, dtype=torch.float32, device=x.device)
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    for start in range(0, n_sets, _POSITIONS_PER_CHUNK):
        xc = x[start:start + _POSITIONS_PER_CHUNK].double()
        centred = xc - xc.mean(dim=1, keepdim=True)
        cov = centred.transpose(1, 2) @ centred / (n - 1) + eps * eye
        chol = torch.linalg.cholesky(cov)
        z = torch.linalg.solve_triangular(chol, centred.transpose(1, 2), upper=False)  # (s, d, n)
        out[start:start + xc.shape[0]] = (1.0 + z.pow(2).sum(dim=1).sqrt()).float()
    return out


class SoftPatchScorer(KNNScorer):
    """SoftPatch on cached features (module docstring).

    Args:
        noise_ratio: share [0, 1) of the training patches dropped as noise.
        weighting: "lof" or "gaussian", the per-position outlier score.
        lof_k: LOF neighbours (clipped to n_images - 1 with a warning).
        coreset_ratio: share (0, 1] of the denoised patches kept by the coreset.
        seed: seeds the projection and the coreset's start.
        backend, device: as for :class:`funad.knn.KNNScorer`.

    Attributes (after ``fit``):
        bank_: (n_bank, dim) float32; weights_: (n_bank,) float32 outlier
        scores of the bank features; outlier_scores_: (n_images, n_patches)
        scores of every training patch (fit only); dropped_: (n_images,
        n_patches) bool, True for the patches dropped as noise (fit only).
    """

    def __init__(self, noise_ratio: float = DEFAULT_NOISE_RATIO, weighting: str = "lof",
                 lof_k: int = DEFAULT_LOF_K, coreset_ratio: float = DEFAULT_CORESET_RATIO, seed: int = 0,
                 backend: str = "auto", device: Union[str, torch.device, None] = None) -> None:
        super().__init__(coreset_ratio=coreset_ratio, seed=seed, backend=backend, device=device,
                         reweight_neighbours=1)
        self.noise_ratio = noise_ratio
        self.weighting = weighting
        self.lof_k = lof_k

    def check_params(self) -> None:
        super().check_params()
        r = self.noise_ratio
        if not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise ConfigError(f"noise_ratio must lie in [0, 1) (the share of training patches dropped as noise; "
                              f"1 would drop every patch), got {r!r}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {self.weighting!r}; choose one of {WEIGHTINGS}")
        if not (isinstance(self.lof_k, int) and self.lof_k >= 1):
            raise ConfigError(f"lof_k must be an integer >= 1, got {self.lof_k!r}")

    def outlier_scores(self, projected: torch.Tensor) -> torch.Tensor:
        """Per-position outlier scores of projected training patches (n_images, n_patches, d) -> same (n, P)."""
        n = projected.shape[0]
        by_position = projected.transpose(0, 1)  # (P, n, d)
        if self.weighting == "gaussian":
            return gaussian_scores(by_position).transpose(0, 1)
        k = self.lof_k
        if k >= n:
            if n < 2:
                raise DataError(f"SoftPatch's LOF needs at least 2 training images, got {n}")
            logger.warning("lof_k=%d needs more than %d training images; using k=%d", k, n, n - 1)
            k = n - 1
        return lof_scores(by_position, k).transpose(0, 1)

    def fit(self, features: FeaturesLike) -> "SoftPatchScorer":
        """Score, denoise and thin the training patches; keep the weights (module docstring)."""
        self.check_params()
        source = as_source(features)
        bank = gather_bank(source, self.device)
        n_images, n_patches = int(source.n_images), int(source.n_patches)
        n_all = int(bank.shape[0])
        n_drop = int(round(self.noise_ratio * n_all))
        if n_drop >= n_all:
            raise DataError(f"noise_ratio={self.noise_ratio:g} would drop all {n_all} training patches; "
                            "lower --set noise_ratio=... or train on more images")
        projected = project(bank, PROJECTION_DIM, self.seed)
        scores = self.outlier_scores(projected.reshape(n_images, n_patches, -1)).reshape(-1)
        order = torch.argsort(scores, descending=True, stable=True)
        dropped = torch.zeros(n_all, dtype=torch.bool, device=bank.device)
        dropped[order[:n_drop].to(bank.device)] = True
        kept = torch.nonzero(~dropped).squeeze(1)
        n_core = coreset_size(int(kept.numel()), self.coreset_ratio)
        if n_core < kept.numel():
            core = approximate_greedy_coreset(bank.index_select(0, kept), n_core, seed=self.seed,
                                              projected=projected.index_select(0, kept.to(projected.device)))
            kept = keep_two_images(bank, kept.index_select(0, core.to(kept.device)), kept, n_patches)
        logger.info("SoftPatch bank: %d of %d training patches (%d dropped as noise, %s weights)",
                    kept.numel(), n_all, n_drop, self.weighting)
        self._set_bank(bank.index_select(0, kept))
        self.weights_ = scores.to(kept.device).index_select(0, kept).clamp(min=0.0).float().to(self.bank_.device)
        self.outlier_scores_ = scores.reshape(n_images, n_patches).cpu()
        self.dropped_ = dropped.reshape(n_images, n_patches).cpu()
        self.n_train_patches_ = n_all
        self.bank_owner_ = kept.cpu() // n_patches
        return self

    def _score_chunk(self, x: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted patch scores w(m) * ||f - m|| and their maximum per image."""
        weighted = dist * self.weights_.to(dist.device)[idx.to(dist.device)]
        return weighted, weighted.amax(dim=1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"bank": (n_bank, dim), "weights": (n_bank,)}`` float32 CPU tensors."""
        self._check_fitted()
        return {"bank": self.bank_.detach().cpu().contiguous(), "weights": self.weights_.detach().cpu().contiguous()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "SoftPatchScorer":
        """Restore the bank and weights saved by :meth:`state_dict`."""
        self.check_params()
        if set(state) != {"bank", "weights"}:
            raise DataError(f"a SoftPatch state holds the tensors 'bank' and 'weights', got keys {sorted(state)}; "
                            "is this another method's model?")
        bank, weights = _checked_bank(state["bank"], self.device), state["weights"]
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (bank.shape[0],):
            raise DataError(f"SoftPatch weights must have shape ({bank.shape[0]},), one per bank feature, "
                            f"got {tuple(getattr(weights, 'shape', ()))}")
        self._set_bank(bank)
        self.weights_ = weights.float().to(self.bank_.device)
        return self
