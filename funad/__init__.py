"""FUN-AD: fully unsupervised anomaly detection on cached patch features.

The ``funad`` package is the algorithm: tensors and arrays in, tensors and
arrays out, no paths and no printing. The feature store lives in
``funad.cache``, the stages in ``funad.pipelines`` and the command line in
``funad.cli``.
"""

__version__ = "0.1.0"

from .config import FunADConfig, preset  # noqa: E402
from .model import FunAD  # noqa: E402

__all__ = ["FunAD", "FunADConfig", "preset", "__version__"]
