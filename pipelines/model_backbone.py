"""The backbone a fitted model needs at predict time: rebuilt from the settings it records, and checked."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from .errors import BackboneError
from .geometry import Geometry
from .tiles import embed
from .modeldir import ModelInfo, attr_differences

logger = logging.getLogger(__name__)

# Recorded backbone settings that the rebuilt backbone must reproduce exactly.
CHECKED_ATTRS = ("backbone", "weights_sha256", "layer", "image_size", "resize", "crop", "mean", "std",
                 "patch_size", "grid", "token_dim", "feature_dim")


def _spec_for(attrs: dict, info: ModelInfo, weights: Optional[Path]):
    """The BackboneSpec that rebuilds the recorded backbone (``weights`` replaces the recorded file)."""
    from .backbone import BackboneSpec, file_sha256

    name, recorded, recorded_sha = attrs["backbone"], str(attrs.get("weights") or ""), attrs.get("weights_sha256")
    common = dict(name=name, layer=attrs.get("layer"), image_size=attrs.get("image_size"))
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise BackboneError(f"weights file {weights} does not exist; check the --weights path")
        sha = file_sha256(weights)
        if recorded_sha and sha != recorded_sha:
            raise BackboneError(
                f"weights file {weights} has sha256 {sha[:12]}..., but model {info.path} was fitted on features "
                f"from {recorded or 'other weights'} with sha256 {str(recorded_sha)[:12]}...; pass that weights file"
            )
        return BackboneSpec(weights=str(weights), **common)
    if recorded.startswith("random-init"):  # a test/timing backbone, rebuilt from its fixed seed
        return BackboneSpec(pretrained=False, **common)
    if recorded.startswith("timm:") or not recorded:  # timm's own pretrained weights
        return BackboneSpec(**common)
    if not Path(recorded).is_file():
        raise BackboneError(
            f"model {info.path} records the backbone weights file {recorded}, which does not exist here; pass a "
            f"copy with --weights FILE (its sha256 must be {str(recorded_sha)[:12]}...)"
        )
    return BackboneSpec(weights=recorded, **common)


def backbone_for_model(info: ModelInfo, device: torch.device, *, weights: Optional[Path] = None,
                       precision: Optional[str] = None):
    """Rebuild the backbone a model's features came from and check that it matches.

    Args:
        weights: a local weights file replacing the recorded one; its sha256
            must equal the recorded ``weights_sha256``.
        precision: backbone autocast; default: the precision the cache was extracted with.
    Returns:
        A ``funad.pipelines.backbone.Backbone``.
    Raises:
        BackboneError naming every differing setting.
    """
    from .backbone import load_backbone

    attrs = dict(info.cache.get("attrs", {}))
    if "backbone" not in attrs:
        raise BackboneError(f"{info.path / 'config.json'} records no backbone (its cache attrs lack 'backbone'); "
                            f"predict needs a model fitted on features extracted by `funad extract`")
    recorded_precision = attrs.get("precision", "fp32")
    precision = precision or recorded_precision
    if precision != recorded_precision:
        logger.warning("backbone precision %s differs from the %s the model's cache was extracted with; scores "
                       "will differ slightly from the cached ones", precision, recorded_precision)
    bb = load_backbone(_spec_for(attrs, info, weights), device, precision=precision)
    bb.geometry = Geometry.from_attrs({**attrs, "image_size": bb.image_size, "patch_size": bb.patch_size})
    check_backbone({**bb.metadata, **bb.geometry.attrs()}, attrs, info)  # grid: the store's frame, not one tile
    return bb


def check_backbone(have: dict, recorded: dict, info: ModelInfo) -> None:
    """Raise BackboneError when a rebuilt backbone's metadata differs from the model's record."""
    diffs = attr_differences(recorded, have, CHECKED_ATTRS, "backbone")
    if diffs:
        raise BackboneError(
            f"the backbone rebuilt for model {info.path} does not reproduce its features: " + "; ".join(diffs)
            + ". Use the backbone settings and weights the model's cache was extracted with."
        )


def features(bb, crops: torch.Tensor, store_dtype: str = "float32", tokens: str = "patch") -> torch.Tensor:
    """Backbone features laid out, and rounded, as the model's cache stores them.

    Args:
        crops: (n, 3, H, W) uint8 images brought into the store's frame; a frame larger than the backbone's
            input is embedded tile by tile and stitched (``bb.geometry``, set by :func:`backbone_for_model`).
        store_dtype: the cache's token dtype; tokens are rounded through it, as
            ``funad extract`` does before writing, so predict sees what fit saw.
        tokens: "patch", or "class" for a model fitted on the class tokens alone.
    Returns:
        (n, P, 2C) float32 on the backbone's device: the class token repeated
        for every patch, then the patch token; with ``tokens="class"``, (n, 1, C): the class token.
    """
    geometry = getattr(bb, "geometry", None)
    cls, patches = bb(bb.normalize(crops)) if geometry is None else embed(bb, crops, geometry)
    if store_dtype == "float16":
        cls, patches = cls.half().float(), patches.half().float()
    if tokens == "class":
        return cls[:, None, :].float()
    return torch.cat([cls[:, None, :].expand(-1, patches.shape[1], -1), patches], dim=2)
