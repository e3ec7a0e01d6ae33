"""Decision thresholds from unlabelled training scores, and what a threshold gives on labelled scores.

The training set is unlabelled and may hold anomalies, so a threshold is
chosen from the distribution of the training images' scores alone, by one of
these rules (``RULES``):

- ``"quantile"`` (``ThresholdRule``'s default; ``funad fit`` chooses the rule
  per kind of score): the ``1 - expected_contamination`` quantile
  of the training scores, i.e. the share of training images expected to be
  anomalous (default :data:`DEFAULT_EXPECTED_CONTAMINATION`) is flagged.
- ``"otsu"``: Otsu's two-class split of the training scores (the split point
  that maximises the between-class variance), parameter-free; the threshold
  is the midpoint between the two classes' nearest scores. Good when the
  training scores form two groups; when they do not, it cuts the normal
  scores in two.
- ``"mad"``: a robust outlier rule, ``median + k * 1.4826 * MAD`` with
  ``k = mad_k`` (default :data:`DEFAULT_MAD_K`). MAD is the median absolute
  deviation from the median; 1.4826 makes it the standard deviation of a
  normal distribution. When more than half the scores are equal (MAD = 0),
  the mean absolute deviation from the median (times 1.2533) stands in.

Each rule works on a monotone ``scale`` of the scores (``SCALES``):
``"identity"`` for unbounded scores (kNN/SoftPatch distances) and ``"logit"``
(``log(s / (1 - s))``, scores clipped to [1e-7, 1 - 1e-7]) for scores
squashed into (0, 1) (FUN-AD's), where the distance between 0.999 and 0.9999
matters as much as between 0.5 and 0.9. The threshold is mapped back, so it
is always in the model's own score units. An image is called anomalous when
its score is ``>= threshold``.

:func:`normalise` maps scores to [0, 1] with the threshold at 0.5, as
anomalib does: ``clip((g(s) - g(threshold)) / (g(hi) - g(lo)) + 0.5, 0, 1)``
where ``g`` is the rule's scale and ``lo``/``hi`` are the training scores'
minimum and maximum.

Everything here is a plain function on arrays: no I/O, no printing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .errors import ConfigError, DataError

RULES = ("quantile", "otsu", "mad")
SCALES = ("identity", "logit")
DEFAULT_RULE = "quantile"
DEFAULT_EXPECTED_CONTAMINATION = 0.1
DEFAULT_MAD_K = 3.0
# The pixel threshold: this quantile of the map maxima of the training images the image threshold calls
# normal (None or 1: their maximum, so no such image shows a pixel above it). 0.9 was the only candidate at
# or above 0.9 of pixel F1-max on both bottle and KolektorSDD (0.92 and 0.97, 3 seeds each; the maximum
# reached 0.58 and 0.32: it leaves most defect pixels below it). benchmarks/results/pixel-thresholds.md.
DEFAULT_PIXEL_QUANTILE = 0.9
# MAD and mean absolute deviation -> the standard deviation of a normal distribution.
_MAD_TO_STD = 1.4826
_MEAN_AD_TO_STD = 1.2533
_LOGIT_EPS = 1e-7


def to_scale(scores, scale: str = "identity") -> np.ndarray:
    """``scores`` (float64) on ``scale`` (module docstring)."""
    s = np.asarray(scores, dtype=np.float64)
    if scale == "identity":
        return s
    if scale == "logit":
        s = np.clip(s, _LOGIT_EPS, 1.0 - _LOGIT_EPS)
        return np.log(s) - np.log1p(-s)
    raise ConfigError(f"score scale must be one of {list(SCALES)}, got {scale!r}")


def from_scale(value: float, scale: str = "identity") -> float:
    """The inverse of :func:`to_scale` for one value."""
    if scale == "logit":
        return float(1.0 / (1.0 + math.exp(-float(value))))
    to_scale(0.0, scale)  # checks the name
    return float(value)


@dataclass(frozen=True)
class ThresholdRule:
    """A rule and its parameters (module docstring); ``params()`` is what a model directory records."""

    name: str = DEFAULT_RULE
    expected_contamination: float = DEFAULT_EXPECTED_CONTAMINATION
    mad_k: float = DEFAULT_MAD_K
    scale: str = "identity"
    pixel_quantile: Optional[float] = DEFAULT_PIXEL_QUANTILE

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ConfigError(f"score scale must be one of {list(SCALES)}, got {self.scale!r}")
        if self.name not in RULES:
            raise ConfigError(f"threshold rule must be one of {list(RULES)}, got {self.name!r}")
        c = self.expected_contamination
        if not (isinstance(c, (int, float)) and math.isfinite(c) and 0.0 <= c < 1.0):
            raise ConfigError(f"expected contamination is the share of anomalous training images, in [0, 1); "
                              f"got {c!r}")
        if not (isinstance(self.mad_k, (int, float)) and math.isfinite(self.mad_k) and self.mad_k > 0):
            raise ConfigError(f"mad_k must be a positive number of robust standard deviations, got {self.mad_k!r}")
        q = self.pixel_quantile
        if q is not None and not (isinstance(q, (int, float)) and math.isfinite(q) and 0.0 < q <= 1.0):
            raise ConfigError(f"pixel quantile must lie in (0, 1] (1 = the maximum), got {q!r}")

    def params(self) -> dict:
        return asdict(self)

    def threshold(self, scores: np.ndarray) -> float:
        """This rule's threshold on ``scores`` (the training images' scores)."""
        return choose_threshold(scores, self)


def pixel_threshold(normal_maxima, quantile: Optional[float] = DEFAULT_PIXEL_QUANTILE) -> float:
    """The pixel threshold from the map maxima of the training images called normal: their ``quantile``
    (None or 1: their maximum)."""
    m = _checked(normal_maxima)
    return float(m.max() if quantile is None or quantile >= 1.0 else np.quantile(m, quantile))


def _checked(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise DataError("no training scores to choose a threshold from")
    if not np.all(np.isfinite(s)):
        raise DataError(f"{int((~np.isfinite(s)).sum())} training score(s) are NaN or infinite; "
                        "cannot choose a threshold")
    return s


def quantile_threshold(scores, expected_contamination: float = DEFAULT_EXPECTED_CONTAMINATION) -> float:
    """The ``1 - expected_contamination`` quantile (linear interpolation) of ``scores``."""
    return float(np.quantile(_checked(scores), 1.0 - expected_contamination))


def mad_threshold(scores, k: float = DEFAULT_MAD_K) -> float:
    """``median + k * 1.4826 * MAD`` (mean absolute deviation * 1.2533 when MAD is 0)."""
    s = _checked(scores)
    med = float(np.median(s))
    dev = np.abs(s - med)
    spread = _MAD_TO_STD * float(np.median(dev))
    if spread == 0.0:
        spread = _MEAN_AD_TO_STD * float(dev.mean())
    return med + k * spread


def otsu_threshold(scores) -> float:
    """Otsu's split of 1-D ``scores``: the midpoint of the gap that maximises the between-class variance."""
    s = np.sort(_checked(scores))
    n = s.size
    if n < 2 or s[0] == s[-1]:
        return float(s[-1])
    i = np.arange(1, n)  # the low class is s[:i]
    csum = np.cumsum(s)
    mu0 = csum[:-1] / i
    mu1 = (csum[-1] - csum[:-1]) / (n - i)
    between = (i / n) * ((n - i) / n) * (mu0 - mu1) ** 2
    between[s[i] == s[i - 1]] = -1.0  # a split must fall between two different scores
    best = int(np.argmax(between)) + 1
    return float(0.5 * (s[best - 1] + s[best]))


