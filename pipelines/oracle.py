"""``--select oracle``: score the test split after each epoch and keep the best weights (uses TEST labels).

This reproduces the reference code's protocol for comparison with the paper.
It is never the default; models it selects are recorded and reported as
"oracle" everywhere.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import modeldir
from .features import load_features
from .scoring import MAP_SIGMA, measure, score_tensor

ORACLE_WARNING = (
    "--select oracle chooses the epoch by its image+pixel AUROC on the TEST labels (the reference code's "
    "protocol); the resulting numbers are optimistic and labelled 'oracle' wherever they appear"
)


class TestScorer:
    """Measures an epoch's weights on the test split exactly as ``funad eval`` does (uses TEST labels).

    Called with a checkpoint state, it builds a scoring copy of the model from
    ``state["net"]``, scores the test images and returns the metrics of
    :func:`funad.pipelines.scoring.measure` (same map sigma). It measures the
    Local-Net's own scores, also with ``scorer=clean_knn``, whose clean-image
    bank exists only once an epoch is chosen.
    """

    def __init__(self, config: dict, store, test_ids: np.ndarray, device: torch.device) -> None:
        self.config, self.grid, self.device = config, store.grid, device
        self.labels = np.asarray(store.labels)[test_ids].astype(np.int64)
        self.masks = store.read_masks(test_ids)
        self.features = load_features(store, test_ids, device=device)

    def model(self, state: dict):
        weights = {"dim": int(state["dim"]), "n_patches": int(state["n_patches"]), "net": state["net"]}
        return modeldir.build_model("funad", {**self.config, "scorer": "localnet"}).load_state_dict(
            weights, device=self.device)

    def metrics(self, model) -> dict:
        scores, images = score_tensor(model, self.features, device=self.device, with_images=True)
        return measure(scores, self.labels, self.masks, self.grid, sigma=MAP_SIGMA, device=self.device,
                       image_scores=images).metrics


class OracleSelector(TestScorer):
    """Called with each epoch's checkpoint state; keeps the state with the best mean of image and pixel AUROC.

    Ties keep the earlier epoch, as the reference code's ``>`` does.
    """

    def __init__(self, config: dict, store, test_ids: np.ndarray, device: torch.device) -> None:
        super().__init__(config, store, test_ids, device)
        self.best: Optional[dict] = None
        self.curve: list[dict] = []

    def __call__(self, state: dict) -> None:
        model = self.model(state)
        values = self.metrics(model)
        image, pixel = values["image_auroc"], values["pixel_auroc"]
        point = {"epoch": int(state["epoch"]), "image_auroc": image, "pixel_auroc": pixel,
                 "mean": float(np.nanmean([image, pixel]))}
        self.curve.append(point)
        if self.best is None or point["mean"] > self.best["point"]["mean"]:
            self.best = {"point": point, "state": {**model.state_dict(), "config": self.config}}

    def record(self) -> Optional[dict]:
        """config.json["oracle"] without the warning: the chosen epoch, its AUROCs and the whole curve."""
        return None if self.best is None else {**self.best["point"], "curve": self.curve}


LEARNING_CURVE_NOTE = "diagnostic on TEST labels; never used to select epochs, thresholds or settings"


class LearningCurve(TestScorer):
    """``--eval-every N``: test metrics every N epochs, added to that epoch's training-log record.

    A diagnostic that shows where training saturates. It never changes the
    fit: the final epoch is kept whatever the curve says. The values land in
    ``train_log.jsonl`` under ``test_image_auroc``, ``test_pixel_auroc`` and
    ``test_aupro``, with ``test_metrics_note`` saying that they use test labels.
    With ``ema`` set they are the averaged weights' and the same keys ending in
    ``_last_weights`` hold the last weights'. With the default probability
    scores, the keys ending in ``_logit`` hold the same weights' metrics with
    ``score_space=logit``. With ``scorer=clean_knn`` (and ``training`` set)
    each point builds the clean-image bank with that epoch's weights, so the
    main keys are what the model would score had the fit stopped there; the
    keys ending in ``_localnet`` hold the Local-Net's own scores.
    """

    def __init__(self, config: dict, store, test_ids: np.ndarray, device: torch.device, every: int,
                 last_epoch: int) -> None:
        super().__init__(config, store, test_ids, device)
        self.every, self.last_epoch = every, last_epoch
        self.training = None  # (training features in fit's order, their synthetic flags) for scorer=clean_knn

    def _clean_knn(self, model) -> tuple[dict, dict]:
        """(metrics with a clean-image bank built from the current weights, the Local-Net's own metrics)."""
        source, synthetic = self.training
        model.fit_clean_bank(source, synthetic=synthetic)
        try:
            with_bank = self.metrics(model)
        finally:
            model.knn_, model.clean_images_ = None, None  # the fit builds the model's own bank at its end
        return with_bank, self.metrics(model)

    def __call__(self, model, epoch: int) -> dict:
        """The test metrics of ``model`` (being fitted, at the end of ``epoch``), or {} when not due."""
        if epoch % self.every and epoch != self.last_epoch:
            return {}
        out = {}
        if model.config.scorer == "clean_knn" and self.training is not None:
            values, local = self._clean_knn(model)
            out.update({"test_image_auroc_localnet": local["image_auroc"],
                        "test_pixel_auroc_localnet": local["pixel_auroc"], "test_aupro_localnet": local["aupro"]})
        else:
            values = self.metrics(model)
        out.update({"test_image_auroc": values["image_auroc"], "test_pixel_auroc": values["pixel_auroc"],
                    "test_aupro": values["aupro"], "test_metrics_note": LEARNING_CURVE_NOTE})
        if model.config.bounded_scores:
            # the same weights scored by their logit (score_space=logit, inference only) go beside
            # them, so one fit shows both curves
            config, model.config = model.config, model.config.replace(score_space="logit")
            try:
                logit = self.metrics(model)
            finally:
                model.config = config
            out.update({"test_image_auroc_logit": logit["image_auroc"],
                        "test_pixel_auroc_logit": logit["pixel_auroc"], "test_aupro_logit": logit["aupro"]})
        trained = getattr(model, "trained_net_", None)
        if trained is not None and trained is not model.net_:
            # ema: the model scores with the weights' average; the last weights go beside it, so one
            # fit shows both curves (the training itself is the same either way)
            averaged, model.net_ = model.net_, trained
            try:
                last = self.metrics(model)
            finally:
                model.net_ = averaged
            out.update({"test_image_auroc_last_weights": last["image_auroc"],
                        "test_pixel_auroc_last_weights": last["pixel_auroc"],
                        "test_aupro_last_weights": last["aupro"]})
        return out
