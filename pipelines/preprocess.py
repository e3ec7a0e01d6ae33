"""The input pre-processing constants in one place: ImageNet's mean/std and the resize-before-crop rule."""

from __future__ import annotations

# ImageNet statistics: the normalisation of DINO/ViT weights whose config names none.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_for(image_size: int) -> int:
    """Side of the square resize before the centre crop to ``image_size``: ``round(S * 256 / 224)`` (256 for 224)."""
    return int(round(image_size * 256 / 224))
