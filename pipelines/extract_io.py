"""``funad extract``'s two helpers around the forward pass: a Dataset that decodes and
pre-processes images (errors reported per image, not raised in a worker), and a thread
that writes finished batches to the store while the backbone runs on the next ones."""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .backbone import make_preview
from .datasets import Sample
from .errors import DatasetError
from .geometry import Geometry

# Batches waiting for the writer thread; bounds memory to this many batches of features.
WRITE_QUEUE_BATCHES = 4


# --------------------------------------------------------------------------- data loading


class ImageDataset(torch.utils.data.Dataset):
    """Item k -> dict for image ``indices[k]``: uint8 input ``(3, H, W)``, mask ``(H, W)`` (the geometry's frame),
    preview, or an error."""

    def __init__(self, root: Path, samples: list[Sample], indices: np.ndarray, image_size: int,
                 preview_size: int) -> None:
        self.root = root
        self.samples = samples
        self.indices = indices
        self.image_size = image_size
        self.preview_size = preview_size
        # Where images go (funad.pipelines.geometry); extract sets the store's own after construction.
        self.geometry: Geometry = Geometry.paper(image_size, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        i = int(self.indices[k])
        s = self.samples[i]
        try:
            crop, mask = self._load(s)
            digest = source_digest(self.root / s.path)
        except Exception as exc:  # any decoding failure is reported with its path, in the main process
            return {"index": i, "error": f"{type(exc).__name__}: {exc}"}
        return {
            "index": i,
            "error": None,
            "image": torch.from_numpy(crop.transpose(2, 0, 1).copy()),
            "mask": mask,
            "digest": digest,
            "preview": (make_preview(crop, self.preview_size) if self.geometry.mode == "paper"
                        else self.geometry.preview(crop)),
        }

    def _load(self, s: Sample) -> tuple[np.ndarray, np.ndarray]:
        with Image.open(self.root / s.path) as im:
            im.load()
            size = im.size
            crop = self.geometry.crop(im, str(self.root / s.path))
        if s.mask_path is None:
            return crop, np.zeros(crop.shape[:2], np.uint8)
        with Image.open(self.root / s.mask_path) as m:
            if m.size != size:
                raise DatasetError(f"mask {self.root / s.mask_path} is {m.size[0]}x{m.size[1]} but the image is "
                                   f"{size[0]}x{size[1]}; masks must have their image's size")
            mask = self.geometry.crop_mask(m, s.mask_threshold)
        return crop, mask


_NO_DIGEST = np.zeros(32, np.uint8)


def source_digest(path: Path) -> np.ndarray:
    """``(32,) uint8``: the sha256 of the file's bytes, which the store keeps to recognise the file renamed
    (:mod:`funad.pipelines.extract_table`). The file was just decoded, so it is read from the page cache."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    except FileNotFoundError:  # an image made at extraction (a synthetic anomaly) has no file
        return _NO_DIGEST
    return np.frombuffer(h.digest(), np.uint8)


def collate(items: list[dict]) -> dict:
    good = [it for it in items if it["error"] is None]
    batch = {"bad": [(it["index"], it["error"]) for it in items if it["error"] is not None],
             "indices": np.array([it["index"] for it in good], dtype=np.int64)}
    if good:
        batch["images"] = torch.stack([it["image"] for it in good])
        batch["masks"] = np.stack([it["mask"] for it in good])
        batch["previews"] = np.stack([it["preview"] for it in good])
        batch["digests"] = np.stack([it.get("digest", _NO_DIGEST) for it in good])
    return batch


# --------------------------------------------------------------------------- writing


class BatchWriter:
    """A thread that writes batches to the store in order; errors surface in the caller's thread.

    With ``pending`` (the images this process will write, in order), batches are
    held back until every pending image of a store chunk has arrived, and whole
    chunks are written at once: a zarr store then writes each chunk file once,
    instead of reading it back to add a second batch. Whatever is held is written
    by :meth:`close`, also when extraction stops early.
    """

    ARRAYS = ("patch_tokens", "class_tokens", "masks", "previews", "digests")

    def __init__(self, store, task, pending=None, max_batches: int = WRITE_QUEUE_BATCHES) -> None:
        self._store = store
        self._task = task
        self._queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.error: Optional[BaseException] = None
        self.written = 0
        self.skipped = 0
        self._g = int(getattr(store, "chunk_images", 1))
        self._waiting: dict[int, int] = {}  # chunk -> pending images not arrived yet
        if pending is not None and self._g > 1:
            chunks, counts = np.unique(np.asarray(pending, dtype=np.int64) // self._g, return_counts=True)
            self._waiting = dict(zip(chunks.tolist(), counts.tolist()))
        self._held: list[tuple[dict, np.ndarray]] = []  # (payload, positions of its images still to write)
        self._thread = threading.Thread(target=self._run, name="funad-extract-writer", daemon=True)
        self._thread.start()

    def _arrived(self, indices) -> None:
        for c in (np.asarray(indices, dtype=np.int64) // self._g).tolist():
            if c in self._waiting:
                self._waiting[c] -= 1

    def _write_ready(self, everything: bool = False) -> None:
        """Write the held images whose chunk has no pending image left (all of them with ``everything``)."""
        parts = []
        for payload, pos in self._held:
            chunks = np.asarray(payload["indices"], dtype=np.int64)[pos] // self._g
            ready = np.array([everything or self._waiting.get(c, 0) <= 0 for c in chunks.tolist()], dtype=bool)
            parts.append((payload, pos[ready], pos[~ready]))
        self._held = [(payload, rest) for payload, _, rest in parts if rest.size]
        go = [(payload, pos) for payload, pos, _ in parts if pos.size]
        if not go:
            return
        if len(go) == 1 and go[0][1].size == len(go[0][0]["indices"]):  # one whole batch: no copy
            batch = go[0][0]
        else:
            batch = {"indices": np.concatenate([np.asarray(p["indices"])[pos] for p, pos in go])}
            for key in self.ARRAYS:
                if all(p.get(key) is not None for p, _ in go):
                    batch[key] = np.concatenate([np.asarray(p[key])[pos] for p, pos in go])
        n = len(batch["indices"])
        self._store.write_batch(batch["indices"], patch_tokens=batch["patch_tokens"],
                                class_tokens=batch["class_tokens"], masks=batch.get("masks"),
                                previews=batch.get("previews"), digests=batch.get("digests"))
        self.written += n
        self._task.advance(n)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is not None:
                continue  # drain after a failure so put() never blocks forever
            try:
                kind, payload = item
                if kind == "skip":
                    index, reason = payload
                    self._store.mark_skipped(index, reason)
                    self.skipped += 1
                    self._task.advance(1)
                    self._arrived([index])
                else:
                    self._arrived(payload["indices"])
                    self._held.append((payload, np.arange(len(payload["indices"]))))
                self._write_ready()
            except BaseException as exc:  # re-raised in the main thread by put()/close()
                self.error = exc
        if self.error is None:
            try:
                self._write_ready(everything=True)
            except BaseException as exc:
                self.error = exc

    def put(self, kind: str, payload) -> None:
        self._raise_error()
        self._queue.put((kind, payload))

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Write what is queued, stop the thread, and re-raise a write error if one happened."""
        self._queue.put(None)
        self._thread.join()
        self._raise_error()
