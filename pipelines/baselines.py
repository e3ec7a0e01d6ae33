"""The baselines FUN-AD is compared with (kNN/PatchCore, SoftPatch): their settings, defaults and builders.

``config.json["config"]`` of a baseline holds every setting below, so a model
directory records exactly what was fitted. ``funad fit --method M`` and
``funad sweep --methods ...,M`` build it with :func:`baseline_config`;
``--coreset-ratio`` and ``--set NAME=VALUE`` override the defaults.

| method    | setting             | default | meaning                                                      |
|-----------|---------------------|---------|--------------------------------------------------------------|
| both      | coreset_ratio       | 0.1     | share of the (denoised) training patches kept; 1 = all        |
| both      | seed                | fit's   | seeds the random projection and the coreset's start          |
| both      | backend             | auto    | nearest-neighbour back-end: auto, torch or faiss             |
| knn       | reweight_neighbours | 9       | b of PatchCore's image-score reweighting; 1 = max patch score |
| softpatch | noise_ratio         | 0.15    | share of training patches dropped as noise, in [0, 1)        |
| softpatch | weighting           | lof     | per-position outlier score: lof or gaussian                  |
| softpatch | lof_k               | 6       | LOF neighbours                                               |

A kNN directory written before the coreset default existed records
``coreset_ratio: null``, which meant the full bank; it still loads as such.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from funad.errors import ConfigError
from funad.knn import DEFAULT_CORESET_RATIO, DEFAULT_REWEIGHT_NEIGHBOURS, KNNScorer
from funad.softpatch import DEFAULT_LOF_K, DEFAULT_NOISE_RATIO, SoftPatchScorer

BASELINES = ("knn", "softpatch")

_COMMON = {"coreset_ratio": DEFAULT_CORESET_RATIO, "seed": 0, "backend": "auto"}
DEFAULTS: dict[str, dict[str, Any]] = {
    "knn": {**_COMMON, "reweight_neighbours": DEFAULT_REWEIGHT_NEIGHBOURS},
    "softpatch": {**_COMMON, "noise_ratio": DEFAULT_NOISE_RATIO, "weighting": "lof", "lof_k": DEFAULT_LOF_K},
}


def _check_method(method: str) -> None:
    if method not in DEFAULTS:
        raise ConfigError(f"unknown baseline {method!r}; choose one of {list(BASELINES)}")


def parse_setting(method: str, name: str, text: str) -> Any:
    """``--set NAME=TEXT`` of a baseline, typed like its default; ConfigError names a bad name or value."""
    _check_method(method)
    settable = sorted(set(DEFAULTS[method]) - {"seed"})
    if name not in settable:
        raise ConfigError(f"--set {name}=...: {method} has no setting {name!r}; its settings are {settable}")
    kind = type(DEFAULTS[method][name])
    try:
        return kind(text) if kind is not float else float(text)
    except ValueError:
        raise ConfigError(f"--set {name}={text!r}: {method} expects a {kind.__name__}") from None


def baseline_config(method: str, *, seed: int = 0, coreset_ratio: Optional[float] = None,
                    overrides: Union[dict, tuple] = ()) -> dict:
    """The full, checked config dict of a baseline: defaults, ``coreset_ratio`` when given, then ``overrides``.

    Raises ConfigError on an unknown setting or a value out of range
    (e.g. a coreset ratio outside (0, 1], a noise ratio of 1).
    """
    _check_method(method)
    config = {**DEFAULTS[method], "seed": int(seed)}
    if coreset_ratio is not None:
        config["coreset_ratio"] = float(coreset_ratio)
    for name, value in dict(overrides).items():
        if name not in config or name == "seed":
            raise ConfigError(f"{method} has no setting {name!r}; its settings are "
                              f"{sorted(set(config) - {'seed'})}")
        config[name] = value
    build(method, config).check_params()
    return config


def build(method: str, config: dict, device: Union[str, torch.device, None] = None) -> KNNScorer:
    """An unfitted baseline estimator from its config dict (missing keys take the defaults)."""
    _check_method(method)
    c = {**DEFAULTS[method], **config}
    ratio = 1.0 if c["coreset_ratio"] is None else float(c["coreset_ratio"])  # null: a pre-coreset kNN directory
    common = {"coreset_ratio": ratio, "seed": int(c["seed"]), "backend": c["backend"], "device": device}
    if method == "knn":
        return KNNScorer(reweight_neighbours=int(c["reweight_neighbours"]), **common)
    return SoftPatchScorer(noise_ratio=float(c["noise_ratio"]), weighting=c["weighting"], lof_k=int(c["lof_k"]),
                           **common)
