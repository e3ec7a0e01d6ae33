"""The grid of ``funad sweep``: parsing ``--methods``/``--set``/lists, and the cells with their keys.

A cell is (method, overlap, ratio, seed, ``--set`` values, ``--epochs``).
Its key, which ``results.csv`` uses to skip finished cells, names these and
ends with ``cfg=<digest>`` of the cell's full estimator config (every field,
epochs included), so a re-run with any other setting runs again instead of
reusing rows of another config.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from funad.config import effective_settings, training_settings

from . import modeldir
from .errors import PipelineError
from .settings import DEFAULT_PRESET, PRESETS, model_config, parse_setting

OVERLAPS = {"both": (False, True), "overlap": (True,), "no-overlap": (False,)}


@dataclass(frozen=True)
class MethodSpec:
    """One entry of ``--methods``: ``funad`` (default preset), ``funad:<preset>`` or a baseline (``knn``...)."""

    label: str
    method: str
    preset: Optional[str]


def parse_methods(text: str) -> list[MethodSpec]:
    """``"funad,knn,funad:paper"`` -> method specs; unknown names or presets raise PipelineError."""
    baselines = [m for m in modeldir.METHODS if m != "funad"]
    out: list[MethodSpec] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, preset = item.partition(":")
        if name == "funad":
            preset = preset or DEFAULT_PRESET
            if preset not in PRESETS:
                raise PipelineError(f"--methods: unknown preset {preset!r} in {item!r}; choose from {sorted(PRESETS)}")
            spec = MethodSpec(f"funad:{preset}", "funad", preset)
        elif name in baselines and not preset:
            spec = MethodSpec(name, name, None)
        else:
            raise PipelineError(f"--methods: unknown method {item!r}; use funad, funad:<preset> "
                                f"(presets {sorted(PRESETS)}) or one of {baselines}")
        if spec not in out:
            out.append(spec)
    if not out:
        raise PipelineError("--methods is empty; give e.g. funad,knn")
    return out


def _parse_list(text: str, what: str, kind: type, noun: str) -> list:
    try:
        values = [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise PipelineError(f"{what} expects comma-separated {noun}, got {text!r}") from None
    if not values:
        raise PipelineError(f"{what} is empty")
    return values


def parse_floats(text: str, what: str) -> list[float]:
    """``"0,0.01,0.1"`` -> [0.0, 0.01, 0.1] sorted, duplicates dropped; PipelineError names ``what`` on a bad value."""
    return sorted(set(_parse_list(text, what, float, "numbers")))


def parse_ints(text: str, what: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2] in the given order, duplicates dropped."""
    return list(dict.fromkeys(_parse_list(text, what, int, "integers")))


def parse_grid_sets(items: Sequence[str]) -> dict[str, list]:
    """``["lambda_=0,2.5", "r=0.5"]`` -> ``{"lambda_": [0.0, 2.5], "r": [0.5]}`` typed like FunADConfig."""
    grid: dict[str, list] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name or not text.strip():
            raise PipelineError(f"--set expects NAME=V1,V2,..., got {item!r}")
        if name in ("seed",):
            raise PipelineError("--set seed=... is not a grid axis; use --seeds")
        values = [parse_setting(name, t.strip()) for t in text.split(",") if t.strip()]
        grid[name] = list(dict.fromkeys(values))
    return grid


def config_digest(config: dict) -> str:
    """12 hex digits identifying a full config dict (sorted JSON, sha256) by the settings that act in it
    (:func:`funad.config.effective_settings`)."""
    return _digest(effective_settings(config))


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Cell:
    """One experiment of the grid."""

    spec: MethodSpec
    overlap: bool
    ratio: float
    seed: int
    params: tuple[tuple[str, Any], ...]  # the --set values of this cell (funad only)
    epochs: Optional[int] = None  # --epochs (funad only)

    @property
    def config(self) -> dict:
        """The estimator's full config dict (what config.json["config"] would hold)."""
        return model_config(self.spec.method, self.spec.preset, overrides=self.params, epochs=self.epochs,
                            seed=self.seed)

    @property
    def params_text(self) -> str:
        """The settings that differ from the method's preset by choice: ``--set`` values, then ``--epochs``."""
        shown = list(self.params) + ([("epochs", self.epochs)] if self.epochs is not None else [])
        return " ".join(f"{k}={v}" for k, v in shown)

    @property
    def key(self) -> str:
        """Identifies the cell in results.csv (resume skips rows with this key); ends with the config digest."""
        parts = [self.spec.label, "overlap" if self.overlap else "no-overlap", f"ratio={self.ratio:g}",
                 f"seed={self.seed}"]
        return "|".join(parts + self.params_text.split() + [f"cfg={config_digest(self.config)}"])

    @property
    def training_key(self) -> Optional[str]:
        """FUN-AD cells with equal training keys train the same Local-Net on the same images: they differ at
        most in inference settings (:data:`funad.config.INFERENCE_SETTINGS`), or only in the preset's name
        (``cleaned`` and ``fast`` with ``max_iterations=210``). None for the baselines, which have no training
        to share."""
        if self.spec.method != "funad":
            return None
        return "|".join([self.spec.method, "overlap" if self.overlap else "no-overlap", f"ratio={self.ratio:g}",
                         f"seed={self.seed}", f"train={_digest(training_settings(self.config))}"])

    def twin_key(self) -> Optional[str]:
        """At ratio 0 the overlap cell equals the no-overlap one: the key of that twin."""
        if self.ratio == 0 and self.overlap:
            return Cell(self.spec, False, self.ratio, self.seed, self.params, self.epochs).key
        return None


def build_grid(methods: Sequence[MethodSpec], ratios: Sequence[float], overlaps: Sequence[bool],
               seeds: Sequence[int], sets: dict[str, list], epochs: Optional[int] = None) -> list[Cell]:
    """Every cell, no-overlap before overlap so that ratio-0 twins can be reused."""
    names = sorted(sets)
    combos = [tuple(zip(names, values)) for values in itertools.product(*(sets[n] for n in names))] or [()]
    cells = []
    for spec in methods:
        funad = spec.method == "funad"
        for overlap in sorted(overlaps):
            for ratio in ratios:
                for seed in seeds:
                    for params in (combos if funad else [()]):
                        cells.append(Cell(spec, overlap, float(ratio), int(seed), params, epochs if funad else None))
    return cells
