"""The FUN-AD estimator and its training loop (spec, "One training iteration").

Default behaviour is the reference code's (``ms_on_clean=False``): one forward
pass on the perturbed features per step, and both losses on its predictions;
the mutual pairs come from the adapted features of the unperturbed batch.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Optional, Union

import numpy as np
import torch

from .config import FunADConfig, training_settings
from .data import FeatureSource, FeaturesLike, SubsetSource, as_source, get_patches, source_device
from .errors import ConfigError, DataError, DivergedError, NotFittedError
from .knn import KNNScorer
from .localnet import LocalNet
from .memory_bank import (ScoredImages, bank_candidates, draw_pool, gather_adapted, sample_bank_images,
                          sample_bank_patches, score_images)
from .nn import NNIndex
from .ops import autocast, images_per_chunk, row_blocks
from .perturb import draw_noise
from .train_stats import Clock, Diagnostics, EpochStats
from .train_step import make_targets, optimise, use_synthetic

logger = logging.getLogger(__name__)


# Adapted features of all training images are kept between the scoring pass
# and the bank/batch (saving one adaptor pass) when they take at most this much.
KEEP_ADAPTED_BYTES = 8 * 2**30


@torch.no_grad()
def update_average(averaged: LocalNet, net: LocalNet, decay: float) -> None:
    """One step of the weights' exponential moving average: a <- decay * a + (1 - decay) * w."""
    for a, w in zip(averaged.parameters(), net.parameters()):
        a.lerp_(w, 1.0 - decay)


