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


def user_error_types() -> tuple[type, ...]:
    """Every exception whose message is meant for the user: the CLI shows these without a traceback.

    funad's (``FunADError``), the feature store's (``CacheError``) and the
    pipelines' (:class:`PipelineError`). Imported here, on demand, so that
    the CLI needs no import of ``funad.cache`` or ``funad.errors`` and
    ``funad --help`` stays fast.
    """
    from funad.cache import CacheError
    from funad.errors import FunADError

    return (CacheError, FunADError, PipelineError)
