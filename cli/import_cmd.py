"""``funad import FEATURE_DIR --category NAME -o CACHE``: start from the authors' published features."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from funad.pipelines.importer import import_features as run_import

from .common import RichProgress, console, user_errors


@click.command("import")
@click.argument("feature_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--category", required=True, help="Category name: reads {cat}.npy, {cat}_test.npy, {cat}_gt.npy "
              "and {cat}_mask.npy.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Feature cache to write (a .zarr directory, or .h5 for HDF5).")
@click.option("--format", "fmt", type=click.Choice(["zarr", "hdf5"]), default=None,
              help="Store format (default: from the suffix of --output; zarr unless .h5/.hdf5).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Precision of the stored tokens.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at --output.")
@user_errors
def import_features(feature_dir: Path, category: str, output: Path, fmt: Optional[str], dtype: str,
                    overwrite: bool) -> None:
    """Convert the FUN-AD authors' DINO feature files in FEATURE_DIR into a feature cache.

    The files do not say how they were made; the cache records the paper's
    set-up (DINO ViT-B/8, last block, 224 px) as an assumption. Train images
    become the clean train split; test labels and masks come from the files.
    """
    with RichProgress() as progress:
        result = run_import(feature_dir, category, output, format=fmt, dtype=dtype, overwrite=overwrite,
                            progress=progress)
    console.print(f"[green]wrote {result.path}[/]: {result.n_train} train + {result.n_test} test images, "
                  f"grid {result.grid[0]}x{result.grid[1]}, C={result.token_dim}; see `funad cache info {result.path}`")