def _synthetic_flags(cfg: FunADConfig, synthetic: Optional[np.ndarray], labels: Optional[np.ndarray], n: int,
                     p: int, device: torch.device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Check ``fit``'s synthetic arguments; (n,) bool on the CPU and (n, P) float labels on ``device``, or None."""
    if synthetic is None or not np.asarray(synthetic).any():
        return None, None
    flags = torch.as_tensor(np.asarray(synthetic, dtype=bool))
    if flags.shape != (n,):
        raise DataError(f"synthetic flags have shape {tuple(flags.shape)}, the features hold {n} images")
    if cfg.synthetic == "off":
        raise ConfigError(f"config synthetic='off' but {int(flags.sum())} images are flagged synthetic; "
                          "leave them out of the features or set synthetic to 'pseudo' or 'mask'")
    if cfg.synthetic != "mask":
        return flags, None
    if labels is None or np.asarray(labels).shape != (n, p):
        raise DataError(f"synthetic='mask' needs synthetic_labels of shape ({n}, {p}), got "
                        f"{None if labels is None else np.asarray(labels).shape}")
    return flags, torch.as_tensor(np.asarray(labels), dtype=torch.float32, device=device)


class FunAD:
    """FUN-AD anomaly detector on patch features (n_images, n_patches, dim).

    ``__init__`` only stores the config; ``fit`` learns ``net_`` (the Local-Net),
    ``dim_``, ``n_patches_`` and ``device_``. Higher means more anomalous.
    With ``scorer="localnet"`` (the paper) scores are φ's output in (0, 1).
    With ``scorer="clean_knn"`` (a deviation) ``fit`` ends by keeping the
    ``clean_share`` of training images that the final φ scores lowest
    (``clean_images_``, never a FUN-AD* synthetic image) and fitting ``knn_``,
    a :class:`funad.knn.KNNScorer` on their raw features; scores are then its
    distances and PatchCore image scores. Training is the same either way.
    """

    def __init__(self, config: Optional[FunADConfig] = None) -> None:
        self.config = config if config is not None else FunADConfig()

    # ------------------------------------------------------------------ fit
    def fit(self, features: FeaturesLike, *, device: Union[str, torch.device, None] = None,
            callback: Optional[Callable[[dict], None]] = None, diagnostics: Optional[dict] = None,
            checkpoint: Optional[dict] = None, on_checkpoint: Optional[Callable[[dict], None]] = None,
            checkpoint_every: int = 1, nn_backend: str = "auto", synthetic: Optional[np.ndarray] = None,
            synthetic_labels: Optional[np.ndarray] = None) -> "FunAD":
        """Train Local-Net on unlabelled features.

        Args:
            features: a FeatureSource or a (n_images, n_patches, dim) tensor/array.
            device: where to train; default: the source's device.
            callback: called once per epoch (the model scores with the
                epoch's weights meanwhile) with a record (dict): epoch,
                loss, loss_bce, loss_ms (means over the epoch's steps),
                n_pseudo_anomalies, n_ambiguous, n_pairs (means per step),
                bank_images, bank_patches (the epoch's last bank), time_bank,
                time_search, time_step (seconds over the epoch; search =
                distances + mutual pairs) and, with diagnostics, bank_purity,
                pseudo_precision, pseudo_recall; with synthetic images too, the
                same two on real and on synthetic images (``pseudo_precision_real``,
                ``pseudo_recall_synthetic``, ...) and pseudo_share_synthetic,
                the share of pseudo-anomalies that fall on synthetic images;
                batch_max_on_synthetic, the share of steps with a synthetic
                image whose largest distance lies on one; and the real defects'
                recall and mean d̂ in steps with and without a synthetic image
                (``pseudo_recall_real_with_synthetic``, ``dhat_real_defects_without_synthetic``, ...).
            diagnostics: {"image_labels": (n_images,) 0/1, "patch_labels":
                (n_images, n_patches) 0/1}; only reported, never acted upon.
            checkpoint: a state given to ``on_checkpoint`` by an earlier fit
                with the same config (``epochs`` may differ): training resumes
                after its epoch and matches an uninterrupted run on the CPU.
            on_checkpoint: called with a state dict (net, optimizer, RNG
                states, epoch, config) every ``checkpoint_every`` epochs and
                after the last one.
            nn_backend: bank search back-end of :class:`funad.nn.NNIndex`.
            synthetic: (n_images,) bool, FUN-AD*'s synthetic anomaly images among the features; they train
                as ``config.synthetic`` says (:func:`funad.train_step.use_synthetic`).
            synthetic_labels: (n_images, n_patches) 0/1, their masks on the patch grid (for ``synthetic="mask"``).

        The bank is rebuilt at the first step of every epoch and then every
        ``bank_every`` steps, so a resumed run needs no saved bank.
        """
        cfg = self.config
        source = as_source(features)
        n, p, dim = source.n_images, source.n_patches, source.dim
        batch = cfg.batch_size
        if n < batch:
            raise DataError(f"{n} training images are fewer than batch_size={batch}; "
                            "lower batch_size or train on more images")
        if checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        device = torch.device(device) if device is not None else source_device(source)
        diag = Diagnostics(diagnostics, n, p)
        syn, syn_labels = _synthetic_flags(cfg, synthetic, synthetic_labels, n, p, device)
        diag.synthetic = syn
        if diag.patch_labels is not None:
            diag.patch_labels = diag.patch_labels.to(device)

        net = LocalNet(dim, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        opt = torch.optim.RMSprop(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        host_gen = torch.Generator().manual_seed(cfg.seed + 1)  # shuffling, bank and patch sampling
        noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)  # perturbation noise
        # The weights kept for inference: the last ones, or their moving average (training always uses ``net``).
        averaged = None if cfg.ema is None else copy.deepcopy(net).requires_grad_(False)
        start_epoch = 0
        if checkpoint is not None:
            start_epoch = self._resume(checkpoint, net, opt, host_gen, noise_gen, n, p, dim, averaged)
        pool_all = cfg.bank_pool is None or cfg.bank_pool >= n
        # Set now so that a per-epoch callback can score with the current weights.
        self.net_, self.dim_, self.n_patches_, self.device_ = (net if averaged is None else averaged), dim, p, device
        self.trained_net_ = net  # the weights being trained (net_ is their average when ema is set)
        self.knn_, self.clean_images_ = None, None  # scorer="clean_knn": set after the last epoch
        self.training_ = True  # meanwhile a callback scores with φ whatever the scorer
        keep_adapted = min(n, cfg.bank_pool or n) * p * dim * 4 <= KEEP_ADAPTED_BYTES
        by_identity = cfg.exclude_self_by == "identity"
        patch_ids = torch.arange(p, device=device)
        steps = n // batch
        epochs = cfg.epochs_for(n)

        for epoch in range(start_epoch, epochs):
            stats, clock = EpochStats(), Clock(device)
            order = torch.randperm(n, generator=host_gen).numpy()
            for step in range(steps):
                batch_idx = order[step * batch:(step + 1) * batch]
                rebuilt = step % cfg.bank_every == 0
                if rebuilt:
                    scored, index, bank_ids = self._rebuild_bank(net, source, device, keep_adapted, host_gen,
                                                                 nn_backend, stats, diag, epoch + 1)
                    clock.lap("bank")
                positions = patch_ids
                if cfg.batch_patches is not None and cfg.batch_patches < p:
                    positions = torch.randperm(p, generator=host_gen)[:cfg.batch_patches].sort().values.to(device)
                    f = get_patches(source, batch_idx, positions).to(device)
                else:
                    f = source.get(batch_idx).to(device)

                with torch.no_grad():
                    if rebuilt and pool_all and scored.adapted is not None:
                        # The scoring pass adapted every image with this very net: reuse it.
                        a = scored.adapted[torch.as_tensor(batch_idx, device=device)][:, positions]
                    else:
                        with autocast(device, cfg.bf16):
                            a = net.adapt(f)
                query_ids = None
                if by_identity:
                    query_ids = (torch.as_tensor(batch_idx, device=device)[:, None] * p + positions).flatten()
                targets = make_targets(a, index, cfg, query_ids, bank_ids)
                if syn is not None and bool(syn[batch_idx].any()):
                    flags = syn[batch_idx][:, None].expand(-1, positions.numel()).flatten()
                    labels = None if syn_labels is None else syn_labels[batch_idx][:, positions].flatten()
                    targets = use_synthetic(targets, flags.to(device), cfg.synthetic, labels)
                clock.lap("search")

                step_losses = optimise(net, opt, f, targets, cfg, draw_noise(f, noise_gen))
                if averaged is not None:
                    update_average(averaged, net, cfg.ema)
                clock.lap("step")

                stats.add(step_losses, targets, diag, batch_idx, positions)

            record = stats.record(epoch + 1, clock.totals, diag)
            if not np.isfinite(record["loss"]):
                raise DivergedError(f"the training loss became {record['loss']} in epoch {epoch + 1}; "
                                    f"lower lr (now {cfg.lr}) or check the features for NaN or inf values")
            logger.debug("epoch %d: %s", epoch + 1, record)
            if callback is not None:
                callback(record)
            if on_checkpoint is not None and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs):
                on_checkpoint(self._checkpoint_state(net, opt, host_gen, noise_gen, epoch + 1, n, p, dim, averaged))

        self.training_ = False
        return self._after_training(source, None if syn is None else syn.numpy(), nn_backend)

    def _after_training(self, source: FeatureSource, synthetic: Optional[np.ndarray], nn_backend: str) -> "FunAD":
        """What a fit does once the Local-Net is trained: with ``scorer="clean_knn"``, build the clean-image bank."""
        if self.config.scorer == "clean_knn":
            self.fit_clean_bank(source, synthetic=synthetic, nn_backend=nn_backend)
        return self

    def adopt_training(self, state: dict, features: FeaturesLike, *, device: Union[str, torch.device] = "cpu",
                       synthetic: Optional[np.ndarray] = None, nn_backend: str = "auto") -> "FunAD":
        """Finish a fit with a Local-Net trained by another model instead of training one: what ``fit`` gives.

        For configs that differ only in inference settings
        (:data:`funad.config.INFERENCE_SETTINGS`, e.g. ``clean_share``), which
        train the same Local-Net: a sweep over them trains once per seed.

        Args:
            state: ``state_dict()`` of a model fitted on ``features`` (its bank, if any, is ignored).
            features, synthetic, nn_backend: as the ``fit`` that trained it got them (same images, same order).
            device: where this model scores.
        Raises ConfigError when the two configs differ in a training setting.
        """
        theirs = training_settings(FunADConfig.completed(state.get("config", {})))
        ours = training_settings(self.config.to_dict())
        diff = sorted(k for k in ours if theirs.get(k) != ours[k])
        if diff:
            raise ConfigError("adopt_training: the trained model was fitted with other training settings: "
                              + ", ".join(f"{k}={theirs.get(k)!r} (here {ours[k]!r})" for k in diff))
        source = as_source(features)
        if int(state.get("n_patches", source.n_patches)) != source.n_patches:
            raise DataError(f"adopt_training: the Local-Net was trained on {state['n_patches']} patches per image, "
                            f"the features have {source.n_patches}")
        self.load_state_dict({k: state[k] for k in ("dim", "n_patches", "net") if k in state}, device)
        self.trained_net_ = self.net_
        return self._after_training(source, synthetic, nn_backend)

    def fit_clean_bank(self, features: FeaturesLike, *, synthetic: Optional[np.ndarray] = None,
                       nn_backend: str = "auto") -> "FunAD":
        """``scorer="clean_knn"``: keep the training images the current φ scores lowest; fit ``knn_`` on them.

        ``fit`` calls this after its last epoch; call it again after loading
        other weights (e.g. an earlier epoch's). ``features`` are the training
        features in ``fit``'s order, ``synthetic`` their FUN-AD* flags (never
        kept). Keeps ``max(2, floor(clean_share * n_real))`` images, so that
        every kept image can be scored against the others
        (:meth:`score_held_out`).
        """
        self._check_fitted()
        cfg = self.config
        source = as_source(features)
        scores = self._net_scores(source).max(axis=1)
        eligible = np.arange(source.n_images) if synthetic is None else np.flatnonzero(~np.asarray(synthetic, bool))
        if eligible.size < 2:
            raise DataError(f"scorer=clean_knn needs at least 2 real training images, got {eligible.size}")
        n_keep = min(eligible.size, max(2, int(np.floor(cfg.clean_share * eligible.size))))
        rows = np.sort(eligible[np.argsort(scores[eligible], kind="stable")[:n_keep]])
        self.knn_ = KNNScorer(coreset_ratio=cfg.clean_coreset, seed=cfg.seed, backend=nn_backend,
                              device=self.device_, max_bank=cfg.clean_max_patches).fit(SubsetSource(source, rows))
        self.clean_images_ = rows
        logger.info("clean_knn: %d of %d training images kept (the lowest Local-Net scores), %d bank patches",
                    n_keep, eligible.size, self.knn_.bank_.shape[0])
        return self

    def _rebuild_bank(self, net: LocalNet, source: FeatureSource, device: torch.device, keep_adapted: bool,
                      host_gen: torch.Generator, nn_backend: str, stats: EpochStats, diag: Diagnostics,
                      epoch: int) -> tuple[ScoredImages, NNIndex, Optional[torch.Tensor]]:
        """Step 1 (IRMB): score, choose candidates, sample the bank; returns (scores, index, bank row ids)."""
        cfg = self.config
        p = source.n_patches
        pool = draw_pool(source.n_images, cfg.bank_pool, host_gen)
        scored = score_images(net, source, device, keep_adapted=keep_adapted, bf16=cfg.bf16, images=pool)
        if not bool(torch.isfinite(scored.image_scores).all()):
            raise DivergedError(f"image scores became NaN or inf in epoch {epoch}; lower lr (now {cfg.lr}) "
                                "or check the features for NaN or inf values")
        rows = sample_bank_images(bank_candidates(scored.image_scores, cfg.tau_b, cfg.bank_rule), cfg.r, host_gen)
        bank, kept = sample_bank_patches(gather_adapted(net, source, rows, scored, device, cfg.bf16),
                                         cfg.bank_patches, host_gen)
        index = NNIndex(nn_backend, device).fit(bank.float())
        bank_ids = None
        if cfg.exclude_self_by == "identity":
            images = scored.images[rows.cpu()].to(device)
            bank_ids = (images[:, None] * p + torch.arange(p, device=device)).flatten()
            bank_ids = bank_ids if kept is None else bank_ids[kept.to(device)]
        images_in_bank = scored.images[rows.cpu()]
        stats.bank_images, stats.bank_patches = int(rows.numel()), int(bank.shape[0])
        if diag.image_labels is not None:
            stats.purity.append(float((diag.image_labels[images_in_bank] == 0).float().mean()))
        return scored, index, bank_ids

    # ------------------------------------------------------------ checkpoints
    def _checkpoint_state(self, net: LocalNet, opt: torch.optim.Optimizer, host_gen: torch.Generator,
                          noise_gen: torch.Generator, epoch: int, n: int, p: int, dim: int,
                          averaged: Optional[LocalNet] = None) -> dict:
        extra = {} if averaged is None else {"ema_net": {k: v.detach().cpu().clone()
                                                         for k, v in averaged.state_dict().items()}}
        return {**extra,
            "epoch": epoch,
            "config": self.config.to_dict(),
            "n_images": n, "n_patches": p, "dim": dim,
            "net": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
            "optimizer": copy.deepcopy(opt.state_dict()),
            "host_rng": host_gen.get_state(),
            "noise_rng": noise_gen.get_state(),
        }

    def _resume(self, state: dict, net: LocalNet, opt: torch.optim.Optimizer, host_gen: torch.Generator,
                noise_gen: torch.Generator, n: int, p: int, dim: int, averaged: Optional[LocalNet] = None) -> int:
        missing = sorted({"epoch", "config", "net", "optimizer", "host_rng", "noise_rng"} - set(state))
        if missing:
            raise DataError(f"checkpoint lacks {missing}; pass a state produced by fit(on_checkpoint=...)")
        saved = {k: v for k, v in FunADConfig.completed(state["config"]).items() if k != "epochs"}
        current = {k: v for k, v in self.config.to_dict().items() if k != "epochs"}
        diff = sorted(k for k in current if saved.get(k) != current[k])
        if diff:
            raise ConfigError("checkpoint was written with a different config: "
                              + ", ".join(f"{k}={saved.get(k)!r} (now {current[k]!r})" for k in diff)
                              + "; resume with the same settings (only epochs may change)")
        for key, value in (("n_images", n), ("n_patches", p), ("dim", dim)):
            if key in state and state[key] != value:
                raise DataError(f"checkpoint was written for {key}={state[key]}, the features have "
                                f"{key}={value}; resume on the same training set")
        net.load_state_dict(state["net"])
        if averaged is not None:
            averaged.load_state_dict(state["ema_net"])
        opt.load_state_dict(state["optimizer"])
        host_gen.set_state(state["host_rng"])
        noise_gen.set_state(state["noise_rng"])
        return int(state["epoch"])

    # ---------------------------------------------------------------- scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise NotFittedError("this FunAD model is not fitted yet; call fit(features) or load_state_dict(state) first")

    @torch.no_grad()
    def _net_scores(self, features: FeaturesLike) -> np.ndarray:
        """φ's patch scores, float32 (n_images, n_patches): in (0, 1), or logits with ``score_space="logit"``."""
        self._check_fitted()
        source = as_source(features)
        if source.dim != self.dim_:
            raise DataError(f"model was fitted on D={self.dim_} features, input has D={source.dim}")
        self.net_.eval()
        score = self.net_.logits if self.config.score_space == "logit" else self.net_
        out = np.empty((source.n_images, source.n_patches), dtype=np.float32)
        step = images_per_chunk(source.n_patches)
        flat = out.reshape(-1)
        for start in range(0, source.n_images, step):
            idx = np.arange(start, min(source.n_images, start + step))
            f = source.get(idx).to(self.device_).flatten(0, 1)
            base = start * source.n_patches
            for block in row_blocks(f.shape[0], self.device_):  # cache-sized matmul blocks
                flat[base + block.start:base + block.stop] = score(f[block]).float().cpu().numpy()
        return out

    def _knn(self) -> Optional[KNNScorer]:
        """The clean-image kNN scorer when it scores (``scorer="clean_knn"`` and built), else None."""
        knn = getattr(self, "knn_", None)
        if self.config.scorer == "clean_knn" and knn is None and not getattr(self, "training_", False):
            raise NotFittedError("scorer=clean_knn but this model has no clean-image bank; fit it, or call "
                                 "fit_clean_bank(training features) after loading weights")
        return knn if self.config.scorer == "clean_knn" else None

    def score(self, features: FeaturesLike) -> tuple[np.ndarray, np.ndarray]:
        """``(patch scores (n, P), image scores (n,))``, float32.

        With ``scorer="localnet"`` the image score is the maximum patch score;
        with ``"clean_knn"`` both come from ``knn_`` (PatchCore's image score).
        """
        self._check_fitted()
        knn = self._knn()
        if knn is not None:
            return knn.score(features)
        patches = self._net_scores(features)
        return patches, patches.max(axis=1)

    def score_patches(self, features: FeaturesLike) -> np.ndarray:
        """Patch scores, float32 (n_images, n_patches); higher = more anomalous (:meth:`score`)."""
        return self.score(features)[0]

    def score_images(self, features: FeaturesLike) -> np.ndarray:
        """Image scores, float32 (n_images,) (:meth:`score`)."""
        return self.score(features)[1]

    def score_held_out(self, features: FeaturesLike,
                       images: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores of the training images (``fit``'s order, the first ``n`` of them; or of those numbered
        ``images``), none against itself.

        With ``scorer="clean_knn"`` the kept images' patches are in the bank,
        so each of them is scored against the others' (leave-one-image-out,
        :meth:`funad.knn.KNNScorer.score_held_out`); the rest, and every image
        with ``scorer="localnet"``, are scored as :meth:`score` scores them.
        """
        knn = self._knn()
        source = as_source(features)
        ids = np.arange(source.n_images) if images is None else np.asarray(images, dtype=np.int64)
        if knn is None:
            return self.score(SubsetSource(source, ids))
        rows = self.clean_images_
        if rows is None or rows[-1] >= source.n_images:
            raise DataError("held-out scores need the training features in fit's order (the first images)")
        patches = np.empty((len(ids), source.n_patches), dtype=np.float32)
        scores = np.empty(len(ids), dtype=np.float32)
        kept = np.isin(ids, rows)
        if (~kept).any():
            patches[~kept], scores[~kept] = knn.score(SubsetSource(source, ids[~kept]))
        if kept.any():  # the bank's own numbering of its images is their position among ``rows``
            patches[kept], scores[kept] = knn.score_held_out(SubsetSource(source, rows),
                                                             np.searchsorted(rows, ids[kept]))
        return patches, scores

    # ------------------------------------------------------------ persistence
    def state_dict(self, with_bank: bool = True) -> dict:
        """{"config": dict, "dim": int, "n_patches": int, "net": {name: CPU tensor}}; with a clean-image bank
        (unless ``with_bank`` is False) also "knn": {"bank": (n_bank, D) tensor} and "clean_images": its training
        images' indices (int64)."""
        self._check_fitted()
        state = {
            "config": self.config.to_dict(),
            "dim": self.dim_,
            "n_patches": self.n_patches_,
            "net": {k: v.detach().cpu().clone() for k, v in self.net_.state_dict().items()},
        }
        if with_bank and getattr(self, "knn_", None) is not None:
            state["knn"] = self.knn_.state_dict()
            state["clean_images"] = torch.as_tensor(self.clean_images_, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict, device: Union[str, torch.device] = "cpu") -> "FunAD":
        """Load weights saved by :meth:`state_dict` (the model's config is kept)."""
        missing = sorted({"dim", "net"} - set(state))
        if missing:
            raise DataError(f"model state lacks {missing}; pass a dict produced by FunAD.state_dict()")
        net = LocalNet(int(state["dim"]))
        try:
            net.load_state_dict(state["net"])
        except RuntimeError as exc:
            raise DataError(f"model weights do not match a Local-Net of D={state['dim']}: {exc}") from None
        self.device_ = torch.device(device)
        self.net_ = net.to(self.device_)
        self.dim_ = int(state["dim"])
        self.n_patches_ = int(state.get("n_patches", 0))
        self.training_ = False
        self.knn_, self.clean_images_ = None, None  # weights without a bank (e.g. an earlier epoch's) have none
        if "knn" in state:
            self.knn_ = KNNScorer(coreset_ratio=self.config.clean_coreset, seed=self.config.seed, device=self.device_,
                                  max_bank=self.config.clean_max_patches).load_state_dict(state["knn"])
            if self.knn_.dim_ != self.dim_:
                raise DataError(f"the clean-image bank has D={self.knn_.dim_}, the Local-Net D={self.dim_}")
            self.clean_images_ = np.asarray(state.get("clean_images", []), dtype=np.int64)
        return self

    @classmethod
    def from_state_dict(cls, state: dict, device: Union[str, torch.device] = "cpu") -> "FunAD":
        """A model with the config and weights of ``state``."""
        config = FunADConfig.from_dict(state["config"]) if "config" in state else FunADConfig()
        return cls(config).load_state_dict(state, device)
