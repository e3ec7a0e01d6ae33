"""Exceptions raised by the algorithm package.

They inherit from built-in exceptions so callers can catch either.
"""


class FunADError(Exception):
    """Base class of every error the algorithm raises on bad input."""


class ConfigError(FunADError, ValueError):
    """A hyperparameter is out of range or unknown."""


class DataError(FunADError, ValueError):
    """Features have the wrong shape, dtype or size for the operation."""


class NotFittedError(FunADError, AttributeError):
    """A method that needs a fitted model was called before ``fit``."""


class DivergedError(FunADError, FloatingPointError):
    """Training produced NaN or infinite losses or scores."""
