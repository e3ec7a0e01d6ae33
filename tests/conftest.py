"""Shared fixtures: the ``../shared`` folder and small synthetic feature stores."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from funad import cache

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (real data and offline weights); skips the test when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: real data and weights are not available here")
    return SHARED


def build_tiny_store(
    path: Path,
    *,
    n_train: int = 6,
    n_test: int = 4,
    grid: tuple[int, int] = (3, 3),
    token_dim: int = 8,
    mask_size: tuple[int, int] = (12, 12),
    preview_size: Optional[int] = 6,
    dtype: str = "float16",
    format: Optional[str] = None,
    complete: bool = True,
    seed: int = 0,
    attributes: Optional[dict] = None,
    chunk_images: int = 4,
) -> Path:
    """Write a small store with planted anomalies and return its path.

    ``chunk_images`` is small by default so that tests see several chunks and a
    padded last one (10 images: chunks of 4, 4 and 2).

    Train images are normal (label 0, "good"). Test images alternate good /
    "defect" (label 1); a defect image has one patch (a different one per image)
    whose token is shifted by +4 in every channel, and its mask covers exactly
    that patch's cell at input resolution. Class tokens are each image's mean
    patch token. With ``complete=False`` the last image is left pending.
    """
    rng = np.random.default_rng(seed)
    gh, gw = grid
    p = gh * gw
    n = n_train + n_test
    labels = [0] * n_train + [i % 2 for i in range(n_test)]
    samples = [{"path": f"train/good/{i:03d}.png", "split": "train", "label": 0, "defect_type": "good"}
               for i in range(n_train)]
    samples += [{"path": f"test/{'defect' if lab else 'good'}/{i:03d}.png", "split": "test", "label": lab,
                 "defect_type": "defect" if lab else "good"} for i, lab in enumerate(labels[n_train:])]
    patches = rng.normal(size=(n, p, token_dim)).astype(np.float32)
    masks = np.zeros((n, *mask_size), np.uint8)
    ch, cw = mask_size[0] // gh, mask_size[1] // gw
    for i, lab in enumerate(labels):
        if lab:
            j = i % p
            patches[i, j] += 4.0
            r, c = divmod(j, gw)
            masks[i, r * ch : (r + 1) * ch, c * cw : (c + 1) * cw] = 1
    class_tokens = patches.mean(axis=1)
    previews = None
    if preview_size is not None:
        previews = rng.integers(0, 256, size=(n, preview_size, preview_size, 3), dtype=np.uint8)
    attrs = {"backbone": "synthetic", "weights": None, "weights_sha256": None, "layer": 0,
             "image_size": mask_size[0], "resize": mask_size[0], "crop": mask_size[0],
             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
             "dataset_kind": "synthetic", "dataset_root": str(path.parent), **(attributes or {})}
    done = n - 1 if not complete else n
    with cache.create(path, samples=samples, grid=grid, token_dim=token_dim, mask_size=mask_size,
                      preview_size=preview_size, dtype=dtype, attributes=attrs, format=format,
                      chunk_images=chunk_images) as store:
        idx = np.arange(done)
        store.write_batch(idx, patch_tokens=patches[idx], class_tokens=class_tokens[idx], masks=masks[idx],
                          previews=None if previews is None else previews[idx])
    return path


@pytest.fixture
def tiny_store(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_store(name="tiny.zarr", **options) -> Path`` of a small synthetic store in ``tmp_path``.

    Options are those of :func:`build_tiny_store` (n_train, n_test, grid, token_dim, mask_size,
    preview_size, dtype, format, complete, seed, attributes, chunk_images). Use a ``.h5`` name for HDF5.
    """

    def make(name: str = "tiny.zarr", **options) -> Path:
        return build_tiny_store(tmp_path / name, **options)

    return make


@contextmanager
def backbone_killed_on_call(n: int):
    """Inside the block, the ``n``-th backbone forward pass raises KeyboardInterrupt, as if the
    extraction were killed there (the earlier batches are written); the real forward pass is back after."""
    from funad.pipelines.backbone import Backbone

    original, calls = Backbone.__call__, {"n": 0}

    def killed(self, x):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, x)

    Backbone.__call__ = killed
    try:
        yield
    finally:
        Backbone.__call__ = original
