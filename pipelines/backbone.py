"""The frozen ViT backbone and its pre-processing (FUNAD_SPEC "Features").

A :class:`Backbone` wraps a timm Vision Transformer and returns, for a batch of
normalised images ``(n, 3, S, S)``, the class token ``(n, C)`` and the patch
tokens ``(n, P, C)`` of one block (default: the last), after the model's final
LayerNorm. P = grid[0] * grid[1] with grid = S / patch size.

Pre-processing: RGB, a square resize to ``round(S * 256 / 224)`` that squashes
the aspect ratio (256 for 224, 448 for 392), a centre crop to S, then the
mean/std of the weights' pretrained config (ImageNet's for DINO). Masks go
through the same geometry with nearest-neighbour resampling.

Weights come from timm (Hugging Face hub), from a local file (``weights=``:
timm safetensors or the official DINO release checkpoint), or are randomly
initialised (``pretrained=False``, seeded; for tests and timing only).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .errors import BackboneError
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_for  # noqa: F401 - resize_for is part of this module's API
from .weights import (  # noqa: F401 - file_sha256 and normalize_state_dict are part of this module's API
    file_sha256,
    mismatch_message,
    normalize_state_dict,
    offline_if_hub_unreachable,
    state_dict_sha256,
    weights_overlay,
)

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "vit_base_patch8_224.dino"
PRECISIONS = ("fp32", "bf16", "fp16")
RANDOM_INIT_SEED = 0
# ViTs named in the messages that refuse other architectures.
SUGGESTED_VITS = (DEFAULT_BACKBONE, "vit_small_patch8_224.dino", "vit_small_patch14_dinov2", "vit_base_patch14_dinov2")


@dataclass(frozen=True)
class BackboneSpec:
    """What to load: a timm model name, optional local weights, the block and input size.

    ``layer`` counts blocks from 0; None means the last block (negative values count
    from the end). ``image_size`` None means the weights' pretrained input size.
    ``pretrained=False`` builds the model with seeded random weights (tests, timing).
    """

    name: str = DEFAULT_BACKBONE
    weights: Optional[str] = None
    layer: Optional[int] = None
    image_size: Optional[int] = None
    pretrained: bool = True


def known_metadata(spec: BackboneSpec, precision: str) -> dict:
    """The store attributes :attr:`Backbone.metadata` will have that are known before loading the model.

    Lets ``extract`` refuse a store made with other settings in seconds instead of after the
    backbone has loaded: the name, precision, an explicit block or input size, and the sha256 of
    a local weights file.
    """
    out: dict = {"backbone": spec.name, "precision": precision}
    if spec.layer is not None and spec.layer >= 0:
        out["layer"] = spec.layer
    if spec.image_size is not None:
        out.update(image_size=spec.image_size, resize=resize_for(spec.image_size), crop=spec.image_size)
    if spec.weights is not None and Path(spec.weights).expanduser().is_file():
        out["weights_sha256"] = file_sha256(Path(spec.weights).expanduser())
    return out


class Backbone:
    """A frozen timm ViT that returns one block's class and patch tokens.

    Attributes: ``name``, ``layer`` (non-negative block index), ``image_size`` (S),
    ``resize`` (R), ``patch_size``, ``grid (h, w)``, ``n_patches`` (P), ``token_dim``
    (C), ``mean``/``std`` (3-tuples), ``precision``, ``device``, ``metadata`` (the
    store attributes that define the features).
    """

    def __init__(self, model: torch.nn.Module, *, name: str, layer: int, image_size: int, device: torch.device,
                 precision: str, weights: str, weights_sha256: str) -> None:
        self.model = model
        self.name = name
        self.layer = layer
        self.image_size = image_size
        self.resize = resize_for(image_size)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.grid = (image_size // self.patch_size, image_size // self.patch_size)
        self.n_patches = self.grid[0] * self.grid[1]
        self.token_dim = int(model.embed_dim)
        cfg = model.pretrained_cfg
        self.mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
        self.device = device
        self.precision = precision
        self.weights = weights
        self.weights_sha256 = weights_sha256
        # (x / 255 - mean) / std folded into one multiply-add: x * scale + shift
        std_t = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.tensor(self.mean, device=device).view(1, 3, 1, 1) / std_t

    @property
    def preview_size(self) -> int:
        """Side of the stored previews: ``min(S, 224)``."""
        return min(self.image_size, 224)

    @property
    def metadata(self) -> dict:
        """Store attributes that define the features (compared before resuming an extraction)."""
        return {
            "backbone": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "layer": self.layer,
            "image_size": self.image_size,
            "resize": self.resize,
            "crop": self.image_size,
            "resize_interpolation": "bilinear",
            "mean": list(self.mean),
            "std": list(self.std),
            "patch_size": self.patch_size,
            "grid": list(self.grid),
            "n_patches": self.n_patches,
            "token_dim": self.token_dim,
            "feature_dim": 2 * self.token_dim,
            "precision": self.precision,
        }

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, 3, S, S)`` uint8 (0..255) on any device -> ``(n, 3, S, S)`` float32 normalised on ``device``."""
        x = images.to(self.device, non_blocking=True).float()
        return torch.addcmul(self._shift, x, self._scale)

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (n, 3, S, S)`` normalised -> ``(class tokens (n, C), patch tokens (n, P, C))``, float32.

        Both come from block ``layer`` after the model's final LayerNorm; with
        register tokens, only the class token (the first prefix token) is kept.
        """
        if x.shape[1:] != (3, self.image_size, self.image_size):
            raise BackboneError(f"backbone {self.name} expects input (n, 3, {self.image_size}, {self.image_size}), "
                                f"got {tuple(x.shape)}")
        with self._autocast():
            (patches, prefix), = self.model.forward_intermediates(
                x.to(self.device), indices=[self.layer], norm=True, output_fmt="NLC",
                return_prefix_tokens=True, intermediates_only=True, stop_early=True)
        return prefix[:, 0].float(), patches.float()


def load_backbone(spec: BackboneSpec, device: str | torch.device = "cpu", *, precision: str = "bf16") -> Backbone:
    """Build the backbone described by ``spec`` on ``device``, frozen and in eval mode.

    Raises :class:`BackboneError` for an unknown model, a model without a class
    token, a block or input size it cannot use, weights that cannot be fetched
    (offline: pass ``weights=``) or a weights file that does not fit the model.
    """
    import timm  # slow import, kept out of module import time

    if precision not in PRECISIONS:
        raise BackboneError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if not timm.is_model(spec.name):
        raise BackboneError(f"timm has no model {spec.name!r}; see timm.list_models('vit_*') for the names "
                            f"(the paper's backbone is {DEFAULT_BACKBONE})")
    size = spec.image_size
    kwargs = dict(num_classes=0)
    if size is not None:
        kwargs["img_size"] = size
    if spec.weights is not None and not spec.pretrained:
        raise BackboneError("a weights file was given together with pretrained=False; drop one of them")
    # An empty model on the meta device (no memory, no download) tells what the name builds, so a
    # non-ViT or an impossible input size is refused before any weights are fetched.
    with torch.device("meta"):
        skeleton = _create(timm, spec.name, pretrained=False, overlay=None, kwargs=kwargs, source=None)
    _check_architecture(skeleton, spec.name)

    if spec.weights is not None:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            raise BackboneError(f"weights file {path} does not exist; check the --weights path")
        overlay = weights_overlay(path)
        try:
            model = _create(timm, spec.name, pretrained=True, overlay=overlay, kwargs=kwargs, source=str(path))
        except _WeightsDoNotFit as exc:
            raise BackboneError(mismatch_message(path, spec.name, skeleton, exc.__cause__)) from exc.__cause__
        weights, sha = str(path.resolve()), file_sha256(path)
    elif spec.pretrained:
        with offline_if_hub_unreachable():
            model = _create(timm, spec.name, pretrained=True, overlay=None, kwargs=kwargs, source=None)
        weights, sha = f"timm:{spec.name}", state_dict_sha256(model)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = _create(timm, spec.name, pretrained=False, overlay=None, kwargs=kwargs, source=None)
        weights, sha = f"random-init(seed={RANDOM_INIT_SEED})", state_dict_sha256(model)

    image_size = int(model.patch_embed.img_size[0])
    layer = _resolve_layer(spec.layer, len(model.blocks), spec.name)
    if hasattr(model, "prune_intermediate_layers"):
        model.prune_intermediate_layers(indices=[layer], prune_norm=False, prune_head=True)
    model.eval().requires_grad_(False).to(device)
    bb = Backbone(model, name=spec.name, layer=layer, image_size=image_size, device=device,
                  precision=precision, weights=weights, weights_sha256=sha)
    logger.info("backbone %s (%s), block %d, input %d, grid %dx%d, C=%d, %s on %s", spec.name, weights, layer,
                image_size, *bb.grid, bb.token_dim, precision, device)
    return bb


class _WeightsDoNotFit(Exception):
    """timm's strict loading refused a local weights file (the cause holds timm's error)."""


def _create(timm, name: str, *, pretrained: bool, overlay: Optional[dict], kwargs: dict, source: Optional[str]):
    try:
        return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs)
    except OSError as exc:  # hub/url download failed: offline, proxy, missing cache entry
        if source is not None:
            raise BackboneError(f"cannot read weights file {source}: {exc}") from exc
        raise BackboneError(
            f"cannot fetch the pretrained weights of {name} ({type(exc).__name__}: {str(exc)[:200]}). "
            f"This machine seems to be offline. Download the weights elsewhere (timm / Hugging Face hub, "
            f"or the official DINO checkpoint) and pass the file with --weights FILE") from exc
    except RuntimeError as exc:
        if source is None:
            raise BackboneError(f"cannot build {name}: {exc}") from exc
        raise _WeightsDoNotFit() from exc
    except (AssertionError, ValueError, TypeError) as exc:
        raise BackboneError(f"cannot build {name} with {kwargs} ({exc}); check --image-size and --backbone") from exc


# --------------------------------------------------------------------------- architecture checks


def _check_architecture(model: torch.nn.Module, name: str) -> None:
    needed = ("forward_intermediates", "blocks", "patch_embed", "embed_dim")
    if not all(hasattr(model, a) for a in needed):
        raise BackboneError(f"{name} is not a Vision Transformer ({type(model).__name__}): FUN-AD's features are a "
                            f"ViT's class and patch tokens. Use a timm ViT, e.g. {', '.join(SUGGESTED_VITS)}")
    if getattr(model, "cls_token", None) is None or getattr(model, "num_prefix_tokens", 0) < 1:
        raise BackboneError(f"{name} has no class token, which FUN-AD's features need; pick a ViT with one")
    size = tuple(model.patch_embed.img_size)
    patch = tuple(model.patch_embed.patch_size)
    if size[0] != size[1] or patch[0] != patch[1] or size[0] % patch[0]:
        raise BackboneError(f"{name}: input size {size} must be square and a multiple of the patch size {patch}; "
                            f"pick --image-size as a multiple of {patch[0]}")


def _resolve_layer(layer: Optional[int], depth: int, name: str) -> int:
    if layer is None:
        return depth - 1
    resolved = layer + depth if layer < 0 else layer
    if not 0 <= resolved < depth:
        raise BackboneError(f"--layer {layer} is out of range: {name} has {depth} blocks (0..{depth - 1})")
    return resolved


# --------------------------------------------------------------------------- pre-processing


class ImageTransform:
    """PIL image -> the backbone's input: RGB, square resize R (bilinear), centre crop S.

    ``crop(img)`` gives the cropped RGB image ``(S, S, 3) uint8``; calling the
    transform gives the normalised tensor ``(3, S, S) float32``.
    """

    def __init__(self, image_size: int, mean, std) -> None:
        self.image_size = image_size
        self.resize = resize_for(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def crop_box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the centre crop in the resized image (torchvision's rounding)."""
        off = int(round((self.resize - self.image_size) / 2.0))
        return off, off, off + self.image_size, off + self.image_size

    def crop(self, img: Image.Image) -> np.ndarray:
        """``(S, S, 3) uint8``: the RGB image after resize and centre crop."""
        img = img.convert("RGB").resize((self.resize, self.resize), Image.BILINEAR)
        return np.asarray(img.crop(self.crop_box()))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(self.crop(img).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std


class MaskTransform:
    """PIL mask -> ``(S, S) uint8`` in {0, 1}: same geometry as the image, nearest resampling.

    A pixel is anomalous when its grey value is above ``threshold`` (0 by default).
    """

    def __init__(self, image_size: int, threshold: int = 0) -> None:
        self.image_size = image_size
        self.resize = resize_for(image_size)
        self.threshold = threshold
        self._box = ImageTransform(image_size, (0, 0, 0), (1, 1, 1)).crop_box()

    def __call__(self, mask: Image.Image) -> np.ndarray:
        m = mask.convert("L").resize((self.resize, self.resize), Image.NEAREST).crop(self._box)
        return (np.asarray(m) > self.threshold).astype(np.uint8)


def image_transform(bb: Backbone) -> ImageTransform:
    """The pre-processing that matches ``bb`` (input size and mean/std)."""
    return ImageTransform(bb.image_size, bb.mean, bb.std)


def mask_transform(bb: Backbone, threshold: int = 0) -> MaskTransform:
    """The mask geometry that matches ``bb``; pixels above ``threshold`` are anomalous."""
    return MaskTransform(bb.image_size, threshold)


def make_preview(crop: np.ndarray, size: int) -> np.ndarray:
    """``(S, S, 3) uint8`` cropped image -> ``(size, size, 3) uint8`` (bilinear)."""
    if crop.shape[0] == size:
        return crop
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))
