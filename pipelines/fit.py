"""``funad fit``: train FUN-AD (or the kNN baseline) on a feature cache.

The stage never opens an image. It reads the store's sample table to build
the (possibly contaminated) training split, makes a feature source over the
training images (in memory or streamed, see :mod:`funad.pipelines.features`),
fits the estimator and writes the model directory described in
:mod:`funad.pipelines.modeldir`.

Contamination follows the paper (FUNAD_SPEC.md, "Contamination protocol"):
``round(ratio * n_normal_train)`` test anomalies, chosen with ``seed``, join
the unlabelled training set; with ``overlap`` they also stay in the test set.
The moved ids and sample paths are recorded in ``config.json``.

Model selection keeps the final epoch. ``select="oracle"`` reproduces the
reference code's protocol (score the test split after each epoch, keep the
epoch with the best mean of image and pixel AUROC); it uses test labels, is
logged as such and is recorded as ``"selection": "oracle"``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from funad import __version__, cache
from funad.config import DEFAULT_PRESET, PRESETS, preset as make_preset

from . import modeldir
from .errors import PipelineError
from .device import resolve_device
from .features import RESIDENCIES, make_source, patch_labels
from .progress import NullProgress, Progress

logger = logging.getLogger(__name__)

METHODS = modeldir.METHODS
SELECTIONS = modeldir.SELECTIONS

ORACLE_WARNING = (
    "--select oracle chooses the epoch by its image+pixel AUROC on the TEST labels (the reference code's "
    "protocol); the resulting numbers are optimistic and labelled 'oracle' wherever they appear"
)


@dataclass(frozen=True)
class FitSpec:
    """Everything that defines a fit apart from the paths (the ``funad fit`` options).

    ``overrides`` are ``--set NAME=VALUE`` pairs, already parsed to their
    FunADConfig types; ``epochs`` and ``seed`` override the preset when given.
    """

    method: str = "funad"
    preset: str = DEFAULT_PRESET
    overrides: tuple[tuple[str, Any], ...] = ()
    epochs: Optional[int] = None
    seed: int = 0
    contamination: float = 0.0
    overlap: bool = False
    coreset_ratio: Optional[float] = None
    select: str = "final"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PipelineError(f"--method must be one of {list(METHODS)}, got {self.method!r}")
        if self.preset not in PRESETS:
            raise PipelineError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.select not in SELECTIONS:
            raise PipelineError(f"--select must be one of {list(SELECTIONS)}, got {self.select!r}")
        if not 0.0 <= self.contamination <= 1.0 or not np.isfinite(self.contamination):
            raise PipelineError(f"--contamination is an anomaly-to-normal ratio in [0, 1], got {self.contamination}")
        if self.coreset_ratio is not None and not 0.0 < self.coreset_ratio <= 1.0:
            raise PipelineError(f"--coreset-ratio must lie in (0, 1], got {self.coreset_ratio}")
        if self.method == "knn" and self.select == "oracle":
            raise PipelineError("--select oracle applies to --method funad only (kNN has no epochs)")

    def model_config(self) -> dict:
        """The estimator's full config dict, as stored in config.json["config"]."""
        if self.method == "knn":
            return {"coreset_ratio": self.coreset_ratio, "seed": int(self.seed), "backend": "auto"}
        changes = dict(self.overrides)
        if self.epochs is not None:
            changes["epochs"] = int(self.epochs)
        changes["seed"] = int(self.seed)
        return make_preset(self.preset, **changes).to_dict()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overrides"] = {k: v for k, v in self.overrides}
        return d


@dataclass
class FitResult:
    """What a fit produced."""

    model_dir: Path
    model: Any  # the fitted FunAD or KNNScorer
    config: dict  # the content of config.json
    seconds: float
    log: list = field(default_factory=list)  # the per-epoch records


# ------------------------------------------------------------------ the split


