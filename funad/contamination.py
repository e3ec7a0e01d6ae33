"""The contamination protocol (FUNAD_SPEC.md, "Contamination protocol").

With anomaly-to-normal ratio rho, ``round(rho * N_normal_train)`` anomalous
test images, chosen at random with a seed, join the unlabelled training set
(fewer, with a warning, when the test set runs out).

- No overlap: the moved images leave the test set.
- Overlap: they stay in the test set as well.

The split works on image indices of a cache, so nothing is re-extracted, and
it round-trips through ``config.json`` (``to_dict`` / ``from_dict``) so that
evaluation sees exactly the test set the fit defined.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContaminationSplit:
    """Which images train and which are tested, as indices into the cache.

    Attributes:
        train_idx: (n_train,) int64, sorted: every train-split image plus the moved ones.
        test_idx: (n_test,) int64, sorted: the test images to evaluate on.
        moved_idx: (n_moved,) int64, sorted: test anomalies moved into training.
        ratio: the requested anomaly-to-normal ratio rho.
        overlap: True when moved images stay in the test set.
        seed: seed of the random choice.
    """

    train_idx: np.ndarray
    test_idx: np.ndarray
    moved_idx: np.ndarray
    ratio: float
    overlap: bool
    seed: int

    @property
    def n_moved(self) -> int:
        return int(self.moved_idx.size)

    def to_dict(self) -> dict:
        """JSON-ready form (lists of ints) for ``config.json``."""
        return {
            "ratio": float(self.ratio),
            "overlap": bool(self.overlap),
            "seed": int(self.seed),
            "n_moved": self.n_moved,
            "train_idx": [int(i) for i in self.train_idx],
            "test_idx": [int(i) for i in self.test_idx],
            "moved_idx": [int(i) for i in self.moved_idx],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ContaminationSplit":
        """Inverse of :meth:`to_dict`; raises ConfigError naming a missing key."""
        required = ("ratio", "overlap", "seed", "train_idx", "test_idx", "moved_idx")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"contamination split is missing {missing}; the model's config.json "
                              "is incomplete or from another version, re-run `funad fit`")
        return cls(
            train_idx=np.asarray(d["train_idx"], dtype=np.int64),
            test_idx=np.asarray(d["test_idx"], dtype=np.int64),
            moved_idx=np.asarray(d["moved_idx"], dtype=np.int64),
            ratio=float(d["ratio"]),
            overlap=bool(d["overlap"]),
            seed=int(d["seed"]),
        )


def contaminate(labels: np.ndarray, splits: np.ndarray, ratio: float, overlap: bool,
                seed: int) -> ContaminationSplit:
    """Move ``round(ratio * N_normal_train)`` random test anomalies into training.

    ``round`` is Python's (halves go to the even integer): 10% of 209 normal
    images moves 21 anomalies, 10% of 25 moves 2.

    Args:
        labels: (N,) int, 0 normal, 1 anomalous, -1 unknown.
        splits: (N,) str, "train" or "test".
        ratio: anomaly-to-normal ratio rho >= 0 (0.1 = 10%).
        overlap: keep the moved images in the test set as well.
        seed: seed for ``np.random.default_rng``; the same inputs and seed
            always move the same images.

    Returns:
        A :class:`ContaminationSplit`. Training is every train-split image
        plus the moved ones; the test set is every test-split image, minus the
        moved ones unless ``overlap``.

    Raises:
        ConfigError: ``ratio`` is negative, or positive while the labels needed
            to pick anomalies or count normal training images are unknown (-1).
        DataError: ``labels`` and ``splits`` do not pair up or hold unknown values.
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    splits = np.asarray(splits).astype(str)
    if labels.ndim != 1 or labels.shape != splits.shape:
        raise DataError(f"labels {labels.shape} and splits {splits.shape} must both have shape (N,)")
    bad_labels = sorted(set(np.unique(labels).tolist()) - {-1, 0, 1})
    if bad_labels:
        raise DataError(f"labels must be 0, 1 or -1 (unknown), found {bad_labels}")
    bad_splits = sorted(set(np.unique(splits).tolist()) - {"train", "test"})
    if bad_splits:
        raise DataError(f"splits must be 'train' or 'test', found {bad_splits}")
    if not ratio >= 0:
        raise ConfigError(f"contamination ratio must be >= 0, got {ratio}")

    is_train = splits == "train"
    is_test = ~is_train
    train_idx = np.flatnonzero(is_train)
    test_idx = np.flatnonzero(is_test)
    moved = np.empty(0, dtype=np.int64)

    if ratio > 0:
        unknown_train = int(np.sum(is_train & (labels == -1)))
        unknown_test = int(np.sum(is_test & (labels == -1)))
        if unknown_train or unknown_test:
            raise ConfigError(
                f"contamination ratio {ratio} needs labelled data, but {unknown_train} train and "
                f"{unknown_test} test images have unknown labels (-1); use ratio 0 to train on the "
                "train split as it is")
        n_normal_train = int(np.sum(is_train & (labels == 0)))
        n_move = int(round(ratio * n_normal_train))
        candidates = np.flatnonzero(is_test & (labels == 1))
        if n_move > candidates.size:
            logger.warning("contamination %.3g asks for %d anomalies (%g x %d normal training images) but "
                           "the test set has only %d; moving all of them%s", ratio, n_move, ratio,
                           n_normal_train, candidates.size,
                           "" if overlap else ", so no anomalous test image is left (no overlap) and no "
                           "AUROC can be computed on this split")
            n_move = candidates.size
        rng = np.random.default_rng(seed)
        moved = np.sort(rng.choice(candidates, size=n_move, replace=False)).astype(np.int64)
        train_idx = np.union1d(train_idx, moved)
        if not overlap:
            test_idx = np.setdiff1d(test_idx, moved)
        logger.info("contamination %.3g: moved %d test anomalies into training (%s)", ratio, n_move,
                    "overlap: they stay in the test set" if overlap else "no overlap")

    return ContaminationSplit(train_idx=train_idx.astype(np.int64), test_idx=test_idx.astype(np.int64),
                              moved_idx=moved, ratio=float(ratio), overlap=bool(overlap), seed=int(seed))
