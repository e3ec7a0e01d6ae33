"""``funad extract`` on a folder that changed since its store was made: new, removed and renamed files.

Images are matched by their path relative to the dataset root:

* **new** files (paths the store lacks) are appended to the store, pending, and
  extracted; nothing already extracted is computed again;
* **removed** files (paths the store holds that are no longer in the folder) are
  reported by name and count, and kept in the store with their features, marked
  as missing from the source (``funad cache info`` lists them; models fitted
  on them can still be evaluated). ``--prune-missing`` drops them instead. An
  image that was never extracted and whose file is gone is recorded as skipped;
* **renamed** files are recognised when the store recorded the sha256 of the old
  file and a new file has the same content: they are reported as renames. The
  new path is extracted like any new file (its split, label and mask may
  differ), and the old one is handled as removed;
* a store with synthetic anomalies (``--synthetic``) does not grow: their plan
  depends on the training images, so a changed folder is refused;
* a kept path whose split, label or defect type the reader now gives otherwise
  (KolektorSDD assigns whole item folders to a split with a seeded shuffle, so
  a new item folder can move old images) is refused: the store's split would
  silently change under the models fitted on it.

All of this is decided before the backbone loads. The store's table changes
through :func:`funad.cache.grow`, which never leaves a half-changed store.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from funad import cache

logger = logging.getLogger(__name__)

SHOW = 10  # names listed in a message before "..."
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class TableChanges:
    """How a dataset folder differs from its store's sample table (indices into the store, positions in
    the dataset's records)."""

    added: list[int] = field(default_factory=list)      # dataset positions of paths the store lacks
    missing: list[int] = field(default_factory=list)    # store indices of paths no longer in the folder
    returned: list[int] = field(default_factory=list)   # store indices marked missing whose file is back

    @property
    def any(self) -> bool:
        return bool(self.added or self.missing or self.returned)


@dataclass(frozen=True)
class TableReport:
    """What a run did to the store's sample table, for the CLI to print (paths relative to the root)."""

    added: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)          # kept, marked missing from the source
    pruned: list[str] = field(default_factory=list)           # dropped with --prune-missing
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (old path, new path), same content
    returned: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.missing or self.pruned or self.renamed or self.returned)

    def lines(self) -> list[str]:
        """One line per kind of change, for people."""
        out = []
        if self.added:
            out.append(f"{len(self.added)} new images appended: {listing(self.added)}")
        if self.renamed:
            out.append(f"{len(self.renamed)} files renamed (same content; the new path is extracted, the old "
                       f"one handled as removed): " + listing([f"{a} -> {b}" for a, b in self.renamed]))
        if self.missing:
            out.append(f"{len(self.missing)} images are no longer in the dataset folder; kept in the store, "
                       f"marked missing (pass --prune-missing to drop them): {listing(self.missing)}")
        if self.pruned:
            out.append(f"{len(self.pruned)} images no longer in the dataset folder were dropped from the store "
                       f"(--prune-missing): {listing(self.pruned)}")
        if self.returned:
            out.append(f"{len(self.returned)} images marked missing are back in the folder: {listing(self.returned)}")
        return out


def listing(names: list[str]) -> str:
    return ", ".join(names[:SHOW]) + (f" ... ({len(names) - SHOW} more)" if len(names) > SHOW else "")