def check_complete(store) -> None:
    """Raise PipelineError when images are still pending extraction."""
    status = np.asarray(store.status)
    pending = int((status == 0).sum())
    if pending:
        first = store.samples[int(np.flatnonzero(status == 0)[0])]["path"]
        raise PipelineError(
            f"cache {store.path} is incomplete: {pending} of {len(status)} images are pending (e.g. {first}); "
            f"re-run `funad extract` with the same arguments to finish it"
        )


def split_cache(store, ratio: float, overlap: bool, seed: int) -> dict:
    """The training/test split of ``store`` with ``ratio`` contamination.

    Only complete images take part (skipped ones never do). A store without
    labels trains on all its train-split images and needs ``ratio == 0``.

    Returns:
        the config.json ``contamination`` record: ratio, overlap, seed,
        labelled, n_normal_train, n_moved, and moved/train/test ids (store
        indices, sorted) with their sample paths.
    """
    usable = store.indices(complete_only=True)
    labels = np.asarray(store.labels)[usable]
    splits = np.asarray(store.splits)[usable]
    labelled = len(usable) > 0 and bool((labels >= 0).all())
    if ratio > 0 and not labelled:
        n_unknown = int((labels < 0).sum())
        raise PipelineError(
            f"cache {store.path} has no labels for {n_unknown} of its {len(usable)} images, so there are no "
            f"known anomalies to move: --contamination must be 0 (got {ratio}). An unlabelled cache trains on "
            f"all its train images as they are"
        )
    from funad.contamination import contaminate

    s = contaminate(labels, splits, ratio, overlap, seed)
    moved, train, test = (usable[np.asarray(a, dtype=np.int64)] for a in (s.moved_idx, s.train_idx, s.test_idx))
    paths = [s["path"] for s in store.samples]
    return {
        "ratio": float(ratio),
        "overlap": bool(overlap),
        "seed": int(seed),
        "labelled": labelled,
        "n_normal_train": int(((labels == 0) & (splits == "train")).sum()) if labelled else None,
        "n_moved": int(len(moved)),
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "moved_ids": [int(i) for i in np.sort(moved)],
        "train_ids": [int(i) for i in np.sort(train)],
        "test_ids": [int(i) for i in np.sort(test)],
        "moved_paths": [paths[i] for i in np.sort(moved)],
        "train_paths": [paths[i] for i in np.sort(train)],
        "test_paths": [paths[i] for i in np.sort(test)],
    }


def check_trainable(store, train_ids: np.ndarray, batch_size: Optional[int]) -> None:
    """Raise PipelineError when there is nothing (or too little) to train on."""
    if len(train_ids) == 0:
        raise PipelineError(
            f"cache {store.path} has no complete training images (split 'train'); extract a dataset with a "
            "train split, or check that its images were not all skipped (`funad cache info`)"
        )
    if batch_size is not None and len(train_ids) < batch_size:
        raise PipelineError(
            f"cache {store.path} has {len(train_ids)} training images, fewer than the batch size {batch_size} "
            f"(the incomplete last batch is dropped, so no step would run); pass --set batch_size={len(train_ids)} "
            "or a smaller value"
        )


def cache_record(store, path: Path) -> dict:
    """config.json["cache"]: where the features came from and what they are."""
    return {
        "path": str(Path(path).resolve()),
        "fingerprint": store.fingerprint(),
        "attrs": dict(store.attrs),
        "format": store.format,
        "n_images": int(store.n_images),
        "grid": [int(g) for g in store.grid],
        "n_patches": int(store.n_patches),
        "feature_dim": int(store.feature_dim),
        "mask_size": [int(s) for s in store.mask_size],
        "dtype": str(store.dtype),
    }


def diagnostics_for(store, train_ids: np.ndarray) -> dict:
    """Labels the fit may log but never act upon (``FunAD.fit(diagnostics=...)``).

    Returns ``{"image_labels": (N,) int64, "patch_labels": (N, P) uint8}``
    for the training images in source order; patch labels are the stored
    masks max-pooled onto the patch grid.
    """
    image_labels = np.asarray(store.labels)[train_ids].astype(np.int64)
    masks = store.read_masks(train_ids)
    return {"image_labels": image_labels, "patch_labels": patch_labels(masks, store.grid)}


