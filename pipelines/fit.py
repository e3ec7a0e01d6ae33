"""``funad fit``: train FUN-AD (or a baseline) on a feature cache and write a model directory.

The stage never opens an image. It reads the store's sample table to build
the (possibly contaminated) training split (:mod:`funad.pipelines.fit_data`),
makes a feature source over the training images (in memory or streamed, see
:mod:`funad.pipelines.features`), fits the estimator and writes the model
directory described in :mod:`funad.pipelines.modeldir`. Checkpoints and
``--resume``: :mod:`funad.pipelines.checkpoints`.

Model selection keeps the final epoch. ``select="oracle"`` reproduces the
reference code's protocol (:mod:`funad.pipelines.oracle`); it uses test
labels, is logged as such and is recorded as ``"selection": "oracle"``.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from funad import __version__, cache
from funad.config import FunADConfig

from . import modeldir, thresholds
from .checkpoints import Checkpointer, check_resume, check_trained_from, checkpoint_epoch
from .device import has_native_bf16, resolve_device
from .errors import PipelineError
from .features import RESIDENCIES, TOKENS, FirstImages, check_tokens, make_source
from . import sample_table
from .fit_data import (cache_record, check_complete, check_trainable, clean_bank_record, diagnostics_for,
                       split_cache, synthetic_ids, synthetic_labels)
from .oracle import ORACLE_WARNING, LearningCurve, OracleSelector
from .progress import NullProgress, Progress
from .settings import DEFAULT_PRESET, PRESETS, model_config

logger = logging.getLogger(__name__)

METHODS = modeldir.METHODS
SELECTIONS = modeldir.SELECTIONS


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
    synthetic: Optional[bool] = None  # FUN-AD* images: None = use them when the cache holds them, False = never
    tokens: str = "patch"  # "patch", or "class": the image-level variant on the class tokens alone (P = 1)
    threshold_rule: str = thresholds.DEFAULT_RULE
    expected_contamination: float = thresholds.DEFAULT_EXPECTED_CONTAMINATION
    pixel_quantile: Optional[float] = thresholds.DEFAULT_PIXEL_QUANTILE

    def __post_init__(self) -> None:
        self.rule()  # raises ConfigError naming a bad --threshold-rule or --expected-contamination
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
        if self.method != "funad" and self.select == "oracle":
            raise PipelineError(f"--select oracle applies to --method funad only ({self.method} has no epochs)")
        if self.synthetic and self.method != "funad":
            raise PipelineError(f"--synthetic applies to --method funad only ({self.method} would take the "
                                "synthetic anomalies for normal images)")
        if self.tokens not in TOKENS:
            raise PipelineError(f"--tokens must be one of {list(TOKENS)}, got {self.tokens!r}")
        if self.tokens == "class" and self.select == "oracle":
            raise PipelineError("--select oracle measures pixel metrics, which --tokens class does not have")

    def rule(self):
        """The unlabelled threshold rule (:mod:`funad.pipelines.thresholds`)."""
        return thresholds.rule_for(self.method, self.threshold_rule, self.expected_contamination,
                                   pixel_quantile=self.pixel_quantile,
                                   config=self.model_config() if self.method == "funad" else None)

    def model_config(self) -> dict:
        """The estimator's full config dict, as stored in config.json["config"]."""
        overrides = self.overrides
        if self.synthetic is False and self.method == "funad":
            overrides = tuple(overrides) + (("synthetic", "off"),)  # --no-synthetic
        return model_config(self.method, self.preset, overrides=overrides, epochs=self.epochs, seed=self.seed,
                            coreset_ratio=self.coreset_ratio)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overrides"] = {k: v for k, v in self.overrides}
        return d


@dataclass
class FitResult:
    """What a fit produced."""

    model_dir: Path
    model: Any  # the fitted FunAD or baseline scorer
    config: dict  # the content of config.json
    seconds: float
    log: list = field(default_factory=list)  # the per-epoch records


