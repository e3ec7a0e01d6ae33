"""``funad sweep``: a grid of contamination ratios, methods, seeds and settings from one cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from funad.pipelines.settings import FIELDS

from .common import RichProgress, console, user_errors


@click.command("sweep")
@click.argument("cache_path", metavar="CACHE", type=click.Path(path_type=Path))
@click.option("-o", "--output", "sweep_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder for results.csv, results.md and the plot; re-running resumes from results.csv.")
@click.option("--contamination", "ratios", default="0,0.01,0.03,0.05,0.1,0.2", show_default=True,
              metavar="R1,R2,...", help="Anomaly-to-normal ratios (0.1 = 10%).")
@click.option("--overlap", default="both", show_default=True, type=click.Choice(["both", "overlap", "no-overlap"]),
              help="Whether moved anomalies also stay in the test set.")
@click.option("--methods", default="funad,knn", show_default=True, metavar="M1,M2,...",
              help="funad (default preset), funad:<preset> (e.g. funad:paper) or a baseline (knn, softpatch).")
@click.option("--seeds", default="0", show_default=True, metavar="S1,S2,...",
              help="Each seed draws its own contamination split and fit.")
@click.option("--set", "sets", multiple=True, metavar="NAME=V1,V2",
              help=f"Grid over a FunADConfig field (repeatable), e.g. --set lambda_=0,2.5 --set r=0.25,0.5. "
                   f"Fields: {', '.join(FIELDS)} (defaults and presets: funad fit --list-settings).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the FUN-AD presets' epochs.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--map-size", type=click.Choice(["auto", "original", "input"]), default="auto", show_default=True,
              help="original: each cell also gets its pixel metrics at the original images' size (reads the "
                   "dataset's images and masks; the paper crop's unscored border counts as missed); input: the "
                   "cache's frame only; auto: original when the cache came from a dataset funad reads.")
@user_errors
def sweep(cache_path: Path, sweep_dir: Path, ratios: str, overlap: str, methods: str, seeds: str,
          sets: tuple[str, ...], epochs: Optional[int], device: str, map_size: str) -> None:
    """Fit and evaluate every cell of a grid on CACHE, loading its features once.

    \b
    Example:
      funad sweep feats.zarr -o sweep/ --contamination 0,0.1 --methods funad,knn \\
          --seeds 0,1,2 --set lambda_=0,2.5
    Every cell keeps its final epoch: nothing is selected with test labels.
    Cells that differ only in inference settings (scorer, clean_share,
    clean_coreset, clean_max_patches, score_space) train once and share the
    Local-Net (trained_by in results.csv).
    """
    from funad.pipelines import sweep as sw

    grid_sets = sw.parse_grid_sets(sets)
    with RichProgress() as progress:
        rows = sw.sweep(cache_path, sweep_dir, ratios=sw.parse_floats(ratios, "--contamination"), overlap=overlap,
                        methods=sw.parse_methods(methods), seeds=sw.parse_ints(seeds, "--seeds"), sets=grid_sets,
                        epochs=epochs, device=device, map_size=map_size, progress=progress)
    console.print(f"[green]{len(rows)} cells in {sweep_dir / sw.RESULTS_CSV}[/]; table {sweep_dir / sw.RESULTS_MD}, "
                  f"plot {sweep_dir / sw.PLOT_PNG}")