def compare(store, records: list[dict]) -> TableChanges:
    """How ``records`` (the dataset as the reader sees it now) differ from ``store``'s table.

    Raises CacheMismatchError when a path in both has another split, label or defect type, and for a
    store of cache format 1 (written by an older funad; it opens read-only).
    """
    if store.version < 2:
        raise cache.CacheMismatchError(
            f"{store.path} was written by an older funad (cache format {store.version}): it can still be read "
            f"(fit, eval), but not resumed, grown or verified. Extract into a new output, or pass --overwrite "
            f"to re-create it")
    stored = store.samples
    if store.attrs.get("synthetic"):
        real = ({s["path"] for s in stored if s["split"] != "synthetic"},
                {r["path"] for r in records if r["split"] != "synthetic"})
        if real[0] != real[1]:
            raise cache.CacheMismatchError(
                f"{store.path} holds synthetic anomalies (--synthetic), and the dataset folder changed since "
                f"({len(real[1] - real[0])} new, {len(real[0] - real[1])} removed files): which training images "
                f"they come from depends on the folder, so such a store cannot grow. Extract the folder into a "
                f"new output, or pass --overwrite")
    position = {s["path"]: i for i, s in enumerate(stored)}
    in_data = {r["path"] for r in records}
    changed = [(stored[position[r["path"]]], r) for r in records
               if r["path"] in position and stored[position[r["path"]]] != r]
    if changed:
        old, new = changed[0]
        what = "; ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in ("split", "label", "defect_type") if old[k] != new[k])
        raise cache.CacheMismatchError(
            f"{store.path}: {len(changed)} images the store holds have another split, label or defect type in the "
            f"dataset now, e.g. {new['path']} ({what}); the dataset reader assigns them otherwise (a new KolektorSDD "
            f"item folder reshuffles which items are training items). Models fitted on the store would see their "
            f"split change, so write to a new output, or pass --overwrite to start over")
    added = [j for j, r in enumerate(records) if r["path"] not in position]
    marked = set(store.missing_from_source.tolist())
    missing = [i for i, s in enumerate(stored) if s["path"] not in in_data]
    returned = sorted(i for i in marked if stored[i]["path"] in in_data)
    return TableChanges(added=added, missing=missing, returned=returned)


def file_sha256(path: Path) -> Optional[str]:
    """The hex sha256 of a file's bytes (None when it cannot be read)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def find_renames(store, root: Path, records: list[dict], changes: TableChanges) -> list[tuple[int, int]]:
    """``(store index, dataset position)`` pairs: a vanished file whose recorded sha256 a new file has.

    Only newly added files are hashed, and only when a vanished image has a recorded digest.
    """
    marked = set(store.missing_from_source.tolist())
    gone = [i for i in changes.missing if i not in marked]
    digests = dict(zip(gone, store.source_digests(gone))) if gone else {}
    wanted: dict[str, int] = {d: i for i, d in digests.items() if d is not None}
    if not wanted or not changes.added:
        return []
    pairs = []
    for j in changes.added:
        d = file_sha256(root / records[j]["path"])
        if d in wanted:
            pairs.append((wanted.pop(d), j))
    return pairs


def sync(store, root: Path, records: list[dict], *, prune: bool):
    """Bring ``store``'s table in line with the dataset ``records``; returns ``(store, TableReport)``.

    ``store`` is open for writing and holds the lock; the returned store replaces it (the same object
    when nothing changed). Settings must have been checked already.
    """
    changes = compare(store, records)
    stored = store.samples
    marked = set(store.missing_from_source.tolist())
    renames = find_renames(store, root, records, changes)
    drop = changes.missing if prune else []
    newly = [i for i in changes.missing if i not in marked]
    report = TableReport(added=[records[j]["path"] for j in changes.added],
                         missing=[] if prune else [stored[i]["path"] for i in changes.missing],
                         pruned=[stored[i]["path"] for i in drop],
                         renamed=[(stored[i]["path"], records[j]["path"]) for i, j in renames],
                         returned=[stored[i]["path"] for i in changes.returned])
    if changes.added or drop or set(changes.missing) != marked:
        store = cache.grow(store, add=[records[j] for j in changes.added],
                           missing=[] if prune else changes.missing, drop=drop)
    for line in report.lines():  # the CLI prints them (ExtractResult.table)
        logger.debug("%s: %s", store.path, line)
    if newly and not prune:
        logger.debug("%s: newly missing: %s", store.path, [stored[i]["path"] for i in newly])
    skip_vanished_pending(store)
    return store, report


def skip_vanished_pending(store) -> None:
    """Images never extracted whose file is gone cannot be extracted: record them as skipped."""
    missing = store.missing_from_source
    pending = missing[store.status[missing] == cache.PENDING] if missing.size else missing
    for i in pending.tolist():
        store.mark_skipped(i, "its file is no longer in the dataset folder (missing from the source)")


def aligned(store, samples: list) -> list:
    """``samples`` (objects with a ``.path``) in the store's order; None for images missing from the source."""
    by_path = {s.path: s for s in samples}
    return [by_path.get(p) for p in store.paths.tolist()]
