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
              help="Output folder: scores.json, scores.csv, heatmaps/ or maps/ (sub-folders mirror the inputs'). "
                   "Must be empty unless --overwrite.")
@click.option("--overwrite", is_flag=True,
              help="Replace what an earlier funad predict wrote into the output folder (nothing else is touched).")
@click.option("--threshold", type=float, default=None,
              help="Override the model's own threshold (chosen without labels at the end of funad fit): an image "
                   "is anomalous when its score >= T. Must lie within the model's training score range.")
@click.option("--heatmaps", type=click.Choice(["png", "npy", "tiff", "none"]), default="png", show_default=True,
              help="Per image: png = image + overlay on the model's fixed colour scale (0.5 = threshold), "
                   "npy / tiff = the float32 anomaly map at the original size (.npy or 32-bit float .tiff), none = scores only.")
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
@user_errors
def predict(model_dir: Path, images: tuple[Path, ...], out_dir: Path, overwrite: bool, threshold: Optional[float],
            heatmaps: str, batch_size: int, device: str, precision: Optional[str], workers: Optional[int],
            strict: bool, weights: Optional[Path]) -> None:
    """Score IMAGES (files or folders of images, searched recursively) with the model in MODEL_DIR.

    \b
    Each image gets its raw score, a normalised score (0.5 = the threshold)
    and a decision at the model's own threshold, chosen without labels when
    the model was fitted (or at --threshold). The backbone is rebuilt from the
    settings the model records and checked against them. A missing or
    unreadable image is recorded as an error and the others are still
    scored, unless --strict.
    """
    from funad.pipelines.predict import NO_THRESHOLD_NOTE, predict as run_predict

    with RichProgress() as progress:
        result = run_predict(model_dir, images, out_dir, threshold=threshold, batch_size=batch_size, device=device,
                             precision=precision, strict=strict, weights=weights, workers=workers,
                             heatmaps=heatmaps, overwrite=overwrite, progress=progress)
    decided = result.threshold is not None
    table = Table(title=f"funad predict ({len(result.records)} inputs)", title_justify="left")
    table.add_column("path")
    table.add_column("score", justify="right")
    if decided:
        table.add_column("normalised", justify="right")
        table.add_column("anomalous")
    table.add_column("error")
    for r in result.records[:_SHOWN]:
        row = [r["path"], "" if r["score"] is None else f"{r['score']:.4g}"]
        if decided:
            row.append("" if r.get("normalised_score") is None else f"{r['normalised_score']:.2f}")
            row.append("" if r.get("is_anomalous") is None else ("[bold red]yes[/]" if r["is_anomalous"] else "no"))
        row.append(f"[red]{r['error']}[/]" if r["error"] else "")
        table.add_row(*row)
    if len(result.records) > _SHOWN:
        table.add_row(f"... {len(result.records) - _SHOWN} more in scores.csv", "", *([""] * (2 if decided else 0)), "")
    stdout_console.print(table)
    tp = result.throughput
    if tp["images_per_s"] is not None:
        console.print(f"{tp['images_per_s']:.1f} images/s end to end (files -> scores, --heatmaps {tp['heatmaps']}) "
                      f"on {tp['device']}")
    if decided:
        flagged = sum(1 for r in result.records if r.get("is_anomalous"))
        console.print(f"{flagged} of {sum(r['score'] is not None for r in result.records)} image(s) anomalous at "
                      f"threshold {result.threshold:.6g} ({result.decision['source']})")
    else:
        console.print(NO_THRESHOLD_NOTE)
    if result.n_errors:
        console.print(f"[yellow]{result.n_errors} input(s) could not be scored; see the error column of "
                      f"{out_dir / 'scores.csv'}[/]")
    console.print(f"Results: {out_dir}")
