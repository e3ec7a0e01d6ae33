"""Read and write the model directory that ``funad fit`` produces.

Layout (DESIGN.md, "Model directory")::

    MODEL_DIR/
      model.safetensors  weights: the Local-Net state dict (method "funad"),
                         the kNN bank (method "knn") or the SoftPatch bank and
                         its weights (method "softpatch"); non-tensor entries of the
                         state dict go in the safetensors metadata as JSON
      config.json        everything needed to rebuild and audit the model (below)
      train_log.jsonl    one JSON record per epoch (funad only)
      checkpoint.pt      last training checkpoint, read by ``funad fit --resume``

``config.json`` keys::

    method          "funad" | "knn" | "softpatch"
    preset          preset name (funad) or null
    config          the full hyperparameters: FunADConfig.to_dict() for funad,
                    the settings of pipelines/baselines.py for knn and softpatch
    seed            the seed of the fit
    cache           {"path", "fingerprint", "attrs", "grid", "n_patches",
                     "feature_dim", "mask_size", "dtype"}; attrs holds the
                    backbone metadata (backbone, weights, weights_sha256, layer,
                    image_size, resize, crop, mean, std, grid, ...)
    contamination   {"ratio", "overlap", "seed", "n_normal_train", "n_moved",
                     "moved_ids", "train_ids", "test_ids",
                     "moved_paths", "train_paths", "test_paths"}
                    ids index the cache's sample table; paths are its sample
                    paths (relative to the dataset root)
    sample_table    {"n_images_in_cache", "n_rows", "digest", "columns", "rows"}:
                    every image of the split as [id, path, split, label,
                    defect_type, features checksum]; eval finds them again by
                    path after the cache grew (pipelines/sample_table.py)
    selection       "final" (default) or "oracle" (chosen with test labels)
    threshold       the unlabelled image and pixel thresholds, their rule and the
                    training scores (funad.pipelines.thresholds)
    oracle          only with selection "oracle": {"warning", "epoch",
                    "image_auroc", "pixel_auroc", "mean", "curve"}
    clean_bank      scorer "clean_knn": the training images kept for its bank
                    (pipelines/fit_data.py, clean_bank_record)
    trained_by      only after `funad fit --from-model`: {"model_dir",
                    "fit_seconds"} of the fit whose Local-Net this model took
    options         the `funad fit` options (what --resume and --from-model re-use)
    device          where the fit ran
    funad_version   the version that wrote the directory
    fit_seconds     wall time of the (last) fit run (with --from-model: of
                    the scoring, the training's is in trained_by)
    epochs_logged   records in train_log.jsonl (funad)
    complete        true once the weights are written (false while training)

Readers (``funad eval``, ``funad predict``) use::

    model, info = load_model_dir(path)
    scores = model.score_patches(features)      # (n, P) numpy, higher = more anomalous
    check_cache_compatible(info, store)         # raises ModelDirError on a mismatch
    info.test_ids                               # the test split to evaluate on

Every file is written atomically (a temporary file in the same folder, then
``os.replace``), so a crash leaves the previous version or none, never half a
file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from .baselines import BASELINES
from .errors import ModelDirError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
METHODS = ("funad",) + BASELINES  # every method `funad fit --method` and `funad sweep --methods` accept
SELECTIONS = ("final", "oracle")

# Store attributes that define what the features mean. A model only applies to
# features whose values agree on all of these.
FEATURE_ATTRS = (
    "backbone", "weights_sha256", "layer", "image_size", "resize", "crop",
    "mean", "std", "grid", "feature_dim",
)

# Key in the safetensors metadata holding the JSON of non-tensor state entries.
_EXTRA_KEY = "funad_extra"
# Separator of nested state-dict keys in safetensors names ("net/adaptor.0.weight").
_SEP = "/"

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ModelInfo:
    """The parsed ``config.json`` of a model directory.

    ``raw`` is the whole JSON document; the fields are the parts readers use.
    """

    path: Path
    method: str
    preset: Optional[str]
    config: dict
    seed: int
    cache: dict
    contamination: dict
    selection: str
    funad_version: str
    raw: dict

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (h, w) of the features the model was fitted on."""
        return tuple(self.cache["grid"])  # type: ignore[return-value]

    @property
    def n_patches(self) -> int:
        return int(self.cache["n_patches"])

    @property
    def feature_dim(self) -> int:
        """D of the features the model expects (class token + patch token)."""
        return int(self.cache["feature_dim"])

    @property
    def mask_size(self) -> tuple[int, int]:
        return tuple(self.cache["mask_size"])  # type: ignore[return-value]

    @property
    def train_ids(self) -> np.ndarray:
        return np.asarray(self.contamination["train_ids"], dtype=np.int64)

    @property
    def test_ids(self) -> np.ndarray:
        return np.asarray(self.contamination["test_ids"], dtype=np.int64)

    @property
    def moved_ids(self) -> np.ndarray:
        return np.asarray(self.contamination["moved_ids"], dtype=np.int64)

    @property
    def is_oracle(self) -> bool:
        """True when the weights were chosen with test labels (paper protocol)."""
        return self.selection == "oracle"


