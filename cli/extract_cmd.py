"""``funad extract DATA -o CACHE``: backbone features of a dataset into a feature store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import click

from funad.pipelines.datasets import KINDS

from .common import RichProgress, stdout_console, user_errors

# Kept literal so `funad --help` does not import torch; the pipeline validates them again.
_PRECISIONS = ("fp32", "bf16", "fp16")
_DEFAULT_BACKBONE = "vit_base_patch8_224.dino"


@click.command("extract")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Feature store to write: a zarr directory, or an HDF5 file for a .h5/.hdf5 suffix.")
@click.option("--dataset", type=click.Choice(["auto", *KINDS]), default="auto", show_default=True,
              help="Layout of DATA (mvtec, visa, ksdd, mtd, or a plain folder of unlabelled images).")
@click.option("--backbone", default=_DEFAULT_BACKBONE, show_default=True, help="timm model name (a ViT).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Local weights file (timm .safetensors or the official DINO .pth) instead of downloading.")
@click.option("--layer", type=int, default=None, help="Block to take tokens from, counting from 0 [default: last].")
@click.option("--image-size", type=int, default=None, help="Input side S [default: the weights' own].")
@click.option("--geometry", type=click.Choice(["auto", "paper", "full"]), default="auto", show_default=True,
              help="full: the whole image with its aspect ratio, short side S, nothing cropped; frames larger than "
                   "S x S are covered by overlapping S x S tiles stitched into one patch grid. paper: squash to a "
                   "square of S*256/224 and centre-crop S (the paper's protocol: about a quarter of each image, its "
                   "border, is never scored). auto: an existing store's own, else full.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass [default: 8 on CPU, 64 on GPU].")
@click.option("--precision", type=click.Choice(("auto", *_PRECISIONS)), default="auto", show_default=True,
              help="Autocast precision of the forward pass. auto: an existing store's own; else bf16 on a GPU or on "
                   "a CPU with native bf16 (AVX512-BF16/AMX), where it ran 1.3-1.6x faster than fp32 with tokens "
                   "within 1% (benchmarks/results/extract.md); else fp32 (emulated bf16 ran ~7x slower).")
@click.option("--format", "fmt", type=click.Choice(["zarr", "hdf5"]), default=None,
              help="Store format [default: from the output's suffix, else zarr].")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Stored token dtype.")
@click.option("--num-workers", type=click.IntRange(min=0), default=None,
              help="Image-loading worker processes [default: 0 on CPU, where the backbone uses every core; up to 8 on GPU].")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images as skipped instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store instead of resuming into it.")
@click.option("--prune-missing", is_flag=True,
              help="Drop from the store the images whose file is no longer in DATA [default: keep them, marked "
                   "missing from the source, and list them].")
@click.option("--synthetic", type=float, default=None,
              help="Also make FUN-AD* synthetic anomalies, this share of the training images (the paper: 0.05): "
                   "Perlin-noise regions filled with a texture from another training image, stored as the split "
                   "'synthetic' with their masks; a preview grid NAME.synthetic.png is written beside the store.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic images.")
@click.option("--chunk-images", type=click.IntRange(min=1), default=None,
              help="Images per chunk of a new store [default: 16]: a zarr store writes one file per array and "
                   "chunk, and torchrun ranks share the images out by chunk. An existing store keeps its own.")
@user_errors
def extract(data: Path, output: Path, dataset: str, backbone: str, weights: Optional[Path], layer: Optional[int],
            image_size: Optional[int], geometry: str, device: str, batch_size: Optional[int], precision: str,
            fmt: Optional[str], dtype: str, num_workers: Optional[int], skip_bad: bool, overwrite: bool,
            prune_missing: bool, synthetic: Optional[float], seed: int, chunk_images: Optional[int]) -> None:
    """Run the backbone once over DATA and store its features in OUTPUT.

    Re-running on the same OUTPUT resumes: finished images are kept (after a
    check of their checksums; damaged ones are redone), the rest are extracted.
    Different backbone, weights, layer or size settings are refused unless
    --overwrite is given. New files in DATA are appended to the store and
    extracted; files gone from DATA are listed and kept, marked missing
    (--prune-missing drops them); renamed files are recognised by content.

    Several processes (GPUs, nodes) fill one zarr store when launched with
    torchrun: `torchrun --nproc_per_node=N -m funad extract DATA -o OUTPUT ...`.
    """
    from funad.pipelines.backbone import BackboneSpec
    from funad.pipelines.extract import extract as run_extract

    spec = BackboneSpec(name=backbone, weights=None if weights is None else str(weights), layer=layer,
                        image_size=image_size)
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun; only rank 0 reports
    with RichProgress(disable=rank != 0) as progress:
        result = run_extract(data, output, dataset=dataset, backbone=spec, device=device, batch_size=batch_size,
                             precision=precision, format=fmt, dtype=dtype, num_workers=num_workers,
                             skip_bad=skip_bad, overwrite=overwrite, geometry=geometry, prune_missing=prune_missing,
                             synthetic=synthetic, seed=seed, chunk_images=chunk_images,
                             progress=progress)
    if rank != 0:
        return
    for line in result.table.lines() if result.table is not None else ():
        stdout_console.print(f"{result.path}: {line}", soft_wrap=True)
    stdout_console.print(
        f"{result.path}: {result.written} images written, {result.skipped} skipped, {result.already} already "
        f"complete ({result.n_images} in all) in {result.seconds:.1f} s"
        + (f", {result.images_per_second:.2f} images/s" if result.written else ""), soft_wrap=True)
