"""The training checkpoint of ``funad fit``: when it is written, what ``--resume`` accepts, and Ctrl-C; and
what ``--from-model`` accepts: a finished fit whose Local-Net another fit may score with.

``checkpoint.pt`` holds the Local-Net and RMSprop state and the RNG states
after an epoch (``FunAD.fit(on_checkpoint=...)``), so a resumed fit gives the
weights of an uninterrupted one. It is written at most every
``checkpoint_seconds``, and when the fit is interrupted (Ctrl-C) with the
last finished epoch. ``funad fit`` removes it once the model is complete
unless ``--keep-checkpoint`` is given; only a kept checkpoint lets
``--resume --epochs N`` extend a finished fit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

from . import modeldir
from .errors import PipelineError

logger = logging.getLogger(__name__)


class Checkpointer:
    """``on_checkpoint``: keep each epoch's state, write checkpoint.pt at most every ``seconds``.

    ``flush()`` writes the last state received when it is not on disk yet
    (on an interruption, or to keep the final checkpoint). ``also`` is called
    with every state first (the oracle selector).
    """

    def __init__(self, model_dir: Path, seconds: float, also: Optional[Callable[[dict], None]] = None) -> None:
        self.model_dir, self.seconds, self.also = model_dir, seconds, also
        self.state: Optional[dict] = None  # the last state received
        self.written_epoch: Optional[int] = None
        self._last = time.perf_counter()

    def __call__(self, state: dict) -> None:
        if self.also is not None:
            self.also(state)
        self.state = state
        if time.perf_counter() - self._last >= self.seconds:
            self.flush()

    def flush(self) -> Optional[int]:
        """Write the last state unless it is written already; returns its epoch (None without a state)."""
        if self.state is None:
            return None
        epoch = checkpoint_epoch(self.state)
        if self.written_epoch != epoch:
            modeldir.save_checkpoint(self.model_dir, self.state)
            self.written_epoch = epoch
            self._last = time.perf_counter()
        return epoch


def checkpoint_epoch(checkpoint: Optional[dict]) -> int:
    """Epochs completed in ``checkpoint`` (0 without one)."""
    if checkpoint is None:
        return 0
    for key in ("epoch", "epochs_done", "completed_epochs"):
        if key in checkpoint:
            return int(checkpoint[key])
    raise PipelineError("checkpoint.pt records no epoch count; delete it or re-run with --overwrite")


def check_resume(model_dir: Path, config: dict) -> Optional[dict]:
    """Check that ``model_dir`` holds an unfinished fit of the same setup (or a finished one to extend).

    Returns its checkpoint, or None when an unfinished fit wrote none yet.
    Raises PipelineError naming every differing setting, or when a finished
    fit cannot be extended.
    """
    config_file = model_dir / modeldir.CONFIG_FILE
    if not config_file.is_file():
        raise PipelineError(f"--resume: {config_file} does not exist; start the fit without --resume")
    old = modeldir.read_config(model_dir).raw
    old_epochs, new_epochs = old["config"].get("epochs"), config["config"].get("epochs")
    finished = bool(old.get("complete"))
    if finished and (config["method"] != "funad" or new_epochs <= old_epochs):
        raise PipelineError(f"the fit in {model_dir} already finished; nothing to resume (pass a larger --epochs "
                            "to train on, or --overwrite to re-fit)")
    diffs = _differences(old, config, ignore={"epochs"})
    if diffs:
        raise PipelineError(
            f"--resume: {model_dir} was started with other settings ({'; '.join(diffs)}); pass the same options "
            "as the original fit, or --overwrite to start again"
        )
    checkpoint = modeldir.load_checkpoint(model_dir)
    if finished and checkpoint is None:
        raise PipelineError(
            f"--resume --epochs {new_epochs}: the fit in {model_dir} finished after {old_epochs} epochs and its "
            f"{modeldir.CHECKPOINT_FILE} was removed (fits keep it only with --keep-checkpoint), so training cannot "
            f"continue where it stopped; re-fit with --overwrite --epochs {new_epochs}"
        )
    if finished and checkpoint_epoch(checkpoint) != old_epochs:
        raise PipelineError(
            f"--resume: {model_dir / modeldir.CHECKPOINT_FILE} holds epoch {checkpoint_epoch(checkpoint)}, not the "
            f"finished fit's last epoch {old_epochs}; re-fit with --overwrite --epochs {new_epochs}"
        )
    return checkpoint


def _differences(old: dict, config: dict, ignore) -> list[str]:
    """The settings in which config.json dict ``old`` differs from ``config`` (FunADConfig fields in ``ignore``
    aside), each as "name: old -> new"; a changed cache and another training split count too."""
    recorded = {"tokens": "patch", **old}  # fits from before --tokens used the patch tokens
    diffs = [f"{key}: {recorded.get(key)!r} -> {config[key]!r}" for key in ("method", "seed", "selection", "tokens")
             if recorded.get(key) != config[key]]
    old_config = old["config"]
    if old.get("method") == "funad" == config["method"]:
        from funad.config import FunADConfig

        old_config = FunADConfig.completed(old_config)
    diffs += [f"{key}: {old_config.get(key)!r} -> {config['config'].get(key)!r}"
              for key in sorted((set(old_config) | set(config["config"])) - set(ignore))
              if old_config.get(key) != config["config"].get(key)]
    if old["cache"].get("fingerprint") != config["cache"]["fingerprint"]:
        n_old, n_new = old["cache"].get("n_images"), config["cache"].get("n_images")
        if old["cache"].get("attrs") == config["cache"].get("attrs") or n_old != n_new:
            diffs.append(f"cache {config['cache'].get('path')} changed since this fit started ({n_old} -> {n_new} "
                         "images, e.g. appended by `funad extract`), so its split would change under it")
        else:
            diffs.append("cache fingerprint differs (another cache)")
    diffs += [f"contamination {key} differs" for key in ("ratio", "overlap", "seed", "train_ids", "synthetic_ids")
              if old["contamination"].get(key, config["contamination"].get(key)) != config["contamination"].get(key)]
    return diffs


def check_trained_from(trained_dir: Path, config: dict) -> dict:
    """Check that ``trained_dir`` holds a finished FUN-AD fit whose Local-Net the fit ``config`` may score with
    (``funad fit --from-model``): the same method, cache, training split and training settings; only the settings
    that act after training (:data:`funad.config.INFERENCE_SETTINGS`) and the thresholds' options may differ.

    Returns ``(its saved weights, its config.json dict)``. Raises PipelineError naming every difference.
    """
    from funad.config import INFERENCE_SETTINGS

    info = modeldir.read_config(trained_dir)  # names a missing or unreadable config.json
    old = info.raw
    if not old.get("complete"):
        raise PipelineError(f"--from-model: the fit in {trained_dir} has not finished; finish it first "
                            f"(`funad fit ... -o {trained_dir} --resume`)")
    if old["method"] != "funad":
        raise PipelineError(f"--from-model: {trained_dir} holds a {old['method']} model, which trains no Local-Net; "
                            "fit it again with the new settings instead")
    if old["selection"] != "final":
        raise PipelineError(f"--from-model: {trained_dir} kept an epoch chosen with test labels (--select "
                            f"{old['selection']}); only a final-epoch fit can be scored anew")
    diffs = _differences(old, config, ignore=set(INFERENCE_SETTINGS))
    if diffs:
        raise PipelineError(
            f"--from-model: {trained_dir} trained with other settings ({'; '.join(diffs)}). It can be scored anew "
            f"only with other {', '.join(INFERENCE_SETTINGS)} (--set) or threshold options; drop the other changes, "
            "or fit without --from-model to train again")
    return modeldir.load_weights(trained_dir), old