# -------------------------------------------------------------------- the fit


class _EpochLogger:
    """The estimator's per-epoch callback: append to train_log.jsonl and drive the bar."""

    def __init__(self, model_dir: Optional[Path], task, n_iter_per_epoch: int, first_epoch: int) -> None:
        self.model_dir, self.task, self.n_iter = model_dir, task, n_iter_per_epoch
        self.records: list[dict] = []
        self.epoch = first_epoch
        self._last = time.perf_counter()

    def __call__(self, record: dict) -> None:
        now = time.perf_counter()
        record = dict(record)
        self.epoch = int(record.get("epoch", self.epoch + 1))
        record.setdefault("epoch", self.epoch)
        record.setdefault("wall_s", now - self._last)
        if self.model_dir is not None:
            modeldir.append_log(self.model_dir, record)
        self.records.append(record)
        fields: dict = {"epoch": self.epoch}
        for key in ("loss", "loss_bce", "loss_ms"):
            if isinstance(record.get(key), (int, float)):
                fields[key] = float(record[key])
        dt = now - self._last
        if dt > 0 and self.n_iter:
            fields["it/s"] = self.n_iter / dt
        self._last = now
        self.task.update(**fields)
        self.task.advance(1)


class _OracleSelector:
    """Scores the test split after each epoch and keeps the best weights (uses TEST labels).

    It sees the weights through the estimator's per-epoch checkpoint state
    (``state["net"]``), builds a scoring copy of the model from them and
    keeps the state with the best mean of image and pixel AUROC (ties: the
    earlier epoch, as the reference code's ``>`` does).
    """

    def __init__(self, config: dict, store, test_ids: np.ndarray, device: torch.device) -> None:
        from .features import load_features

        self.config, self.store, self.device = config, store, device
        self.labels = np.asarray(store.labels)[test_ids].astype(np.int64)
        self.masks = store.read_masks(test_ids)
        self.features = load_features(store, test_ids, device=device)
        self.best: Optional[dict] = None
        self.curve: list[dict] = []

    def __call__(self, state: dict) -> None:
        from funad import anomaly_map, metrics

        weights = {"dim": int(state["dim"]), "n_patches": int(state["n_patches"]), "net": state["net"]}
        model = modeldir.build_model("funad", self.config).load_state_dict(weights, device=self.device)
        scores = model.score_patches(self.features)
        maps = anomaly_map.patch_scores_to_maps(scores, self.store.grid, self.store.mask_size)
        image = metrics.image_metrics(self.labels, scores.max(axis=1))["image_auroc"]
        pixel = metrics.pixel_metrics(self.masks, maps)["pixel_auroc"]
        point = {"epoch": int(state["epoch"]), "image_auroc": image, "pixel_auroc": pixel,
                 "mean": float(np.nanmean([image, pixel]))}
        self.curve.append(point)
        if self.best is None or point["mean"] > self.best["point"]["mean"]:
            self.best = {"point": point, "state": {**model.state_dict(), "config": self.config}}


class _Checkpointer:
    """``on_checkpoint``: write checkpoint.pt at most every ``seconds`` (and always at the end)."""

    def __init__(self, model_dir: Path, epochs: int, seconds: float,
                 oracle: Optional[_OracleSelector] = None) -> None:
        self.model_dir, self.epochs, self.seconds, self.oracle = model_dir, epochs, seconds, oracle
        self._last = time.perf_counter()

    def __call__(self, state: dict) -> None:
        if self.oracle is not None:
            self.oracle(state)
        now = time.perf_counter()
        if now - self._last >= self.seconds or int(state["epoch"]) >= self.epochs:
            modeldir.save_checkpoint(self.model_dir, state)
            self._last = now


