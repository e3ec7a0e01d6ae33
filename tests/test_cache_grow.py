"""funad.cache.grow: a store's sample table grows (or loses images) without touching the kept rows."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from funad import cache

grow_module = importlib.import_module("funad.cache.grow")

NEW = [{"path": f"train/good/new{i}.png", "split": "train", "label": 0, "defect_type": "good"} for i in range(2)]


@pytest.mark.parametrize("name", ["t.zarr", "t.h5"])
def test_appended_images_are_pending_and_kept_ones_unchanged(tiny_store, name):
    path = tiny_store(name)
    with cache.open(path) as store:
        n = store.n_images
        before = store.read_features(np.arange(n))
        masks, previews, sums = store.read_masks(np.arange(n)), store.read_previews(np.arange(n)), store.checksums(
            np.arange(n))
    store = cache.grow(cache.open(path, "a"), add=NEW)
    try:
        assert store.n_images == n + 2 and store.status.tolist() == [1] * n + [0, 0]
        assert [s["path"] for s in store.samples[n:]] == [s["path"] for s in NEW]
        store.write(n, patch_tokens=np.full((9, 8), 0.5), class_token=np.full(8, 0.5),
                    preview=np.zeros((6, 6, 3), np.uint8))
    finally:
        store.close()
    assert not cache.lock_path(path).exists()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary store left beside it
    with cache.open(path) as grown:
        assert grown.status.tolist() == [1] * n + [1, 0]
        np.testing.assert_array_equal(grown.read_features(np.arange(n)), before)
        np.testing.assert_array_equal(grown.read_masks(np.arange(n)), masks)
        np.testing.assert_array_equal(grown.read_previews(np.arange(n)), previews)
        np.testing.assert_array_equal(grown.checksums(np.arange(n)), sums)
        assert grown.verify() == []
        np.testing.assert_array_equal(grown.read_patch_tokens([n])[0], np.full((9, 8), 0.5, np.float16))


def test_verify_covers_appended_images(tiny_store):
    path = tiny_store("t.zarr")
    with cache.grow(cache.open(path, "a"), add=NEW) as store:
        store.write(10, patch_tokens=np.ones((9, 8)), class_token=np.ones(8))
    chunk = path / "patch_tokens/c.2.0.0"  # images 8-11 (chunks of 4)
    raw = bytearray(chunk.read_bytes())
    raw[2 * 9 * 8 * 2] ^= 0x40  # a byte of image 10's row
    chunk.write_bytes(bytes(raw))
    with cache.open(path) as store:
        bad = store.verify()
        assert [d["index"] for d in bad] == [10] and "does not match its checksum" in bad[0]["problems"][0]
        with pytest.raises(cache.CorruptCacheError, match="image 10 'train/good/new0.png'"):
            store.read_features([10])


def test_missing_marks_and_drop_renumber(tiny_store):
    path = tiny_store("t.zarr")
    with cache.open(path) as store:
        paths = list(store.paths)
        kept_feats = store.read_features([0, 2, 3])
        fp = store.fingerprint()
    with cache.grow(cache.open(path, "a"), missing=[3, 5]) as store:
        assert store.missing_from_source.tolist() == [3, 5] and store.n_images == 10
        assert store.fingerprint() == fp  # marks do not change what the features are
        assert store.summary()["missing_from_source"] == [paths[3], paths[5]]
    with cache.grow(cache.open(path, "a"), drop=[1, 5]) as store:
        assert list(store.paths) == [p for i, p in enumerate(paths) if i not in (1, 5)]
        assert store.missing_from_source.tolist() == [2]  # old image 3 is now image 2; old 5 was dropped
        np.testing.assert_array_equal(store.read_features([0, 1, 2]), kept_feats)
        assert store.verify() == []


def test_a_crash_before_the_swap_leaves_the_old_store(tiny_store, monkeypatch):
    path = tiny_store("t.zarr")
    with cache.open(path) as store:
        fp, n = store.fingerprint(), store.n_images

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(grow_module, "_swap", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.grow(cache.open(path, "a"), add=NEW)
    assert not cache.lock_path(path).exists()
    with cache.open(path) as store:
        assert store.fingerprint() == fp and store.n_images == n and store.verify() == []


def test_repeated_path_and_readers_are_refused(tiny_store):
    path = tiny_store("t.zarr")
    with cache.open(path) as store:
        first = store.samples[0]
        with pytest.raises(cache.CacheError, match="only the writer holding the store's lock"):
            cache.grow(store, add=NEW)
    with pytest.raises(cache.CacheMismatchError, match="appears twice"):
        cache.grow(cache.open(path, "a"), add=[first])
    assert not cache.lock_path(path).exists()


def test_without_hard_links_the_chunks_are_copied(tiny_store, monkeypatch):
    path = tiny_store("t.zarr")
    with cache.open(path) as store:
        before = store.read_features(np.arange(store.n_images))

    def no_links(src, dst, *args, **kwargs):
        raise PermissionError(1, "hard links are not allowed here")

    monkeypatch.setattr(grow_module, "_link", no_links)
    with cache.grow(cache.open(path, "a"), add=NEW) as store:
        np.testing.assert_array_equal(store.read_features(np.arange(10)), before)
        assert store.verify() == []
    assert (path / "patch_tokens/c.0.0.0").stat().st_nlink == 1  # a copy, not a link