class _EpochLogger:
    """The estimator's per-epoch callback: append to train_log.jsonl and drive the bar (losses, it/s)."""

    def __init__(self, model_dir: Optional[Path], task, n_iter_per_epoch: int, first_epoch: int,
                 curve: Optional[LearningCurve] = None, model=None) -> None:
        self.model_dir, self.task, self.n_iter = model_dir, task, n_iter_per_epoch
        self.curve, self.model = curve, model
        self.records: list[dict] = []
        self.epoch = first_epoch
        self._last = time.perf_counter()

    def __call__(self, record: dict) -> None:
        now = time.perf_counter()
        record = dict(record)
        self.epoch = int(record.get("epoch", self.epoch + 1))
        record.setdefault("epoch", self.epoch)
        record.setdefault("wall_s", now - self._last)
        if self.curve is not None:
            record.update(self.curve(self.model, self.epoch))
        if self.model_dir is not None:
            modeldir.append_log(self.model_dir, record)
        self.records.append(record)
        fields: dict = {}
        for key, shown in (("loss", "loss"), ("loss_bce", "bce"), ("loss_ms", "ms")):
            if isinstance(record.get(key), (int, float)):
                fields[shown] = float(record[key])
        dt = now - self._last
        if dt > 0 and self.n_iter:
            fields["it/s"] = self.n_iter / dt
        self._last = now
        self.task.update(**fields)
        self.task.advance(1)


def _say_epoch_cap(config_dict: dict, n_train: int, *, asked: bool) -> None:
    """Say when ``max_iterations`` runs fewer epochs than configured: a warning if ``--epochs`` asked for them."""
    cfg = FunADConfig.from_dict(config_dict)
    runs = cfg.epochs_for(n_train)
    if runs < cfg.epochs:
        (logger.warning if asked else logger.info)(
            "%d training images: this fit runs %d of its %d epochs, because max_iterations=%d caps it at that many "
            "steps (the preset's time budget); add --set max_iterations=none to run all %d", n_train, runs,
            cfg.epochs, cfg.max_iterations, cfg.epochs)