def choose_threshold(scores, rule: ThresholdRule = ThresholdRule()) -> float:
    """The threshold ``rule`` picks on the training ``scores``, in the scores' own units."""
    s = to_scale(_checked(scores), rule.scale)
    if rule.name == "mad":
        t = mad_threshold(s, rule.mad_k)
    elif rule.name == "quantile":
        t = quantile_threshold(s, rule.expected_contamination)
    else:
        t = otsu_threshold(s)
    return from_scale(t, rule.scale)


def all_thresholds(scores, rule: ThresholdRule = ThresholdRule()) -> dict[str, float]:
    """Every rule's threshold on ``scores``, with ``rule``'s parameters (for comparing the candidates)."""
    return {name: choose_threshold(scores, ThresholdRule(name, rule.expected_contamination, rule.mad_k, rule.scale))
            for name in RULES}


def score_summary(scores) -> dict:
    """The distribution of the training scores a threshold was chosen from."""
    s = _checked(scores)
    q = np.quantile(s, [0.05, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99])
    return {"n": int(s.size), "min": float(s.min()), "max": float(s.max()), "mean": float(s.mean()),
            "std": float(s.std()), "median": float(q[2]), "mad": float(np.median(np.abs(s - q[2]))),
            "quantiles": {k: float(v) for k, v in zip(("q05", "q25", "q50", "q75", "q90", "q95", "q99"), q)}}


def normalise(scores, threshold: float, lo: float, hi: float, scale: str = "identity") -> np.ndarray:
    """Scores mapped to [0, 1] with ``threshold`` at 0.5 (anomalib's convention, module docstring).

    ``lo``/``hi``: the training scores' min and max; ``scale``: the rule's.
    Scores at or above the threshold map to >= 0.5, below it to < 0.5.
    """
    g = lambda v: float(to_scale(v, scale))  # noqa: E731
    span = g(hi) - g(lo)
    if not math.isfinite(span) or span <= 0:
        span = 1.0
    out = (to_scale(scores, scale) - g(threshold)) / span + 0.5
    return np.clip(out, 0.0, 1.0)


def at_threshold(labels, scores, threshold: float) -> dict:
    """Precision, recall and F1 of the decision ``score >= threshold`` against 0/1 ``labels``.

    Precision is 0 when nothing is flagged (and F1 then 0), so an
    unreachable threshold is never rewarded.
    """
    y = np.asarray(labels).ravel().astype(bool)
    pred = np.asarray(scores, dtype=np.float64).ravel() >= float(threshold)
    if y.shape != pred.shape:
        raise DataError(f"labels ({y.size}) and scores ({pred.size}) must pair up")
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "n_flagged": int(pred.sum()), "tp": tp, "fp": fp, "fn": fn}


def in_range(threshold: float, lo: float, hi: float) -> bool:
    """Whether ``threshold`` is finite and lies within [lo, hi] (e.g. the training scores' range)."""
    return math.isfinite(threshold) and float(lo) <= float(threshold) <= float(hi)