def _check_resume(model_dir: Path, config: dict) -> Optional[dict]:
    """Check that ``model_dir`` holds an unfinished fit of the same setup; return its checkpoint."""
    old = modeldir.read_config(model_dir).raw
    old_epochs, new_epochs = old["config"].get("epochs"), config["config"].get("epochs")
    if old.get("complete") and (config["method"] == "knn" or new_epochs <= old_epochs):
        raise PipelineError(f"the fit in {model_dir} already finished; nothing to resume (pass a larger --epochs "
                            "to train on, or --overwrite to re-fit)")
    diffs = []
    for key in ("method", "seed", "selection"):
        if old.get(key) != config[key]:
            diffs.append(f"{key}: {old.get(key)!r} -> {config[key]!r}")
    for key in sorted((set(old["config"]) | set(config["config"])) - {"epochs"}):
        if old["config"].get(key) != config["config"].get(key):
            diffs.append(f"{key}: {old['config'].get(key)!r} -> {config['config'].get(key)!r}")
    if old["cache"].get("fingerprint") != config["cache"]["fingerprint"]:
        diffs.append("cache fingerprint differs (another cache)")
    for key in ("ratio", "overlap", "seed", "train_ids"):
        if old["contamination"].get(key) != config["contamination"][key]:
            diffs.append(f"contamination {key} differs")
    if diffs:
        raise PipelineError(
            f"--resume: {model_dir} was started with other settings ({'; '.join(diffs)}); pass the same options "
            "as the original fit, or --overwrite to start again"
        )
    return modeldir.load_checkpoint(model_dir)


def fit(cache_path, model_dir, spec: FitSpec = FitSpec(), *, device: str = "auto", resident: str = "auto",
        resume: bool = False, overwrite: bool = False, checkpoint_seconds: float = 30.0,
        progress: Progress = NullProgress()) -> FitResult:
    """Fit ``spec`` on the cache at ``cache_path`` and write ``model_dir``.

    Args:
        cache_path: a complete feature store (``funad extract``).
        model_dir: created; must be empty unless ``overwrite`` or ``resume``.
        spec: method, preset, overrides, seed, contamination and selection.
        device: "auto", "cpu" or "cuda".
        resident: where the training features live: "auto", "memory" or "stream".
        resume: continue the fit in ``model_dir`` from checkpoint.pt: an
            interrupted one, or a finished one with a larger ``epochs``. Every
            other setting must match the recorded one.
        checkpoint_seconds: write checkpoint.pt at most this often (the last
            epoch is always written); a checkpoint holds the Local-Net and
            RMSprop state, 3 x (D*D + 1024*D) floats, 28 MB at D = 768.
    Returns:
        A :class:`FitResult`; the model directory is complete when it returns.
    """
    if resident not in RESIDENCIES:
        raise PipelineError(f"--resident must be one of {list(RESIDENCIES)}, got {resident!r}")
    if resume and overwrite:
        raise PipelineError("--resume and --overwrite contradict each other; pass one of them")
    dev = resolve_device(device)
    model_dir = Path(model_dir)
    model_config = spec.model_config()
    start = time.perf_counter()

    with cache.open(cache_path, mode="r") as store:
        check_complete(store)
        split = split_cache(store, spec.contamination, spec.overlap, spec.seed)
        train_ids = np.asarray(split["train_ids"], dtype=np.int64)
        check_trainable(store, train_ids, model_config.get("batch_size"))
        if spec.select == "oracle" and not split["labelled"]:
            raise PipelineError(f"--select oracle needs test labels, and cache {store.path} has none")
        config = {
            "method": spec.method,
            "preset": spec.preset if spec.method == "funad" else None,
            "config": model_config,
            "seed": int(spec.seed),
            "options": spec.to_dict(),
            "cache": cache_record(store, Path(cache_path)),
            "contamination": split,
            "selection": spec.select,
            "funad_version": __version__,
            "device": str(dev),
            "complete": False,
        }
        if resume and not (model_dir / modeldir.CONFIG_FILE).is_file():
            raise PipelineError(f"--resume: {model_dir / modeldir.CONFIG_FILE} does not exist; start the fit without --resume")
        checkpoint = _check_resume(model_dir, config) if resume else None
        modeldir.prepare_model_dir(model_dir, overwrite=overwrite, resume=resume)
        modeldir.write_config(model_dir, config)  # complete: false until the weights are written
        if spec.select == "oracle":
            logger.warning(ORACLE_WARNING)
        logger.info("fitting %s on %d images of %s (%d moved anomalies, ratio %g, %s) on %s",
                    spec.method, len(train_ids), store.path, split["n_moved"], spec.contamination,
                    "overlap" if spec.overlap else "no overlap", dev)

        source = make_source(store, train_ids, resident=resident, device=dev, progress=progress)
        model = modeldir.build_model(spec.method, model_config, device=dev)
        log: list[dict] = []
        oracle_record = None
        if spec.method == "knn":
            model.fit(source)
            state = model.state_dict()
        else:
            state, log, oracle_record = _fit_funad(model, store, source, split, model_config, model_dir, checkpoint,
                                                   dev, spec.select == "oracle", checkpoint_seconds, progress)

    modeldir.save_weights(model_dir, state)
    if oracle_record is not None:
        model.load_state_dict(state, device=dev)
        config["oracle"] = {"warning": ORACLE_WARNING, **oracle_record}
    config["complete"] = True
    config["fit_seconds"] = time.perf_counter() - start
    config["epochs_logged"] = len(modeldir.read_log(model_dir)) if spec.method == "funad" else 0
    modeldir.write_config(model_dir, config)
    logger.info("model written to %s in %.1f s", model_dir, config["fit_seconds"])
    return FitResult(model_dir=model_dir, model=model, config=config, seconds=config["fit_seconds"], log=log)


