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
    """A thread that writes batches to the store in order; errors surface in the caller's thread."""

    def __init__(self, store, task, max_batches: int = WRITE_QUEUE_BATCHES) -> None:
        self._store = store
        self._task = task
        self._queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.error: Optional[BaseException] = None
        self.written = 0
        self.skipped = 0
        self._thread = threading.Thread(target=self._run, name="funad-extract-writer", daemon=True)
        self._thread.start()

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
                else:
                    self._store.write_batch(payload["indices"], patch_tokens=payload["patch_tokens"],
                                            class_tokens=payload["class_tokens"], masks=payload["masks"],
                                            previews=payload["previews"], digests=payload.get("digests"))
                    self.written += len(payload["indices"])
                    self._task.advance(len(payload["indices"]))
            except BaseException as exc:  # re-raised in the main thread by put()/close()
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
