"""Exceptions raised by the feature store.

Each inherits from a built-in exception as well, so callers can catch either:
``except FileNotFoundError`` catches a missing cache, ``except CacheError``
catches every problem with one.
"""


class CacheError(Exception):
    """Base class of every error the feature store raises."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    """The cache does not exist (opened with mode ``"r"`` or ``"a"``)."""


class CacheExistsError(CacheError, FileExistsError):
    """The cache already exists (created with mode ``"w-"`` / ``overwrite=False``)."""


class CacheMismatchError(CacheError, ValueError):
    """Data or settings do not match the store (wrong shape, different backbone...)."""


class IncompleteCacheError(CacheError, RuntimeError):
    """An image that was asked for has not been written completely (or was skipped)."""


class CorruptCacheError(CacheError, ValueError):
    """The store on disk is inconsistent: missing arrays, shapes that disagree with its metadata."""


class CacheLockedError(CacheError, RuntimeError):
    """Another process holds the store's writer lock."""
