"""The estimator settings the CLI shows and parses, and the one builder of a model's config dict.

``funad fit`` and ``funad sweep`` both build the config stored in
config.json["config"] (and in a sweep's ``cfg_*`` columns) with
:func:`model_config`. The CLI reaches :mod:`funad.config` only through here.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Optional

from funad.config import DEFAULT_PRESET, PRESETS, FunADConfig, preset as _preset
from funad.errors import ConfigError
from funad.threshold import DEFAULT_PIXEL_QUANTILE, RULES  # noqa: F401  (for the CLI's help, without importing torch)

__all__ = ["DEFAULT_PRESET", "PRESETS", "FIELDS", "ConfigError", "model_config", "parse_setting",
           "describe_fields", "settings_table", "AUTO_RULE", "RULE_CHOICES", "DEFAULT_RULE"]

# The threshold rules `funad fit --threshold-rule` takes: funad.threshold's, and "auto" (the default), which
# picks one by the model's kind of score (funad.pipelines.thresholds.auto_rule).
AUTO_RULE = "auto"
RULE_CHOICES: tuple[str, ...] = (AUTO_RULE,) + tuple(RULES)
DEFAULT_RULE = AUTO_RULE

FIELDS: tuple[str, ...] = tuple(FunADConfig().to_dict())  # every FunADConfig field, in declaration order


def model_config(method: str, preset: Optional[str], *, overrides: dict | tuple = (), epochs: Optional[int] = None,
                 seed: int = 0, coreset_ratio: Optional[float] = None) -> dict:
    """The estimator's full config dict, as config.json["config"] holds it.

    FUN-AD: the preset with ``overrides`` (FunADConfig field -> value),
    ``epochs`` (when given) and ``seed`` applied. The baselines (kNN,
    SoftPatch): their defaults with ``coreset_ratio`` (when given) and
    ``overrides`` applied (:func:`funad.pipelines.baselines.baseline_config`).
    """
    if method != "funad":
        from .baselines import baseline_config

        return baseline_config(method, seed=seed, coreset_ratio=coreset_ratio, overrides=overrides)
    changes = dict(overrides)
    if epochs is not None:
        changes["epochs"] = int(epochs)
    changes["seed"] = int(seed)
    return _preset(preset or DEFAULT_PRESET, **changes).to_dict()


def parse_setting(name: str, text: str, method: str = "funad") -> Any:
    """``("lambda_", "1")`` -> 1.0, typed like the FunADConfig field (or the baseline ``method``'s setting);
    ConfigError names a bad name or value."""
    if method != "funad":
        from .baselines import parse_setting as parse_baseline_setting

        return parse_baseline_setting(method, name, text)
    return FunADConfig.parse_value(name, text)


def describe_fields() -> dict[str, str]:
    """Field name -> the one-line comment beside it in funad/config.py (its meaning)."""
    out: dict[str, str] = {}
    for line in inspect.getsource(FunADConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.*)$", line)
        if m and m.group(1) in FIELDS:
            out[m.group(1)] = m.group(2).strip()
    return out


def settings_table() -> list[dict]:
    """One dict per field: ``name``, ``default`` (FunADConfig's), ``presets`` {name: value}, ``meaning``."""
    default = FunADConfig().to_dict()
    values = {name: _preset(name).to_dict() for name in sorted(PRESETS)}
    meaning = describe_fields()
    return [{"name": f, "default": default[f], "presets": {p: v[f] for p, v in values.items()},
             "meaning": meaning.get(f, "")} for f in FIELDS]
