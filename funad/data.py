"""Where the training loop gets its features from.

The loop touches features only through ``FeatureSource.get(indices)``, so the
same code trains from an in-memory tensor (:class:`TensorSource`) or from a
store that streams images from disk (provided by ``funad.pipelines``).
"""

from __future__ import annotations

from typing import Protocol, Union, runtime_checkable

import numpy as np
import torch

from .errors import DataError


@runtime_checkable
class FeatureSource(Protocol):
    """Random access to the patch features of ``n_images`` images.

    ``get(indices)`` returns a float32 tensor (len(indices), n_patches, dim) on
    the source's device, in the order of ``indices``.
    """

    n_images: int
    n_patches: int
    dim: int

    def get(self, indices: np.ndarray) -> torch.Tensor: ...


class TensorSource:
    """A :class:`FeatureSource` over an in-memory (n_images, n_patches, dim) tensor.

    The tensor stays where it is (CPU or GPU) and in its dtype; ``get`` gathers
    the requested images and converts them to float32.
    """

    def __init__(self, features: Union[torch.Tensor, np.ndarray]) -> None:
        if isinstance(features, np.ndarray):
            features = torch.from_numpy(features)
        if not isinstance(features, torch.Tensor):
            raise DataError(f"features must be a torch.Tensor or numpy array, got {type(features).__name__}")
        if features.ndim != 3:
            raise DataError("features must have shape (n_images, n_patches, dim), "
                            f"got shape {tuple(features.shape)}; add a patch axis of size 1 for image-level features")
        if not features.is_floating_point():
            raise DataError(f"features must be floating point, got dtype {features.dtype}")
        self.features = features
        self.n_images, self.n_patches, self.dim = (int(s) for s in features.shape)

    @property
    def device(self) -> torch.device:
        return self.features.device

    def get(self, indices: np.ndarray) -> torch.Tensor:
        """Features of ``indices`` as float32 (len(indices), n_patches, dim)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=self.features.device)
        # Plain indexing: measured ~3.5x faster than index_select for a 32-image
        # batch from a bottle-sized CPU tensor.
        return self.features[idx].float()

    def get_patches(self, indices: np.ndarray, positions: torch.Tensor) -> torch.Tensor:
        """``get(indices)[:, positions]`` without copying the other patches."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=self.features.device)
        return self.features[idx[:, None], positions.to(self.features.device)[None, :]].float()


class SubsetSource:
    """The :class:`FeatureSource` of images ``rows`` of ``source``: its image ``i`` is ``source``'s ``rows[i]``."""

    def __init__(self, source: FeatureSource, rows: np.ndarray) -> None:
        self.source, self.rows = source, np.asarray(rows, dtype=np.int64)
        self.n_images, self.n_patches, self.dim = len(self.rows), source.n_patches, source.dim
        self.device = source_device(source)

    def get(self, indices: np.ndarray) -> torch.Tensor:
        return self.source.get(self.rows[np.asarray(indices, dtype=np.int64)])

    def get_patches(self, indices: np.ndarray, positions: torch.Tensor) -> torch.Tensor:
        return get_patches(self.source, self.rows[np.asarray(indices, dtype=np.int64)], positions)


def get_patches(source: FeatureSource, indices: np.ndarray, positions: torch.Tensor) -> torch.Tensor:
    """float32 (len(indices), len(positions), dim): the features of patches ``positions`` of images ``indices``.

    ``source.get(indices)[:, positions]``, through the source's own ``get_patches`` when it has one (a
    :class:`TensorSource` then copies 64 of 784 patches per image instead of all of them).
    """
    own = getattr(source, "get_patches", None)
    return own(indices, positions) if own is not None else source.get(indices)[:, positions.to(source_device(source))]


# Anything the estimators accept as features: a source, or a (n_images, n_patches, dim) tensor or array.
FeaturesLike = Union[FeatureSource, torch.Tensor, np.ndarray]


def as_source(features: FeaturesLike) -> FeatureSource:
    """Wrap a tensor or array in a :class:`TensorSource`; pass sources through."""
    if isinstance(features, (torch.Tensor, np.ndarray)):
        return TensorSource(features)
    if isinstance(features, FeatureSource):
        return features
    raise DataError("expected a FeatureSource or a (n_images, n_patches, dim) tensor/array, "
                    f"got {type(features).__name__}")


def source_device(source: FeatureSource) -> torch.device:
    """The device a source's tensors live on (CPU when it does not say)."""
    return torch.device(getattr(source, "device", "cpu"))
