"""What ``funad predict`` reads and where it writes: the input images (recursive) and its output folder.

Inputs: files and folders. A folder contributes every image file below it
(by suffix, case-insensitive, recursively; hidden files and folders are
skipped), sorted by path. Each image gets an output name, ``rel``, that
mirrors where it was found: ``<folder name>/<sub folders>/<stem>`` for an
image found in a folder, ``<stem>`` for a file given directly. Two inputs
that would share a name get ``~2``, ``~3``... appended (logged).

Output folder: a run refuses a non-empty folder unless ``overwrite``, so
results of two runs are never mixed. Every run writes ``MANIFEST``
(.funad-predict.json) before its first output file, naming the output
folders it creates (``heatmaps/``, ``maps/`` when they did not exist), and
at its end the list of files it wrote; ``overwrite`` removes exactly those
files and every file in those folders (so an interrupted run is cleared
too), then the folders left empty, and nothing else. A
folder written before the manifest existed: ``overwrite`` removes
``scores.json``, ``scores.csv`` and ``heatmaps/NNNNN_*.png``, what that
version wrote.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .dataset_files import IMAGE_SUFFIXES
from .errors import PipelineError

logger = logging.getLogger(__name__)

MANIFEST = ".funad-predict.json"
OUTPUT_DIRS = ("heatmaps", "maps")
_LEGACY = re.compile(r"^\d{5}_.*\.png$")


@dataclass(frozen=True)
class InputImage:
    """One image to score: its path and its output name (no suffix; "/" separates mirrored folders)."""

    path: Path
    rel: str


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _walk(folder: Path) -> list[Path]:
    """Image files below ``folder``, recursively, hidden entries skipped, sorted by relative path."""
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not _is_image(p):
            continue
        found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def collect_images(inputs: Sequence[Path]) -> tuple[list[InputImage], list[tuple[Path, str]]]:
    """Expand files and folders into images with mirrored output names (module docstring).

    Returns ``(images, problems)``: a problem is ``(path, reason)`` for a
    missing path or a folder without images.
    """
    images: list[InputImage] = []
    problems: list[tuple[Path, str]] = []
    taken: set[str] = set()

    def add(path: Path, rel: str) -> None:
        name, n = rel, 1
        while name in taken:
            n += 1
            name = f"{rel}~{n}"
        if name != rel:
            logger.warning("%s: output name %s is taken by another input; written as %s", path, rel, name)
        taken.add(name)
        images.append(InputImage(path, name))

    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = _walk(p)
            if not found:
                problems.append((p, f"folder contains no image files ({', '.join(IMAGE_SUFFIXES)}), "
                                    "in it or in its sub-folders"))
            base = p.resolve().name or "input"
            for f in found:
                add(f, (Path(base) / f.relative_to(p).with_suffix("")).as_posix())
        elif p.is_file():
            add(p, p.stem)
        else:
            problems.append((p, "no such file or folder"))
    return images, problems


def _written_before(out_dir: Path) -> list[Path]:
    """The files an earlier funad predict wrote into ``out_dir`` (manifest, or the legacy names)."""
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        try:
            doc = json.loads(manifest.read_text(encoding="utf-8"))
            names, owned = list(doc["files"]), list(doc.get("owned_dirs", []))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PipelineError(f"{manifest} is unreadable ({exc}); remove the output folder {out_dir} by hand "
                                "or choose another -o") from exc
        files = [out_dir / n for n in names]
        for d in owned:
            if d in OUTPUT_DIRS and (out_dir / d).is_dir():
                files += [p for p in (out_dir / d).rglob("*") if p.is_file()]
        return [f for f in files if f.resolve().is_relative_to(out_dir.resolve())] + [manifest]
    legacy = [out_dir / "scores.json", out_dir / "scores.csv"]
    heat = out_dir / "heatmaps"
    if heat.is_dir():
        legacy += [p for p in heat.iterdir() if p.is_file() and _LEGACY.match(p.name)]
    return legacy


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out_dir`` unless ``overwrite``; then remove what funad wrote there before."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"output {out_dir} exists and is not a folder; choose another -o")
    if not out_dir.is_dir() or not any(p.name != MANIFEST for p in out_dir.iterdir()):
        out_dir.mkdir(parents=True, exist_ok=True)  # empty, or only the manifest of a run that wrote nothing
        _start_manifest(out_dir)
        return
    if not overwrite:
        shown = ", ".join(sorted(p.name for p in out_dir.iterdir())[:4])
        raise PipelineError(f"output folder {out_dir} is not empty ({shown}, ...); pass --overwrite to replace what "
                            f"an earlier funad predict wrote there (nothing else is touched), or choose another -o")
    removed = 0
    for f in _written_before(out_dir):
        if f.is_file():
            f.unlink()
            removed += 1
            parent = f.parent
            while parent != out_dir and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    left = sorted(p.name for p in out_dir.iterdir())
    logger.info("--overwrite: removed %d file(s) of an earlier run from %s", removed, out_dir)
    if left:
        logger.warning("%s keeps %d entr(ies) funad did not write (e.g. %s); they are left untouched", out_dir,
                       len(left), left[0])
    _start_manifest(out_dir)


def _start_manifest(out_dir: Path) -> None:
    """Before any output: the output folders this run creates, so an interrupted run can be cleared."""
    owned = [d for d in OUTPUT_DIRS if not (out_dir / d).exists()]
    _write(out_dir, {"written_by": "funad predict", "complete": False, "owned_dirs": owned,
                     "files": ["scores.json", "scores.csv"]})


def _write(out_dir: Path, doc: dict) -> Path:
    path = out_dir / MANIFEST
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def write_manifest(out_dir: Path, files: Sequence[Path]) -> Path:
    """Record the files this run wrote (relative to ``out_dir``), for a later ``--overwrite``."""
    try:
        owned = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8")).get("owned_dirs", [])
    except (OSError, ValueError):
        owned = []
    names = sorted({Path(f).resolve().relative_to(out_dir.resolve()).as_posix() for f in files})
    return _write(out_dir, {"written_by": "funad predict", "complete": True, "owned_dirs": owned, "files": names})
