"""``funad cache info CACHE``: what a feature store holds, for people (rich) or scripts (--json)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from funad.pipelines import cache_tools

from .common import RichProgress, stdout_console, user_errors

_LABELS = {0: "normal", 1: "anomalous", -1: "unknown"}
_SHOW_SKIPPED = 10


def _size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # unreachable; keeps type checkers calm


def _value(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 100 else text[:97] + "..."


def print_summary(summary: dict) -> None:
    """Render :meth:`funad.cache.FeatureStore.summary` as rich tables on stdout."""
    con = stdout_console
    pct = 100.0 * summary["completeness"]
    colour = "green" if summary["n_complete"] == summary["n_images"] else "yellow"
    con.print(f"[bold]{summary['path']}[/]  ({summary['format']}, {_size(summary['size_on_disk_bytes'])} on disk)")
    con.print(f"images: {summary['n_images']}   [{colour}]complete: {summary['n_complete']} ({pct:.1f}%)[/]   "
              f"pending: {summary['n_pending']}   skipped: {summary['n_skipped']}")
    con.print(f"fingerprint: {summary['fingerprint']}")

    counts = Table(title="Images by split, label and defect type", title_justify="left")
    for col in ("split", "label", "defect type"):
        counts.add_column(col)
    for col in ("images", "complete", "pending", "skipped"):
        counts.add_column(col, justify="right")
    for row in summary["counts"]:
        counts.add_row(row["split"], f"{row['label']} ({_LABELS.get(row['label'], '?')})", row["defect_type"],
                       str(row["images"]), str(row["complete"]), str(row["pending"]), str(row["skipped"]))
    con.print(counts)

    meta = Table(title="Metadata", title_justify="left")
    meta.add_column("key")
    meta.add_column("value", overflow="fold")
    for key in sorted(summary["attrs"]):
        meta.add_row(key, _value(summary["attrs"][key]))
    con.print(meta)

    skipped = summary["skipped"]
    if skipped:
        con.print(f"[yellow]skipped images ({len(skipped)}):[/]")
        for s in skipped[:_SHOW_SKIPPED]:
            con.print(f"  {s['index']}  {s['path']}: {s['reason']}")
        if len(skipped) > _SHOW_SKIPPED:
            con.print(f"  ... and {len(skipped) - _SHOW_SKIPPED} more (see --json)")
    missing = summary.get("missing_from_source", [])
    if missing:
        con.print(f"[yellow]{len(missing)} images are no longer in the dataset folder (kept, marked missing; "
                  f"`funad extract ... --prune-missing` drops them):[/]")
        for p in missing[:_SHOW_SKIPPED]:
            con.print(f"  {p}")
        if len(missing) > _SHOW_SKIPPED:
            con.print(f"  ... and {len(missing) - _SHOW_SKIPPED} more (see --json)")
    if summary["n_pending"]:
        con.print(f"[yellow]{summary['n_pending']} images are pending: re-run `funad extract` with the same "
                  "output to finish them[/]")


@click.group("cache")
def cache() -> None:
    """Inspect feature caches written by `funad extract` or `funad import`."""


@cache.command("info")
@click.argument("cache_path", metavar="CACHE", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout, for scripts.")
@user_errors
def info(cache_path: Path, as_json: bool) -> None:
    """Summarise CACHE: image counts per split, label and defect type, metadata, size and completeness."""
    summary = cache_tools.summarise(cache_path)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        print_summary(summary)


@cache.command("verify")
@click.argument("cache_path", metavar="CACHE", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the damaged images as JSON on stdout, for scripts.")
@user_errors
def verify(cache_path: Path, as_json: bool) -> None:
    """Read every complete image of CACHE and check it against its checksums.

    Lists each damaged image (a chunk file that is missing, unreadable or
    changed) and exits with status 1 if there is any; `funad extract` on the
    same output extracts exactly those images again.
    """
    with RichProgress() as progress:
        task = progress.task("verify", total=cache_tools.count_complete(cache_path), unit="img")
        n_complete, damaged = cache_tools.verify(cache_path, on_progress=task.advance)
    if as_json:
        click.echo(json.dumps({"path": str(cache_path), "n_checked": n_complete, "damaged": damaged}, indent=2))
    elif not damaged:
        stdout_console.print(f"{cache_path}: all {n_complete} complete images match their checksums")
    else:
        stdout_console.print(f"[red]{cache_path}: {len(damaged)} of {n_complete} complete images are damaged:[/]")
        for d in damaged:
            stdout_console.print(f"  {d['index']}  {d['path']}: {'; '.join(d['problems'])}", soft_wrap=True,
                                 highlight=False)
        stdout_console.print(f"Run `funad extract` with the same output ({cache_path}) to extract them again.")
    if damaged:
        raise SystemExit(1)
