"""The PatchCore baseline: a coreset memory bank, nearest-neighbour patch scores, PatchCore's image score.

What is computed (Roth et al., "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022), on the cache's features without PatchCore's local
feature aggregation:

- **Bank.** Every training patch, thinned to ``coreset_ratio`` (default
  :data:`DEFAULT_CORESET_RATIO` = 0.1, PatchCore's usual 10%) with the
  approximate greedy coreset of :mod:`funad.coreset` (sparse random
  projection to 128 dimensions, then exact k-center greedy). ``coreset_ratio
  = 1`` keeps the full bank. ``max_bank`` caps the bank at that many
  patches (default: no cap), so that scoring costs the same however many
  images trained it. A coreset whose rows all come from one image takes one
  more row, of another image (:func:`keep_two_images`), so that every
  training image can be scored held out.
- **Patch score** (the anomaly map): s_j = ||f_j - m_j||, the Euclidean
  distance of test patch f_j to its nearest bank feature m_j.
- **Image score** (PatchCore Eq. 7): take the most anomalous patch
  j* = argmax_j s_j with s* = s_j* and its nearest bank feature m* = m_j*. Let
  N_b(m*) be the b bank features nearest to m* (m* itself included, b =
  ``reweight_neighbours``, default 9 as in anomalib's PatchCore; the paper
  does not fix b). The image score is

      s = (1 - exp(s*) / sum_{m in N_b(m*)} exp(||f_j* - m||)) * s*,

  computed as 1 - softmax for stability. The weight grows towards 1 when m*
  is an isolated bank feature (its neighbours lie far from the test patch),
  and is about 1 - 1/b inside a dense region. ``reweight_neighbours=1``
  turns the reweighting off (image score = max patch score).

Higher = more anomalous, as for :class:`funad.model.FunAD`. It trusts its
training set: anomalies moved into training (the contamination protocol) sit
in the bank and mask their look-alikes in the test set, which is why
one-class methods collapse in the overlap setting.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import numpy as np
import torch

from .coreset import approximate_greedy_coreset, coreset_size
from .data import FeatureSource, FeaturesLike, as_source
from .errors import ConfigError, DataError, NotFittedError
from .nn import BACKENDS, NNIndex

logger = logging.getLogger(__name__)

# Images read from a feature source at once.
_CHUNK_IMAGES = 64
# PatchCore's usual coreset: 10% of the training patches.
DEFAULT_CORESET_RATIO = 0.1
# b of PatchCore's image-score reweighting (anomalib's default).
DEFAULT_REWEIGHT_NEIGHBOURS = 9


def _iter_chunks(source: FeatureSource, chunk: int = _CHUNK_IMAGES):
    """Yield float32 (n, P, D) tensors covering every image of ``source`` in order."""
    n = int(source.n_images)
    for start in range(0, n, chunk):
        x = source.get(np.arange(start, min(start + chunk, n)))
        if x.ndim != 3:
            raise DataError(f"the feature source returned shape {tuple(x.shape)}, expected (n, n_patches, dim)")
        yield x.float()


def gather_bank(source: FeatureSource, device=None) -> torch.Tensor:
    """Every patch of ``source`` as one float32 (n_images * n_patches, dim) tensor (on ``device`` when given)."""
    if source.n_images == 0:
        raise DataError("no training images: the feature source is empty")
    parts = []
    for x in _iter_chunks(source):
        if device is not None:
            x = x.to(device)
        parts.append(x.reshape(-1, x.shape[-1]))
    return torch.cat(parts)


def keep_two_images(bank: torch.Tensor, kept: torch.Tensor, candidates: torch.Tensor, n_patches: int,
                    chunk: int = 65536) -> torch.Tensor:
    """``kept`` (bank rows, int64), plus the candidate row of another image farthest from them when every kept
    row comes from one image.

    A bank drawn from a single image cannot score that image held out (every one of its rows is its own), so
    ``score_held_out`` would have nothing to compare it with. A tiny coreset can do that (one image-level
    feature per image, or a few patches). The added row is the next k-center greedy pick among the other
    images' ``candidates``. Nothing changes when the rows already come from two images or more, or when no
    other image has a candidate row.
    """
    owners = kept // n_patches
    if kept.numel() == 0 or bool((owners != owners[0]).any()):
        return kept
    others = candidates[candidates // n_patches != owners[0]]
    if others.numel() == 0:
        return kept
    centres = bank.index_select(0, kept.to(bank.device))
    far = torch.cat([torch.cdist(bank.index_select(0, others[i:i + chunk].to(bank.device)), centres).amin(dim=1)
                     for i in range(0, others.numel(), chunk)])
    return torch.cat([kept, others[int(far.argmax())].view(1).to(kept.device)])


def image_score_weights(queries: torch.Tensor, nearest: torch.Tensor, bank: torch.Tensor, index: NNIndex,
                        b: int) -> torch.Tensor:
    """PatchCore's reweighting factor 1 - softmax for each image's most anomalous patch (module docstring).

    Args:
        queries: (n, D) the most anomalous patch of each image (f_j*).
        nearest: (n,) int64, the index of its nearest bank feature (m*).
        bank: (n_bank, D) the memory bank; ``index`` searches it.
        b: neighbourhood size, clipped to the bank size; 1 gives weight 1.

    Returns:
        (n,) float32 weights in [0, 1].
    """
    b = min(int(b), int(bank.shape[0]))
    if b <= 1:
        return torch.ones(queries.shape[0], dtype=torch.float32, device=queries.device)
    _, hood = index.search(bank.index_select(0, nearest.to(bank.device)), b)  # N_b(m*), m* first
    hood = hood.to(bank.device)
    members = bank.index_select(0, hood.reshape(-1)).reshape(hood.shape[0], b, -1).to(queries.device)
    dist = (members - queries.unsqueeze(1)).norm(dim=2)  # ||f_j* - m|| for m in N_b(m*)
    own = (bank.index_select(0, nearest.to(bank.device)).to(queries.device) - queries).norm(dim=1)  # s*
    return 1.0 - torch.exp(own - torch.logsumexp(dist, dim=1))


class KNNScorer:
    """PatchCore on cached features (module docstring): coreset bank, NN patch scores, reweighted image score.

    Args:
        coreset_ratio: keep this fraction (0, 1] of the training patches with
            the approximate greedy coreset; 1 keeps them all.
        seed: seeds the coreset's projection and starting points.
        backend: nearest-neighbour back-end, "auto", "torch" or "faiss"
            (:class:`funad.nn.NNIndex`).
        device: where the bank and the searches live; default: the device of
            the training features.
        reweight_neighbours: b of the image-score reweighting; 1 = plain max.
        max_bank: keep at most this many patches (the coreset picks them); None = no cap.

    Attributes (after ``fit``):
        bank_: (n_bank, dim) float32 memory bank.
        dim_: feature dimension D.
        index_: the :class:`funad.nn.NNIndex` over the bank.
        n_train_patches_: training patches the bank was chosen from (fit only).
    """

    def __init__(self, coreset_ratio: float = DEFAULT_CORESET_RATIO, seed: int = 0, backend: str = "auto",
                 device: Union[str, torch.device, None] = None,
                 reweight_neighbours: int = DEFAULT_REWEIGHT_NEIGHBOURS, max_bank: Optional[int] = None) -> None:
        self.coreset_ratio = coreset_ratio
        self.max_bank = max_bank
        self.seed = seed
        self.backend = backend
        self.device = device
        self.reweight_neighbours = reweight_neighbours

    def check_params(self) -> None:
        r = self.coreset_ratio
        if not (isinstance(r, (int, float)) and 0.0 < r <= 1.0):
            raise ConfigError(f"coreset_ratio must lie in (0, 1] (1 keeps every training patch), got {r!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown nearest-neighbour backend {self.backend!r}; choose one of {BACKENDS}")
        b = self.reweight_neighbours
        if not (isinstance(b, int) and b >= 1):
            raise ConfigError(f"reweight_neighbours must be an integer >= 1 (1 = no reweighting), got {b!r}")
        m = self.max_bank
        if not (m is None or (isinstance(m, int) and m >= 1)):
            raise ConfigError(f"max_bank must be an integer >= 1 or None (no cap), got {m!r}")

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
        self.check_params()
        source = as_source(features)
        bank = gather_bank(source, self.device)
        n_all = int(bank.shape[0])
        n_keep = coreset_size(n_all, self.coreset_ratio)
        if self.max_bank is not None:
            n_keep = min(n_keep, self.max_bank)
        kept = torch.arange(n_all)
        if n_keep < n_all:
            kept = keep_two_images(bank, approximate_greedy_coreset(bank, n_keep, seed=self.seed), kept,
                                   int(source.n_patches))
            bank = bank.index_select(0, kept).contiguous()
        logger.info("kNN memory bank: %d of %d training patches (D=%d)", bank.shape[0], n_all, bank.shape[1])
        self._set_bank(bank)
        self.n_train_patches_ = n_all
        self.bank_owner_ = kept.cpu() // int(source.n_patches)
        return self

    def _set_bank(self, bank: torch.Tensor) -> None:
        self.__dict__.pop("bank_owner_", None)  # set by fit only: a loaded bank's origin is unknown
        self.bank_ = bank.float().contiguous()
        self.dim_ = int(bank.shape[1])
        self.index_ = NNIndex(backend=self.backend, device=self.device).fit(self.bank_)

    def _check_fitted(self) -> None:
        if not hasattr(self, "bank_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; "
                                 "call fit(features) or load_state_dict() first")

    # ------------------------------------------------------------------ scoring

    def _nearest(self, features: FeaturesLike):
        """Yield ``(x (n, P, D), distance (n, P), bank index (n, P))`` chunk by chunk."""
        self._check_fitted()
        for x in _iter_chunks(as_source(features)):
            if x.shape[-1] != self.dim_:
                raise DataError(f"the bank was fitted on D={self.dim_} features, input has D={x.shape[-1]}; "
                                "score features from the same backbone and layer as the training cache")
            sqdist, idx = self.index_.search(x.reshape(-1, x.shape[-1]), 1)
            yield x, sqdist.sqrt().reshape(x.shape[:2]), idx.reshape(x.shape[:2])

    def _score_chunk(self, x: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch scores (n, P) and image scores (n,) of one chunk (module docstring)."""
        top = dist.argmax(dim=1)
        rows = torch.arange(x.shape[0], device=x.device)
        weight = image_score_weights(x[rows, top.to(x.device)], idx[rows, top], self.bank_, self.index_,
                                     self.reweight_neighbours)
        return dist, weight.to(dist.device) * dist[rows.to(dist.device), top]

    def score(self, features: FeaturesLike) -> tuple[np.ndarray, np.ndarray]:
        """Patch scores and image scores.

        Args:
            features: (n_images, n_patches, dim) tensor or array, or a FeatureSource.

        Returns:
            ``(patch_scores, image_scores)``: float32 (n_images, n_patches) and
            (n_images,); higher = more anomalous.
        """
        patches, images = [], []
        for x, dist, idx in self._nearest(features):
            p, i = self._score_chunk(x, dist, idx)
            patches.append(p.cpu().numpy())
            images.append(i.cpu().numpy())
        if not patches:
            return (np.empty((0, as_source(features).n_patches), dtype=np.float32), np.empty(0, dtype=np.float32))
        return (np.concatenate(patches).astype(np.float32, copy=False),
                np.concatenate(images).astype(np.float32, copy=False))

    def score_held_out(self, features: FeaturesLike,
                       images: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores of the training images (or of those numbered ``images``), each against the bank without its
        own patches.

        A training image's patches (those the coreset kept) are in the bank,
        so its plain score is about 0. Here image ``i`` of ``features`` (the
        training features, in the order given to :meth:`fit`) is scored
        against the bank rows that came from the other training images
        (leave-one-image-out; the bank is not rebuilt without it, and the
        image-score reweighting still looks at the whole bank). Exact
        (brute-force) search. Only available right after :meth:`fit`.

        Returns:
            ``(patch_scores (n, P), image_scores (n,))`` float32, as :meth:`score`, one row per image scored.
        """
        self._check_fitted()
        owner = getattr(self, "bank_owner_", None)
        if owner is None:
            raise NotFittedError("held-out training scores need the bank's image of origin, known only right "
                                 "after fit(); re-fit the model")
        bank = self.bank_
        owner = owner.to(bank.device)
        bank_sq = (bank * bank).sum(dim=1)
        rows_per_block = max(1, (1 << 24) // max(1, int(bank.shape[0])))
        source = as_source(features)
        ids = np.arange(source.n_images) if images is None else np.asarray(images, dtype=np.int64)
        patches, scores = [], []
        for start in range(0, len(ids), _CHUNK_IMAGES):
            chunk_ids = ids[start:start + _CHUNK_IMAGES]
            x = source.get(chunk_ids).float().to(bank.device)
            if x.shape[-1] != self.dim_:
                raise DataError(f"the bank was fitted on D={self.dim_} features, input has D={x.shape[-1]}")
            for q, image in zip(x, chunk_ids.tolist()):
                if bool((owner == image).all()):
                    raise DataError("leave-one-image-out scoring needs patches of at least two training images "
                                    "in the bank")
                sq, idx = [], []
                for r in range(0, q.shape[0], rows_per_block):
                    block = q[r:r + rows_per_block]
                    d2 = (block * block).sum(dim=1, keepdim=True) - 2.0 * block @ bank.T + bank_sq
                    d2[:, owner == image] = float("inf")
                    m, i = d2.min(dim=1)
                    sq.append(m)
                    idx.append(i)
                dist = torch.cat(sq).clamp_min(0.0).sqrt()[None]
                p, s = self._score_chunk(q[None], dist, torch.cat(idx)[None])
                patches.append(p.cpu().numpy())
                scores.append(s.cpu().numpy())
        if not patches:
            return (np.empty((0, source.n_patches), dtype=np.float32), np.empty(0, dtype=np.float32))
        return (np.concatenate(patches).astype(np.float32, copy=False),
                np.concatenate(scores).astype(np.float32, copy=False))

    def score_patches(self, features: FeaturesLike) -> np.ndarray:
        """Patch scores (the anomaly map before upsampling): float32 (n_images, n_patches)."""
        return self.score(features)[0]

    def score_images(self, features: FeaturesLike) -> np.ndarray:
        """Image scores: float32 (n_images,)."""
        return self.score(features)[1]

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"bank": (n_bank, dim) float32 CPU tensor}``, ready for safetensors."""
        self._check_fitted()
        return {"bank": self.bank_.detach().cpu().contiguous()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "KNNScorer":
        """Restore the bank saved by :meth:`state_dict` (onto ``device`` when set)."""
        self.check_params()
        if set(state) != {"bank"}:
            raise DataError(f"a kNN state holds exactly one tensor 'bank', got keys {sorted(state)}; "
                            "is this another method's model?")
        self._set_bank(_checked_bank(state["bank"], self.device))
        return self


def _checked_bank(bank, device) -> torch.Tensor:
    """``bank`` as a non-empty 2-D tensor on ``device`` (when given), or DataError."""
    if not isinstance(bank, torch.Tensor) or bank.ndim != 2 or bank.shape[0] == 0:
        shape = tuple(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
        raise DataError(f"the memory bank must be a non-empty (n_bank, dim) tensor, got {shape}")
    return bank.to(device) if device is not None else bank
