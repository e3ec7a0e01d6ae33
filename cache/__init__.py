"""The feature store: a dataset's backbone features, masks and sample table on disk.

``funad extract`` and ``funad import`` write a store; ``fit``, ``eval`` and
``predict`` read it::

    from funad import cache
    with cache.open("feats.zarr") as store:            # "r": must exist
        idx = store.indices(split="train")
        feats = store.read_features(idx)               # (n, P, 2C) float16

Zarr v3 directory by default, one HDF5 file for a ``.h5``/``.hdf5`` suffix;
both behave the same. See :mod:`funad.cache.store` for the layout.
"""

from .errors import (
    CacheError,
    CacheExistsError,
    CacheLockedError,
    CacheMismatchError,
    CacheNotFoundError,
    CorruptCacheError,
    IncompleteCacheError,
)
from .layout import COMPLETE, PENDING, SKIPPED
from .api import create, infer_format, open
from .grow import grow
from .integrity import row_checksums
from .lock import lock_path
from .store import FeatureStore

__all__ = [
    "CacheError",
    "CacheExistsError",
    "CacheLockedError",
    "CacheMismatchError",
    "CacheNotFoundError",
    "CorruptCacheError",
    "IncompleteCacheError",
    "FeatureStore",
    "create",
    "open",
    "infer_format",
    "grow",
    "PENDING",
    "COMPLETE",
    "SKIPPED",
    "lock_path",
    "row_checksums",
]