def fit(cache_path, model_dir, spec: FitSpec = FitSpec(), *, device: str = "auto", resident: str = "auto",
        resume: bool = False, overwrite: bool = False, checkpoint_seconds: float = 30.0,
        keep_checkpoint: bool = False, eval_every: Optional[int] = None, trained_from=None,
        progress: Progress = NullProgress()) -> FitResult:
    """Fit ``spec`` on the cache at ``cache_path`` and write ``model_dir``.

    Args:
        cache_path: a complete feature store (``funad extract``).
        model_dir: created; must be empty unless ``overwrite`` or ``resume``.
        spec: method, preset, overrides, seed, contamination and selection.
        device: "auto", "cpu" or "cuda".
        resident: where the training features live: "auto", "memory" or "stream".
        resume: continue the fit in ``model_dir`` from checkpoint.pt: an
            interrupted one, or a finished one (fitted with
            ``keep_checkpoint``) with a larger ``epochs``. Every other setting
            must match the recorded one.
        checkpoint_seconds: write checkpoint.pt at most this often, and on
            Ctrl-C; a checkpoint holds the Local-Net and RMSprop state,
            3 x (D*D + 1024*D) floats, 28 MB at D = 768.
        keep_checkpoint: keep checkpoint.pt beside the finished model (it is
            removed otherwise; only a kept one lets ``resume`` extend the fit).
        eval_every: a diagnostic: every this many epochs (and at the last),
            measure the test split and add its AUROCs and AUPRO to the
            epoch's train_log.jsonl record. Uses test labels; never selects anything.
        trained_from: a finished FUN-AD model directory to take the trained Local-Net from instead of training
            (``--from-model``): ``spec`` may differ from its fit only in settings that act after training
            (``scorer``, ``clean_share``... and the thresholds' options), which this fit applies
            (``FunAD.adopt_training``: the model a fit with ``spec`` would give). Its training log is copied.
    Returns:
        A :class:`FitResult`; the model directory is complete when it returns.
    """
    if resident not in RESIDENCIES:
        raise PipelineError(f"--resident must be one of {list(RESIDENCIES)}, got {resident!r}")
    if resume and overwrite:
        raise PipelineError("--resume and --overwrite contradict each other; pass one of them")
    if eval_every is not None and (eval_every < 1 or spec.method != "funad"):
        raise PipelineError(f"--eval-every takes a number of epochs >= 1 and applies to --method funad only "
                            f"(got {eval_every} with --method {spec.method})")
    dev = resolve_device(device)
    model_dir = Path(model_dir)
    if trained_from is not None:
        trained_from = Path(trained_from)
        if resume:
            raise PipelineError("--from-model and --resume contradict each other: --from-model trains nothing")
        if eval_every is not None:
            raise PipelineError("--eval-every logs a learning curve while training, and --from-model trains nothing "
                                f"(the training log of {trained_from} has the curve if that fit logged one)")
        if trained_from.resolve() == model_dir.resolve():
            raise PipelineError(f"--from-model {trained_from} is the output directory; write the model scored "
                                "anew to another -o")
    config_dict = spec.model_config()
    start = time.perf_counter()

    with cache.open(cache_path, mode="r") as store:
        check_complete(store)
        check_tokens(store, spec.tokens)
        split = split_cache(store, spec.contamination, spec.overlap, spec.seed)
        split["synthetic_ids"] = synthetic_ids(store, config_dict.get("synthetic", "off"), spec.synthetic).tolist()
        train_ids = training_ids(split)
        check_trainable(store, train_ids, config_dict.get("batch_size"))
        if spec.select == "oracle" and not split["labelled"]:
            raise PipelineError(f"--select oracle needs test labels, and cache {store.path} has none")
        config = {
            "method": spec.method,
            "preset": spec.preset if spec.method == "funad" else None,
            "config": config_dict,
            "seed": int(spec.seed),
            "options": spec.to_dict(),
            "cache": cache_record(store, Path(cache_path)),
            "contamination": split,
            "sample_table": sample_table.record(store, split),  # found again by eval after the cache grows
            "selection": spec.select,
            "tokens": spec.tokens,
            "funad_version": __version__,
            "device": str(dev),
            "complete": False,
        }
        checkpoint = check_resume(model_dir, config) if resume else None
        trained, trained_config = check_trained_from(trained_from, config) if trained_from is not None else (None, None)
        modeldir.prepare_model_dir(model_dir, overwrite=overwrite, resume=resume)
        modeldir.write_config(model_dir, config)  # complete: false until the weights are written
        if spec.select == "oracle":
            logger.warning(ORACLE_WARNING)
        logger.info("%s %s on %d images of %s on %s (%s tokens, %d synthetic)",
                    "fitting" if trained is None else f"scoring the Local-Net of {trained_from} anew:", spec.method,
                    len(train_ids), store.path, dev, spec.tokens, len(split["synthetic_ids"]))
        if spec.method == "funad" and trained is None:
            _say_epoch_cap(config_dict, len(train_ids), asked=spec.epochs is not None)
        if spec.method == "funad" and not config_dict.get("bf16") and has_native_bf16(dev):
            logger.info("The %s device has native bf16 arithmetic: --set bf16=true ran a --preset fast bottle fit "
                        "1.56x faster at the same accuracy (3 seeds, bottle and KolektorSDD; BENCHMARKS.md). It "
                        "stays off by default so that a fit gives the same numbers on every machine.", dev)
        if spec.tokens == "class" and eval_every is not None:
            raise PipelineError("--eval-every measures pixel metrics, which --tokens class does not have")

        source = make_source(store, train_ids, resident=resident, device=dev, progress=progress, tokens=spec.tokens)
        model = modeldir.build_model(spec.method, config_dict, device=dev)
        log: list[dict] = []
        oracle_record = None
        if trained is not None:
            synthetic = np.isin(train_ids, split["synthetic_ids"])
            model.adopt_training(trained, source, device=dev, synthetic=synthetic if synthetic.any() else None)
            state = model.state_dict()
            if (trained_from / modeldir.LOG_FILE).is_file():
                modeldir.atomic_write(model_dir / modeldir.LOG_FILE,
                                      lambda tmp: shutil.copyfile(trained_from / modeldir.LOG_FILE, tmp))
            config["trained_by"] = {"model_dir": str(trained_from.resolve()),
                                    "fit_seconds": trained_config.get("fit_seconds")}
        elif spec.method == "funad":
            state, log, oracle_record = _fit_funad(model, store, source, split, config_dict, model_dir, checkpoint,
                                                   dev, spec.select == "oracle", checkpoint_seconds,
                                                   keep_checkpoint, eval_every, progress, spec.tokens)
        else:
            model.fit(source)
            state = model.state_dict()
        real = source if not split["synthetic_ids"] else FirstImages(source, len(split["train_ids"]))
        if oracle_record is not None:
            model.load_state_dict(state, device=dev)
            config["oracle"] = {"warning": ORACLE_WARNING, **oracle_record}
            if model.config.scorer == "clean_knn":  # the chosen epoch's φ picks the clean images again
                state = model.fit_clean_bank(real).state_dict()
        if spec.method == "funad" and model.config.scorer == "clean_knn":
            config["clean_bank"] = clean_bank_record(model, store, split)
        # Decide without labels: thresholds from the training images' scores (no label is read).
        grid, mask_size = ((1, 1), (1, 1)) if spec.tokens == "class" else (store.grid, store.mask_size)
        config[thresholds.THRESHOLD_KEY] = thresholds.fit_thresholds(model, spec.method, real, grid, mask_size,
                                                                     spec.rule(), dev, progress)

    modeldir.save_weights(model_dir, state)
    config["complete"] = True
    config["fit_seconds"] = time.perf_counter() - start
    config["epochs_logged"] = len(modeldir.read_log(model_dir)) if spec.method == "funad" else 0
    modeldir.write_config(model_dir, config)
    if not keep_checkpoint:
        (model_dir / modeldir.CHECKPOINT_FILE).unlink(missing_ok=True)
    logger.debug("model written to %s in %.1f s", model_dir, config["fit_seconds"])
    return FitResult(model_dir=model_dir, model=model, config=config, seconds=config["fit_seconds"], log=log)


