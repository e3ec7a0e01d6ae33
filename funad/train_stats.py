"""What a fit reports per epoch: losses, counts, phase times, and label diagnostics that nothing acts upon."""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch

from .errors import DataError


class Clock:
    """Adds wall time per phase; synchronises CUDA so phases are not mixed up."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.totals = {"bank": 0.0, "search": 0.0, "step": 0.0}
        self.sync()
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[phase] += now - self.last
        self.last = now


class Diagnostics:
    """Labels used only to *report* bank purity and pseudo-label quality.

    Args:
        given: {"image_labels": (n_images,) 0/1, "patch_labels": (n_images, n_patches) 0/1}, or None.
    """

    def __init__(self, given: Optional[dict], n_images: int, n_patches: int) -> None:
        self.image_labels = self.patch_labels = None
        self.synthetic: Optional[torch.Tensor] = None  # (n_images,) bool, set by ``FunAD.fit`` for FUN-AD*
        if not given:
            return
        unknown = sorted(set(given) - {"image_labels", "patch_labels"})
        if unknown:
            raise DataError(f"unknown diagnostics {unknown}; expected 'image_labels' and/or 'patch_labels'")
        if given.get("image_labels") is not None:
            self.image_labels = torch.as_tensor(np.asarray(given["image_labels"])).long()
            if tuple(self.image_labels.shape) != (n_images,):
                raise DataError(f"diagnostics image_labels must have shape ({n_images},), "
                                f"got {tuple(self.image_labels.shape)}")
        if given.get("patch_labels") is not None:
            self.patch_labels = torch.as_tensor(np.asarray(given["patch_labels"])).bool()
            if tuple(self.patch_labels.shape) != (n_images, n_patches):
                raise DataError(f"diagnostics patch_labels must have shape ({n_images}, {n_patches}), "
                                f"got {tuple(self.patch_labels.shape)}")


class EpochStats:
    """Per-epoch sums; device tensors are read back once per epoch (no per-step host sync)."""

    def __init__(self) -> None:
        self.steps = 0
        self.sums: dict[str, Any] = {"loss": 0.0, "loss_bce": 0.0, "loss_ms": 0.0,
                                     "n_pseudo_anomalies": 0.0, "n_ambiguous": 0.0}
        self.n_pairs = 0
        self.bank_images = self.bank_patches = 0
        self.purity: list[float] = []
        self.tp = self.fp = self.fn = 0
        self.by_group: dict[str, list] = {"real": [0, 0, 0], "synthetic": [0, 0, 0]}  # tp, fp, fn (FUN-AD* only)
        # FUN-AD* only: the real images' true defect patches in steps whose batch holds a synthetic image and
        # in steps whose batch holds none: [labelled anomalous, count, sum of d_hat]; and how often a batch
        # with a synthetic image has its largest distance (d_hat = 1) on a synthetic patch. Device tensors,
        # summed without branching on them, so a step adds no host round trip.
        self.real_defects = {"with": torch.zeros(3), "without": torch.zeros(3)}
        self.synthetic_steps, self.max_on_synthetic = 0, 0

    def add(self, step_losses, targets, diag: Diagnostics, batch_idx: np.ndarray, positions: torch.Tensor) -> None:
        """Count one step: its ``train_step.Losses`` and ``Targets``; pseudo-label quality when labels are given."""
        self.steps += 1
        for key, value in (("loss", step_losses.loss), ("loss_bce", step_losses.loss_bce),
                           ("loss_ms", step_losses.loss_ms), ("n_pseudo_anomalies", targets.y.sum()),
                           ("n_ambiguous", targets.amb.sum())):
            self.sums[key] = self.sums[key] + value.detach()
        self.n_pairs += int(targets.pairs.shape[0])
        if diag.patch_labels is not None:
            truth = diag.patch_labels[torch.as_tensor(batch_idx, device=diag.patch_labels.device)]
            truth = truth[:, positions.to(truth.device)]
            truth, pred = truth.flatten(), targets.y.detach().bool()
            self.tp = self.tp + (pred & truth).sum()
            self.fp = self.fp + (pred & ~truth).sum()
            self.fn = self.fn + (~pred & truth).sum()
            if diag.synthetic is not None:  # split by real and synthetic images: which of them the labels find
                syn_batch = diag.synthetic[torch.as_tensor(batch_idx)].to(pred.device)
                on_syn = syn_batch[:, None].expand(-1, positions.numel()).flatten()
                for group, sel in (("real", ~on_syn), ("synthetic", on_syn)):
                    counts = self.by_group[group]
                    for i, hit in enumerate((pred & truth & sel, pred & ~truth & sel, ~pred & truth & sel)):
                        counts[i] = counts[i] + hit.sum()
                with_syn = syn_batch.any()
                self.synthetic_steps = self.synthetic_steps + with_syn
                # the argmax can only be on a synthetic patch when the batch holds one
                self.max_on_synthetic = self.max_on_synthetic + on_syn[targets.d.detach().argmax()]
                real_defect = truth & ~on_syn
                step = torch.stack([(pred & real_defect).sum(), real_defect.sum(),
                                    (targets.d_hat.detach() * real_defect).sum()]).float()
                for when, weight in (("with", with_syn), ("without", ~with_syn)):
                    self.real_defects[when] = self.real_defects[when].to(step.device) + step * weight

    def record(self, epoch: int, times: dict, diag: Diagnostics) -> dict:
        """The epoch's record for ``FunAD.fit``'s callback (see its docstring for the keys)."""
        out: dict[str, Any] = {"epoch": epoch}
        for key, value in self.sums.items():
            out[key] = float(value) / self.steps
        out["n_pairs"] = self.n_pairs / self.steps
        out["bank_images"], out["bank_patches"] = self.bank_images, self.bank_patches
        out.update({f"time_{k}": v for k, v in times.items()})
        if self.purity:
            out["bank_purity"] = float(np.mean(self.purity))
        if diag.patch_labels is not None:
            tp, fp, fn = int(self.tp), int(self.fp), int(self.fn)
            out["pseudo_precision"] = tp / (tp + fp) if tp + fp else None
            out["pseudo_recall"] = tp / (tp + fn) if tp + fn else None
            if diag.synthetic is not None:
                # FUN-AD*: precision and recall on real and on synthetic images, and the share of all
                # pseudo-anomalies that fall on synthetic images
                for group, counts in self.by_group.items():
                    tp, fp, fn = (int(c) for c in counts)
                    out[f"pseudo_precision_{group}"] = tp / (tp + fp) if tp + fp else None
                    out[f"pseudo_recall_{group}"] = tp / (tp + fn) if tp + fn else None
                on_syn = sum(int(c) for c in self.by_group["synthetic"][:2])
                total = on_syn + sum(int(c) for c in self.by_group["real"][:2])
                out["pseudo_share_synthetic"] = on_syn / total if total else None
                steps = int(self.synthetic_steps)
                out["batch_max_on_synthetic"] = int(self.max_on_synthetic) / steps if steps else None
                for when, sums in self.real_defects.items():
                    hits, count, dhat = sums.tolist()
                    out[f"pseudo_recall_real_{when}_synthetic"] = hits / count if count else None
                    out[f"dhat_real_defects_{when}_synthetic"] = dhat / count if count else None
        return out
