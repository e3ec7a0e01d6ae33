"""``funad eval``: metrics, scores and heatmaps of fitted models, from the cache alone."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import click
from rich.table import Table

from .common import RichProgress, console, stdout_console, user_errors


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def results_table(results: Sequence, mean: Optional[dict], std: Optional[dict] = None) -> Table:
    """Per-model rows (percent, like the paper's tables) and, for several models, the mean and std rows."""
    from funad.pipelines.evaluate import TABLE_CAPTION, TABLE_COLUMNS

    table = Table(title="funad eval", title_justify="left", caption=TABLE_CAPTION, caption_justify="left")
    table.add_column("model", no_wrap=True)
    for _, header in TABLE_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("n test", justify="right", no_wrap=True)
    table.add_column("ρ", no_wrap=True)
    for r in results:
        m = r.metrics
        split = f"{100 * float(m['split']['ratio']):g}%{' ov' if m['split']['overlap'] else ''}"
        name = r.name + (" [bold red](ORACLE)[/]" if r.oracle else "")
        table.add_row(name, *[_fmt(m.get(k)) for k, _ in TABLE_COLUMNS], str(m["counts"]["n_test"]), split)
    if mean is not None:
        table.add_section()
        table.add_row("[bold]mean[/]", *[f"[bold]{_fmt(mean.get(k))}[/]" for k, _ in TABLE_COLUMNS], "", "")
    if std is not None:
        table.add_row("std", *[_fmt(std.get(k)) for k, _ in TABLE_COLUMNS], "", "")
    return table


@click.command("eval")
@click.argument("model_dirs", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=None,
              help="Feature cache to evaluate on (default: the one the model records). Its fingerprint must match.")
@click.option("-o", "--output", "report_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Report folder (one sub-folder per model when several are given). Never a model folder.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=0),
              help="Pictures of the K most and K least anomalous test images.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where to score the patches.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Images scored at once.")
@click.option("--no-pictures", is_flag=True, help="Skip the PNGs (metrics.json and scores.csv only).")
@click.option("--map-size", type=click.Choice(["auto", "original", "input"]), default="auto", show_default=True,
              help="original: maps, masks, pixel metrics and pictures at the original images' pixel size (reads the "
                   "images and masks of the dataset the cache records); input: the cache's own frame, from the "
                   "cache alone; auto: original when the cache came from a dataset funad reads.")
@click.option("--save-maps", type=click.Choice(["npy", "tiff"]), is_flag=False, flag_value="npy", default=None,
              help="Also write each test image's anomaly map as maps/NAME.npy (--save-maps or --save-maps npy) or "
                   "maps/NAME.tiff (--save-maps tiff, a 32-bit float TIFF): float32, NaN where the geometry never "
                   "scored the pixel.")
@user_errors
def evaluate(model_dirs: tuple[Path, ...], cache_path: Optional[Path], report_dir: Path, top_k: int, device: str,
             batch_size: int, no_pictures: bool, map_size: str, save_maps: Optional[str]) -> None:
    """Evaluate MODEL_DIR(s) on the test images of their contamination split.

    \b
    Writes, per model: metrics.json (image/pixel AUROC and AP, AUPRO@0.3,
    image F1-max), scores.csv (one row per test image) and PNG pictures (most
    and least anomalous, every false positive and negative at the F1-max
    threshold, an overview grid). The F1-max threshold is chosen on the test
    labels: it is a reporting figure, not a deployment threshold.

    Several MODEL_DIRs (e.g. one per category) give one table with the mean row.
    """
    from funad.pipelines.evaluate import evaluate_many, mean_row, std_row, write_summary

    with RichProgress() as progress:
        results = evaluate_many(model_dirs, report_dir, cache_path=cache_path, top_k=top_k, device=device,
                                pictures=not no_pictures, batch_size=batch_size, map_size=map_size,
                                save_maps=save_maps or False, progress=progress)
    mean = std = None
    if len(results) > 1:
        mean, std = mean_row(results), std_row(results)
        write_summary(report_dir / "summary.json", results)
    stdout_console.print(results_table(results, mean, std))
    speeds = ", ".join(f"{r.name} {r.metrics['throughput']['images_per_s']:.0f}" for r in results
                       if r.metrics["throughput"]["images_per_s"] is not None)
    console.print(f"eval throughput (images/s, cache -> scores, maps and metrics): {speeds}")
    console.print(f"ρ: contamination ratio, 'ov' = overlap setting. Report: {report_dir}")
