"""FUN-AD: fully unsupervised anomaly detection on cached patch features.

The ``funad`` package is the algorithm: tensors and arrays in, tensors and
arrays out, no paths and no printing. The feature store lives in
``funad.cache``, the stages in ``funad.pipelines`` and the command line in
``funad.cli``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: ``funad.cache`` and ``funad.cli`` are subpackages of ``funad``, so an
    # eager ``import torch`` here would slow down ``funad cache info`` by seconds.
    if name == "FunAD":
        from .model import FunAD

        return FunAD
    if name in ("FunADConfig", "preset"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'funad' has no attribute {name!r}")

__all__ = ["FunAD", "FunADConfig", "preset", "__version__"]
