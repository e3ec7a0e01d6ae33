"""User-facing errors raised by the pipelines (bad folders, mismatched caches...).

Every message names the file or value at fault and says what to do.
"""


class PipelineError(Exception):
    """Base class of the pipelines' user-facing errors."""


class DatasetError(PipelineError, ValueError):
    """A dataset folder is missing files, has unpaired masks, or is empty."""


class BackboneError(PipelineError, RuntimeError):
    """A backbone or its weights cannot be loaded."""


class ModelDirError(PipelineError, ValueError):
    """A model directory is missing files or does not match the cache."""
