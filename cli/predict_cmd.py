"""``funad predict``: score raw images with a fitted model (the deployment path)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
from rich.table import Table

from .common import RichProgress, console, stdout_console, user_errors

_SHOWN = 20  # rows of the terminal table; the files hold all of them


@click.command("predict")
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder: scores.json, scores.csv, heatmaps/.")
@click.option("--threshold", type=float, default=None,
              help="Call an image anomalous when its score >= T. Without it no decision is made.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Images per backbone forward pass.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="auto: the GPU when there is one.")
@click.option("--precision", default=None, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Backbone autocast precision (default: the one the model's cache was extracted with).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Image decoding workers (default: 1 on CPU, up to 8 with a GPU).")
@click.option("--strict", is_flag=True, help="Stop at the first missing or unreadable image instead of recording it.")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Local backbone weights file; its sha256 must match the one the model records.")
@click.option("--no-heatmaps", is_flag=True, help="Skip the heatmap PNGs.")
@user_errors
def predict(model_dir: Path, images: tuple[Path, ...], out_dir: Path, threshold: Optional[float], batch_size: int,
            device: str, precision: Optional[str], workers: Optional[int], strict: bool, weights: Optional[Path],
            no_heatmaps: bool) -> None:
    """Score IMAGES (files or folders of images) with the model in MODEL_DIR.

    The backbone is rebuilt from the settings the model records and checked
    against them. A missing or unreadable image is recorded as an error and the
    others are still scored, unless --strict.
    """
    from funad.pipelines.predict import NO_THRESHOLD_NOTE, predict as run_predict

    with RichProgress() as progress:
        result = run_predict(model_dir, images, out_dir, threshold=threshold, batch_size=batch_size, device=device,
                             precision=precision, strict=strict, weights=weights, workers=workers,
                             heatmaps=not no_heatmaps, progress=progress)
    table = Table(title=f"funad predict ({len(result.records)} inputs)", title_justify="left")
    table.add_column("path")
    table.add_column("score", justify="right")
    if threshold is not None:
        table.add_column("anomalous")
    table.add_column("error")
    for r in result.records[:_SHOWN]:
        row = [r["path"], "" if r["score"] is None else f"{r['score']:.4g}"]
        if threshold is not None:
            row.append("" if r.get("is_anomalous") is None else ("[bold red]yes[/]" if r["is_anomalous"] else "no"))
        row.append(f"[red]{r['error']}[/]" if r["error"] else "")
        table.add_row(*row)
    if len(result.records) > _SHOWN:
        table.add_row(f"... {len(result.records) - _SHOWN} more in scores.csv", "", *([""] if threshold is not None else []), "")
    stdout_console.print(table)
    tp = result.throughput
    if tp["images_per_s"] is not None:
        line = f"{tp['images_per_s']:.1f} images/s end to end (files -> scores) on {tp['device']}"
        if tp["images_per_s_with_pictures"] is not None:
            line += f"; {tp['images_per_s_with_pictures']:.1f} images/s including the heatmap PNGs"
        console.print(line)
    if threshold is None:
        console.print(NO_THRESHOLD_NOTE)
    if result.n_errors:
        console.print(f"[yellow]{result.n_errors} input(s) could not be scored; see the error column of "
                      f"{out_dir / 'scores.csv'}[/]")
    console.print(f"Results: {out_dir}")