def _fit_funad(model, store, source, split: dict, model_config: dict, model_dir: Path, checkpoint: Optional[dict],
               dev: torch.device, oracle: bool, checkpoint_seconds: float,
               progress: Progress) -> tuple[dict, list, Optional[dict]]:
    """Run ``FunAD.fit`` with logging, checkpoints and (optionally) oracle selection.

    Returns ``(state to save, per-epoch records, oracle record or None)``.
    """
    train_ids = np.asarray(split["train_ids"], dtype=np.int64)
    epochs = int(model_config["epochs"])
    done = _checkpoint_epoch(checkpoint)
    if checkpoint is not None:
        modeldir.truncate_log(model_dir, done)
        logger.info("resuming %s from epoch %d of %d", model_dir, done, epochs)
    elif (model_dir / modeldir.LOG_FILE).exists():  # --resume before the first checkpoint was written
        logger.warning("%s has no checkpoint yet; the fit starts again from epoch 1", model_dir)
        modeldir.truncate_log(model_dir, 0)

    selector = None
    if oracle:
        if checkpoint is not None:
            logger.warning("--select oracle after --resume only compares the epochs from %d on", done + 1)
        selector = _OracleSelector(model_config, store, np.asarray(split["test_ids"], dtype=np.int64), dev)
    task = progress.task("fit", total=epochs, unit="epoch")
    task.advance(done)
    callback = _EpochLogger(model_dir, task, len(train_ids) // int(model_config["batch_size"]), done)
    diagnostics = diagnostics_for(store, train_ids) if split["labelled"] else None
    model.fit(source, device=dev, callback=callback, diagnostics=diagnostics, checkpoint=checkpoint,
              on_checkpoint=_Checkpointer(model_dir, epochs, checkpoint_seconds, selector), checkpoint_every=1)
    if selector is not None and selector.best is not None:
        best = selector.best["point"]
        logger.warning("ORACLE selection kept epoch %d (test image AUROC %.4f, pixel AUROC %.4f)",
                       best["epoch"], best["image_auroc"], best["pixel_auroc"])
        return selector.best["state"], callback.records, {**best, "curve": selector.curve}
    return model.state_dict(), callback.records, None


def _checkpoint_epoch(checkpoint: Optional[dict]) -> int:
    """Epochs completed in ``checkpoint`` (0 without one)."""
    if checkpoint is None:
        return 0
    for key in ("epoch", "epochs_done", "completed_epochs"):
        if key in checkpoint:
            return int(checkpoint[key])
    raise PipelineError("checkpoint.pt records no epoch count; delete it or re-run with --overwrite")