def training_ids(split: dict) -> np.ndarray:
    """Store indices a fit trains on: the split's training images, then the synthetic ones it uses."""
    return np.concatenate([np.asarray(split["train_ids"], dtype=np.int64),
                           np.asarray(split.get("synthetic_ids", []), dtype=np.int64)])


def _fit_funad(model, store, source, split: dict, config: dict, model_dir: Path, checkpoint: Optional[dict],
               dev: torch.device, oracle: bool, checkpoint_seconds: float, keep_checkpoint: bool,
               eval_every: Optional[int], progress: Progress,
               tokens: str = "patch") -> tuple[dict, list, Optional[dict]]:
    """Run ``FunAD.fit`` with logging, checkpoints (also on Ctrl-C) and, optionally, oracle selection
    and a learning curve on the test split.

    Returns ``(state to save, per-epoch records, oracle record or None)``.
    """
    train_ids = training_ids(split)
    epochs = model.config.epochs_for(len(train_ids))  # fewer than config["epochs"] when max_iterations caps them
    done = checkpoint_epoch(checkpoint)
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
        selector = OracleSelector(config, store, np.asarray(split["test_ids"], dtype=np.int64), dev)
    curve = None
    if eval_every is not None:
        if not split["labelled"] or not split["test_ids"]:
            raise PipelineError(f"--eval-every needs labelled test images, and cache {store.path} has none")
        logger.warning("--eval-every: test metrics are logged every %d epochs as a diagnostic (they use test "
                       "labels and select nothing; the final epoch is kept)", eval_every)
        curve = LearningCurve(config, store, np.asarray(split["test_ids"], dtype=np.int64), dev, eval_every, epochs)
    task = progress.task("fit epoch", total=epochs, unit="epoch")
    task.advance(done)
    callback = _EpochLogger(model_dir, task, len(train_ids) // int(config["batch_size"]), done, curve, model)
    checkpointer = Checkpointer(model_dir, checkpoint_seconds, also=selector)
    diagnostics = diagnostics_for(store, train_ids, tokens) if split["labelled"] else None
    synthetic = np.isin(train_ids, split["synthetic_ids"])
    if curve is not None:
        curve.training = (source, synthetic)
    labels = None
    if synthetic.any() and model.config.synthetic == "mask":
        labels = np.zeros((len(train_ids), source.n_patches), dtype=np.uint8)
        labels[synthetic] = synthetic_labels(store, train_ids[synthetic], tokens)
    try:
        model.fit(source, device=dev, callback=callback, diagnostics=diagnostics, checkpoint=checkpoint,
                  on_checkpoint=checkpointer, checkpoint_every=1, synthetic=synthetic, synthetic_labels=labels)
    except KeyboardInterrupt:
        saved = checkpointer.flush()
        if saved is None:
            logger.warning("interrupted before the first epoch finished; nothing to checkpoint in %s", model_dir)
        else:
            logger.warning("interrupted: epoch %d of %d saved in %s; continue with `funad fit ... -o %s --resume`",
                           saved, epochs, model_dir / modeldir.CHECKPOINT_FILE, model_dir)
        raise
    if keep_checkpoint:
        checkpointer.flush()
    if selector is not None and selector.best is not None:
        best = selector.best["point"]
        logger.debug("ORACLE selection kept epoch %d (test image AUROC %.4f, pixel AUROC %.4f)",
                     best["epoch"], best["image_auroc"], best["pixel_auroc"])
        return selector.best["state"], callback.records, selector.record()
    return model.state_dict(), callback.records, None
