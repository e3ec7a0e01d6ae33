"""The data side of a fit: completeness check, the contamination split, the cache record and diagnostic labels.

Contamination follows the paper (FUNAD_SPEC.md, "Contamination protocol"):
``round(ratio * n_normal_train)`` test anomalies, chosen with ``seed``, join
the unlabelled training set; with ``overlap`` they also stay in the test set.
``funad fit`` and every ``funad sweep`` cell draw their split here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .errors import PipelineError
from .features import patch_labels

def check_complete(store) -> None:
    """Raise PipelineError when images are still pending extraction."""
    status = np.asarray(store.status)
    pending = int((status == 0).sum())
    if pending:
        first = store.samples[int(np.flatnonzero(status == 0)[0])]["path"]
        raise PipelineError(
            f"cache {store.path} is incomplete: {pending} of {len(status)} images are pending (e.g. {first}); "
            f"re-run `funad extract` with the same arguments to finish it"
        )


def split_cache(store, ratio: float, overlap: bool, seed: int) -> dict:
    """The training/test split of ``store`` with ``ratio`` contamination.

    Only complete images take part (skipped ones never do). A store without
    labels trains on all its train-split images and needs ``ratio == 0``.

    Returns:
        the config.json ``contamination`` record: ratio, overlap, seed,
        labelled, n_normal_train, n_moved, and moved/train/test ids (store
        indices, sorted) with their sample paths.
    """
    usable = np.union1d(store.indices("train"), store.indices("test"))  # never the synthetic split
    labels = np.asarray(store.labels)[usable]
    splits = np.asarray(store.splits)[usable]
    labelled = len(usable) > 0 and bool((labels >= 0).all())
    if ratio > 0 and not labelled:
        n_unknown = int((labels < 0).sum())
        raise PipelineError(
            f"cache {store.path} has no labels for {n_unknown} of its {len(usable)} images, so there are no "
            f"known anomalies to move: --contamination must be 0 (got {ratio}). An unlabelled cache trains on "
            f"all its train images as they are"
        )
    from funad.contamination import contaminate

    s = contaminate(labels, splits, ratio, overlap, seed)
    moved, train, test = (usable[np.asarray(a, dtype=np.int64)] for a in (s.moved_idx, s.train_idx, s.test_idx))
    paths = [s["path"] for s in store.samples]
    return {
        "ratio": float(ratio),
        "overlap": bool(overlap),
        "seed": int(seed),
        "labelled": labelled,
        "n_normal_train": int(((labels == 0) & (splits == "train")).sum()) if labelled else None,
        "n_moved": int(len(moved)),
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "moved_ids": [int(i) for i in np.sort(moved)],
        "train_ids": [int(i) for i in np.sort(train)],
        "test_ids": [int(i) for i in np.sort(test)],
        "moved_paths": [paths[i] for i in np.sort(moved)],
        "train_paths": [paths[i] for i in np.sort(train)],
        "test_paths": [paths[i] for i in np.sort(test)],
    }


def synthetic_ids(store, mode: str, requested: Optional[bool] = None) -> np.ndarray:
    """Store indices of the FUN-AD* synthetic images a fit trains on (``funad extract --synthetic``).

    Args:
        mode: ``FunADConfig.synthetic``; "off" trains on none.
        requested: ``funad fit --synthetic`` (True) makes a cache without them an error; None and False
            (``--no-synthetic``, which the caller turns into mode "off") do not.
    """
    ids = np.asarray(store.indices("synthetic"), dtype=np.int64)
    if requested and ids.size == 0:
        raise PipelineError(f"--synthetic: cache {store.path} holds no synthetic images; extract them with "
                            "`funad extract DATA -o CACHE --synthetic 0.05`, or drop --synthetic")
    return ids if mode != "off" else ids[:0]


def check_trainable(store, train_ids: np.ndarray, batch_size: Optional[int]) -> None:
    """Raise PipelineError when there is nothing (or too little) to train on."""
    if len(train_ids) == 0:
        raise PipelineError(
            f"cache {store.path} has no complete training images (split 'train'); extract a dataset with a "
            "train split, or check that its images were not all skipped (`funad cache info`)"
        )
    if batch_size is not None and len(train_ids) < batch_size:
        raise PipelineError(
            f"cache {store.path} has {len(train_ids)} training images, fewer than the batch size {batch_size} "
            f"(the incomplete last batch is dropped, so no step would run); pass --set batch_size={len(train_ids)} "
            "or a smaller value"
        )


def cache_record(store, path: Path) -> dict:
    """config.json["cache"]: where the features came from and what they are."""
    return {
        "path": str(Path(path).resolve()),
        "fingerprint": store.fingerprint(),
        "attrs": dict(store.attrs),
        "format": store.format,
        "n_images": int(store.n_images),
        "grid": [int(g) for g in store.grid],
        "n_patches": int(store.n_patches),
        "feature_dim": int(store.feature_dim),
        "mask_size": [int(s) for s in store.mask_size],
        "dtype": str(store.dtype),
    }


def synthetic_labels(store, ids: np.ndarray, tokens: str = "patch") -> np.ndarray:
    """uint8 (n, P) labels of synthetic images ``ids`` from their Perlin masks (all 1 for class tokens)."""
    if tokens == "class":
        return np.ones((len(ids), 1), dtype=np.uint8)
    return patch_labels(store.read_masks(ids), store.grid)


def clean_bank_record(model, store, split: dict) -> Optional[dict]:
    """What a ``scorer="clean_knn"`` model kept (config.json's ``"clean_bank"``); None for other models.

    ``split`` is the model's training split (:func:`split_cache`). On a
    labelled cache ``normal_share`` (the share of kept images the labels call
    normal) is read after the model is built and acts on nothing: a
    diagnostic of how clean the bank is.
    """
    rows = getattr(model, "clean_images_", None)
    if rows is None:
        return None
    record = {"images": int(len(rows)), "bank_patches": int(model.knn_.bank_.shape[0])}
    if split["labelled"]:
        kept = np.asarray(store.labels)[np.asarray(split["train_ids"], dtype=np.int64)][np.asarray(rows)]
        record["normal_share"] = float((kept == 0).mean())
        record["anomalous_kept"] = int((kept != 0).sum())
    return record


def diagnostics_for(store, train_ids: np.ndarray, tokens: str = "patch") -> dict:
    """Labels the fit may log but never act upon (``FunAD.fit(diagnostics=...)``).

    Returns ``{"image_labels": (N,) int64, "patch_labels": (N, P) uint8}``
    for the training images in source order; patch labels are the stored
    masks max-pooled onto the patch grid.
    """
    image_labels = np.asarray(store.labels)[train_ids].astype(np.int64)
    if tokens == "class":  # one "patch" per image: its label is the image's
        return {"image_labels": image_labels, "patch_labels": image_labels[:, None].astype(np.uint8)}
    masks = store.read_masks(train_ids)
    return {"image_labels": image_labels, "patch_labels": patch_labels(masks, store.grid)}