# ---------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path`` atomically.

    The temporary file lies in the same folder, so ``os.replace`` is atomic;
    it is removed when ``write`` fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(Path(path), write)


def _jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, tuples and paths to JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------- directory


def prepare_model_dir(path: PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``path`` for a new fit, refusing to clobber an earlier one.

    A non-empty directory is an error unless ``overwrite`` (its model files are
    removed) or ``resume`` (kept, to continue from ``checkpoint.pt``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ModelDirError(f"{path} exists and is not a directory; choose another -o")
    if path.is_dir() and any(path.iterdir()):
        if resume:
            return path
        if not overwrite:
            raise ModelDirError(
                f"model directory {path} is not empty; pass --overwrite to replace it, "
                "--resume to continue its fit, or choose another -o"
            )
        for name in (MODEL_FILE, CONFIG_FILE, LOG_FILE, CHECKPOINT_FILE):
            (path / name).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _flatten(state: dict, prefix: str, tensors: dict, extra: dict) -> None:
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().to("cpu").contiguous()
        elif isinstance(value, np.ndarray):
            tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
        elif isinstance(value, dict) and value and any(isinstance(v, (torch.Tensor, np.ndarray, dict))
                                                       for v in value.values()):
            _flatten(value, f"{name}{_SEP}", tensors, extra)
        else:
            extra[name] = _jsonable(value)


def _unflatten(flat: dict) -> dict:
    state: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(_SEP)
        node = state
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return state


def save_weights(path: PathLike, state: dict) -> None:
    """Write a state dict to ``path/model.safetensors`` atomically.

    Tensors become safetensors tensors (contiguous, on the CPU); a nested dict
    of tensors (FunAD's ``{"net": {...}}``) is flattened with "/" in the
    names (``net/adaptor.0.weight``); other values (ints, strings, config
    dicts) are stored as JSON in the metadata. :func:`load_weights` rebuilds
    the same nesting.
    """
    from safetensors.torch import save_file

    tensors: dict = {}
    extra: dict = {}
    _flatten(state, "", tensors, extra)
    metadata = {_EXTRA_KEY: json.dumps(extra)}
    atomic_write(Path(path) / MODEL_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_weights(path: PathLike) -> dict:
    """Read ``path/model.safetensors`` back into the dict given to :func:`save_weights`."""
    from safetensors import safe_open

    file = Path(path) / MODEL_FILE
    if not file.is_file():
        raise ModelDirError(f"{file} is missing; re-run `funad fit` to create the model directory")
    try:
        flat: dict = {}
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                flat[key] = f.get_tensor(key)
            metadata = f.metadata() or {}
        flat.update(json.loads(metadata.get(_EXTRA_KEY, "{}")))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelDirError(f"{file} cannot be read ({exc}); re-run `funad fit`") from exc
    return _unflatten(flat)


def write_config(path: PathLike, config: dict) -> None:
    """Write ``config.json`` (keys in the module docstring) atomically."""
    write_json(Path(path) / CONFIG_FILE, config)


def read_config(path: PathLike) -> ModelInfo:
    """Parse ``path/config.json``; raises ModelDirError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist; create it with `funad fit CACHE -o {path}`")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ModelDirError(f"{file} is missing; {path} is not a finished model directory (re-run `funad fit`)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{file} is not valid JSON ({exc}); re-run `funad fit`") from exc
    missing = [k for k in ("method", "config", "seed", "cache", "contamination", "selection") if k not in raw]
    if missing:
        raise ModelDirError(f"{file} lacks the keys {missing}; it was not written by this funad, re-run `funad fit`")
    if raw["method"] not in METHODS:
        raise ModelDirError(f"{file}: unknown method {raw['method']!r}; expected one of {list(METHODS)}")
    return ModelInfo(
        path=path,
        method=raw["method"],
        preset=raw.get("preset"),
        config=raw["config"],
        seed=int(raw["seed"]),
        cache=raw["cache"],
        contamination=raw["contamination"],
        selection=raw["selection"],
        funad_version=raw.get("funad_version", "unknown"),
        raw=raw,
    )


def build_model(method: str, config: dict, device: Optional[torch.device] = None) -> Any:
    """An unfitted estimator for ``method`` built from its ``config.json`` config dict.

    ``device`` places a baseline's bank (default: where its training
    features are); FUN-AD takes its device in ``fit``. The baselines'
    settings are listed in :mod:`funad.pipelines.baselines`.
    """
    if method == "funad":
        from funad.config import FunADConfig
        from funad.model import FunAD

        return FunAD(FunADConfig.from_dict(config))
    if method in BASELINES:
        from .baselines import build

        return build(method, config, device=device)
    raise ModelDirError(f"unknown method {method!r}; expected one of {list(METHODS)}")


def load_model_dir(path: PathLike) -> tuple[Any, ModelInfo]:
    """Load a finished model directory.

    Returns ``(model, info)``: ``model`` is a fitted ``funad.model.FunAD`` or
    ``funad.knn.KNNScorer`` (``score_patches(x (n, P, D)) -> (n, P)``,
    ``score_images(x) -> (n,)``), ``info`` the parsed :class:`ModelInfo`.
    Raises :class:`ModelDirError` naming the missing or unreadable file.
    """
    info = read_config(path)
    if info.raw.get("complete") is False:
        raise ModelDirError(
            f"{info.path / CONFIG_FILE} says the fit did not finish; "
            f"run `funad fit ... -o {info.path} --resume` to complete it"
        )
    state = load_weights(info.path)
    model = build_model(info.method, info.config)
    try:
        model.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ModelDirError(
            f"{info.path / MODEL_FILE} does not match the {info.method} model in {CONFIG_FILE} ({exc}); re-run `funad fit`"
        ) from exc
    return model, info


def _comparable(v: Any) -> Any:
    """JSON form with floats rounded to 6 digits (mean/std survive float32 round trips)."""
    v = _jsonable(v)
    if isinstance(v, list):
        return [_comparable(x) for x in v]
    return round(v, 6) if isinstance(v, float) else v


def attr_differences(model_attrs: dict, other: dict, keys, other_name: str) -> list[str]:
    """``"key: model X vs <other_name> Y"`` for every key in ``keys`` both sides record differently."""
    return [f"{key}: model {model_attrs[key]!r} vs {other_name} {other[key]!r}" for key in keys
            if key in model_attrs and key in other and _comparable(model_attrs[key]) != _comparable(other[key])]


def check_cache_compatible(info: ModelInfo, attrs: dict, *, what: str = "the cache") -> None:
    """Raise ModelDirError when ``attrs`` (a store's attrs) define other features than the model's.

    Compares the feature-defining attributes in :data:`FEATURE_ATTRS` that
    both sides record; the message names every differing value.
    """
    diffs = attr_differences(info.cache.get("attrs", {}), attrs, FEATURE_ATTRS, what)
    if diffs:
        raise ModelDirError(
            f"model {info.path} was fitted on other features than {what}: " + "; ".join(diffs)
            + ". Extract with the model's backbone settings or fit a model on this cache."
        )


# ------------------------------------------------------------ log, checkpoint


def append_log(path: PathLike, record: dict) -> None:
    """Append one JSON line to ``path/train_log.jsonl`` (flushed and fsynced)."""
    with open(Path(path) / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_log(path: PathLike) -> list[dict]:
    """Records of ``path/train_log.jsonl``; a torn last line (crash) is dropped."""
    file = Path(path) / LOG_FILE
    if not file.is_file():
        return []
    records = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: dropping an unreadable line (interrupted write)", file)
    return records


def truncate_log(path: PathLike, n_records: int) -> None:
    """Keep the first ``n_records`` records of the log (used on --resume)."""
    file = Path(path) / LOG_FILE
    records = read_log(path)[:n_records]
    text = "".join(json.dumps(r) + "\n" for r in records)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(file, write)


def save_checkpoint(path: PathLike, state: dict) -> None:
    """``torch.save`` the fit's checkpoint to ``path/checkpoint.pt`` atomically."""
    atomic_write(Path(path) / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: PathLike) -> Optional[dict]:
    """The checkpoint in ``path/checkpoint.pt``, or None when there is none."""
    file = Path(path) / CHECKPOINT_FILE
    if not file.is_file():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise ModelDirError(f"{file} cannot be read ({exc}); delete it or re-run with --overwrite") from exc
