"""The feature store: round trips in both formats, completion flags, crash safety, modes, integrity."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from funad import cache
from funad.cache import _zarr
from funad.cli.cache_cmd import cache as cache_cli

FORMATS = ["tiny.zarr", "tiny.h5"]


def _samples(n: int, n_test: int = 0) -> list[dict]:
    out = [{"path": f"train/{i}.png", "split": "train", "label": 0, "defect_type": "good"} for i in range(n - n_test)]
    out += [{"path": f"test/{i}.png", "split": "test", "label": 1, "defect_type": "crack"} for i in range(n_test)]
    return out


def _create(path: Path, n: int = 4, **overrides) -> cache.FeatureStore:
    args = dict(samples=_samples(n, n_test=1), grid=(2, 3), token_dim=4, mask_size=(8, 6), preview_size=4,
                attributes={"backbone": "b", "layer": 3, "image_size": 8})
    args.update(overrides)
    return cache.create(path, **args)


def _tokens(i: int, p: int = 6, c: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    return rng.normal(size=(p, c)).astype(np.float32), rng.normal(size=c).astype(np.float32)


# -- round trip --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
def test_round_trip(tmp_path, name):
    path = tmp_path / name
    rng = np.random.default_rng(0)
    n, p, c = 5, 6, 4
    patches = rng.normal(size=(n, p, c)).astype(np.float32)
    cls = rng.normal(size=(n, c)).astype(np.float32)
    masks = rng.integers(0, 2, size=(n, 8, 6)).astype(np.uint8) * 255  # any value > 0 is anomalous
    previews = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    with _create(path, n=n, attributes={"backbone": "b", "mean": (0.5, 0.25), "layer": 3}) as store:
        store.write(0, patch_tokens=patches[0], class_token=cls[0], mask=masks[0], preview=previews[0])
        store.write_batch([4, 2, 1, 3], patch_tokens=patches[[4, 2, 1, 3]], class_tokens=cls[[4, 2, 1, 3]],
                          masks=masks[[4, 2, 1, 3]], previews=previews[[4, 2, 1, 3]])

    with cache.open(path) as store:
        assert store.format == ("hdf5" if name.endswith(".h5") else "zarr")
        assert (store.n_images, store.grid, store.n_patches, store.token_dim, store.feature_dim) == (n, (2, 3), 6, 4, 8)
        assert store.mask_size == (8, 6) and store.preview_size == (4, 4) and store.dtype == "float16"
        assert store.complete.all()
        order = [3, 0, 3, 1]  # any order, repeats allowed
        feats = store.read_features(order)
        assert feats.shape == (4, p, 2 * c) and feats.dtype == np.float16
        np.testing.assert_array_equal(feats[:, :, c:], patches[order].astype(np.float16))
        np.testing.assert_array_equal(feats[:, :, :c], np.repeat(cls[order, None].astype(np.float16), p, axis=1))
        assert store.read_features([1], dtype="float32").dtype == np.float32
        np.testing.assert_array_equal(store.read_class_tokens([2]), cls[[2]].astype(np.float16))
        np.testing.assert_array_equal(store.read_patch_tokens([2]), patches[[2]].astype(np.float16))
        np.testing.assert_array_equal(store.read_masks(range(n)), (masks > 0).astype(np.uint8))
        np.testing.assert_array_equal(store.read_previews([0, 4]), previews[[0, 4]])
        assert store.samples == _samples(n, n_test=1)
        assert store.labels.tolist() == [0, 0, 0, 0, 1] and store.labels.dtype == np.int8
        assert store.splits.tolist() == ["train"] * 4 + ["test"]
        assert store.attrs["mean"] == [0.5, 0.25] and store.attrs["backbone"] == "b"
        assert store.attrs["grid"] == [2, 3] and store.attrs["feature_dim"] == 8
        chunks = list(store.iter_features(chunk=2))
        assert [ix.tolist() for ix, _ in chunks] == [[0, 1], [2, 3], [4]]
        np.testing.assert_array_equal(np.concatenate([f for _, f in chunks]), store.read_features(range(n)))
        assert store.indices(split="test").tolist() == [4]


@pytest.mark.parametrize("name", FORMATS)
def test_chunks_of_several_images_written_in_any_order(tmp_path, name):
    """Chunks of 2 images over 5 (the last one padded): writes of single images, of runs across chunks and
    of whole chunks, in any order, keep every other image's rows; zarr itself reads the same arrays."""
    rng = np.random.default_rng(3)
    n = 5
    patches = rng.normal(size=(n, 6, 4)).astype(np.float16)
    cls = rng.normal(size=(n, 4)).astype(np.float16)
    masks = rng.integers(0, 2, size=(n, 8, 6)).astype(np.uint8)
    path = tmp_path / name
    with _create(path, n=n, chunk_images=2) as store:
        assert store.chunk_images == 2 and store.version == 3 and store.chunks([0, 1, 2, 4]).tolist() == [0, 0, 1, 2]
        for batch in ([3], [4], [0, 1, 2]):  # half a chunk, the padded last chunk, a chunk and a half
            store.write_batch(batch, patch_tokens=patches[batch], class_tokens=cls[batch], masks=masks[batch])
        store.write(3, patch_tokens=patches[3], class_token=cls[3], mask=masks[3])  # overwrite one of a pair
    with cache.open(path) as store:
        assert store.complete.all() and store.verify() == []
        np.testing.assert_array_equal(store.read_patch_tokens(range(n)), patches)
        np.testing.assert_array_equal(store.read_masks(range(n)), masks)
    if name.endswith(".zarr"):
        import zarr

        np.testing.assert_array_equal(zarr.open_array(str(path / "patch_tokens"), mode="r")[:], patches)
        np.testing.assert_array_equal(zarr.open_array(str(path / "class_tokens"), mode="r")[:], cls)
        files = sorted(f for f in os.listdir(path / "patch_tokens") if f != "zarr.json")
        assert files == ["c.0.0.0", "c.1.0.0", "c.2.0.0"]  # one file per chunk, the last padded to 2 rows
        assert {(path / "patch_tokens" / f).stat().st_size for f in files} == {2 * 6 * 4 * 2}


def test_chunk_images_is_checked_and_left_out_of_the_fingerprint(tmp_path):
    with pytest.raises(cache.CacheMismatchError, match="chunk_images must be a positive int, got 0"):
        _create(tmp_path / "bad.zarr", chunk_images=0)
    with _create(tmp_path / "a.zarr", chunk_images=1) as a, _create(tmp_path / "b.zarr", chunk_images=3) as b:
        assert (a.chunk_images, b.chunk_images) == (1, 3) and a.fingerprint() == b.fingerprint()
    with _create(tmp_path / "c.zarr", n=2, chunk_images=16) as c:
        assert c.chunk_images == 2  # never more than the images


def test_compressed_rows_written_around_zarr_are_zarr_chunks(tmp_path):
    """Masks (zstd) and previews (plain) are written and read as chunk files of several images without
    zarr's pipeline: zarr itself must read what we write, we must read what zarr writes, and a chunk of
    empty masks leaves no chunk file."""
    import zarr

    rng = np.random.default_rng(1)
    masks = rng.integers(0, 2, size=(4, 8, 6)).astype(np.uint8)
    masks[2:] = 0
    previews = rng.integers(0, 256, size=(4, 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "s.zarr"
    with _create(path, chunk_images=2) as store:
        patches, cls = _tokens(0)
        store.write_batch(range(4), patch_tokens=np.stack([patches] * 4), class_tokens=np.stack([cls] * 4),
                          masks=masks, previews=previews)
    np.testing.assert_array_equal(zarr.open_array(str(path / "masks"), mode="r")[:], masks)
    np.testing.assert_array_equal(zarr.open_array(str(path / "previews"), mode="r")[:], previews)
    assert not (path / "masks/c.1.0.0").exists() and (path / "masks/c.0.0.0").is_file()

    # the other way: rows written by zarr's own pipeline (as earlier funad versions did) read back the same
    other = rng.integers(0, 2, size=(8, 6)).astype(np.uint8)
    zarr.open_array(str(path / "masks"), mode="r+")[1] = other
    with cache.open(path) as store:
        got = np.zeros((1, 8, 6), np.uint8)
        store._b.read_rows("masks", 1, 2, got)
    np.testing.assert_array_equal(got[0], other)


@pytest.mark.parametrize("name", FORMATS)
def test_float32_is_exact_and_float16_overflow_is_refused(tmp_path, name):
    patches, cls = _tokens(0)
    with _create(tmp_path / ("f32_" + name), dtype="float32") as store:
        store.write(0, patch_tokens=patches, class_token=cls)
        np.testing.assert_array_equal(store.read_patch_tokens([0])[0], patches)
    with _create(tmp_path / name) as store:
        with pytest.raises(cache.CacheMismatchError, match="float32"):
            store.write(0, patch_tokens=patches * 1e5, class_token=cls)
        assert store.status[0] == cache.PENDING


def test_tiny_store_fixture_plants_masked_anomalies(tiny_store):
    with cache.open(tiny_store(grid=(2, 2), mask_size=(4, 4))) as store:
        test = store.indices(split="test")
        labels = store.labels[test]
        feats = store.read_features(test, dtype="float32")[:, :, store.token_dim:]
        masks = store.read_masks(test)
        assert labels.tolist() == [0, 1, 0, 1]
        for f, m, lab in zip(feats, masks, labels):
            assert (m.sum() > 0) == bool(lab)
            assert (f.mean(axis=1).max() > 3) == bool(lab)  # the shifted patch stands out


# -- completion flag, skips, crash safety ----------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
def test_data_without_status_reads_as_pending(tmp_path, name):
    """Simulates a crash between writing an image's data and its status."""
    path = tmp_path / name
    patches, cls = _tokens(1)
    with _create(path) as store:
        store.write(0, patch_tokens=patches, class_token=cls)
        store._b.array("patch_tokens")[1:2] = patches[None].astype(np.float16)  # data, but no status
        store._b.flush()
    with cache.open(path) as store:
        assert store.status.tolist()[:2] == [cache.COMPLETE, cache.PENDING]
        assert store.indices().tolist() == [0]
        with pytest.raises(cache.IncompleteCacheError, match=r"image 1 'train/1.png' \(pending\).*funad extract"):
            store.read_features([0, 1])
        with pytest.raises(cache.IncompleteCacheError, match=str(path)):
            store.read_masks([1])
    with cache.open(path, "a") as store:  # resume
        store.write(1, patch_tokens=patches, class_token=cls)
    with cache.open(path) as store:
        assert store.complete[:2].all()


@pytest.mark.parametrize("name", FORMATS)
def test_skipped_and_rewritten_images(tmp_path, name):
    path = tmp_path / name
    patches, cls = _tokens(2)
    with _create(path) as store:
        store.write(0, patch_tokens=patches, class_token=cls)
        store.mark_skipped(1, "cannot decode train/1.png: truncated file")
        store.write(0, patch_tokens=-patches, class_token=cls)  # overwrite a complete image
    with cache.open(path) as store:
        assert store.status.tolist() == [cache.COMPLETE, cache.SKIPPED, cache.PENDING, cache.PENDING]
        assert store.skip_reason(1) == "cannot decode train/1.png: truncated file"
        assert store.skip_reason(0) is None
        np.testing.assert_array_equal(store.read_patch_tokens([0])[0], (-patches).astype(np.float16))
        with pytest.raises(cache.IncompleteCacheError, match="skipped.*truncated file"):
            store.read_features([1])
        summary = store.summary()
        assert summary["skipped"] == [{"index": 1, "path": "train/1.png",
                                       "reason": "cannot decode train/1.png: truncated file"}]
        assert (summary["n_complete"], summary["n_pending"], summary["n_skipped"]) == (1, 2, 1)


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from funad import cache
    store = cache.open(sys.argv[1], "a")
    p, c = store.n_patches, store.token_dim
    for i in range(store.n_images):
        rng = np.random.default_rng(i)
        store.write(i, patch_tokens=rng.normal(size=(p, c)), class_token=rng.normal(size=c),
                    mask=np.full(store.mask_size, i % 2, np.uint8))
        print(i, flush=True)
""")


@pytest.mark.parametrize("name", ["crash.zarr", "crash.h5"])
def test_sigkill_mid_write_leaves_a_consistent_store(tmp_path, name):
    path = tmp_path / name
    n, grid, c = 400, (16, 16), 128
    cache.create(path, samples=_samples(n), grid=grid, token_dim=c, mask_size=(32, 32), preview_size=None).close()
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        written = 0
        while written < 8 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            written = int(line) + 1
        assert written >= 8, "the writer did not get going"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with cache.open(path) as store:  # opens cleanly
        done = store.indices()
        assert done.size >= 8 and done.size < n, "the kill should land mid-run"
        assert done.tolist() == list(range(done.size))  # written in order, so a prefix is complete
        feats = store.read_features(done, dtype="float32")
        for i in done:
            rng = np.random.default_rng(int(i))
            patches, cls = rng.normal(size=(256, c)), rng.normal(size=c)
            np.testing.assert_array_equal(feats[i, :, c:], patches.astype(np.float16).astype(np.float32))
            np.testing.assert_array_equal(feats[i, 0, :c], cls.astype(np.float16).astype(np.float32))
        assert (store.read_masks(done)[:, 0, 0] == done % 2).all()
        with pytest.raises(cache.IncompleteCacheError):
            store.read_features([done.size])
    with cache.open(path, "a") as store:  # resume the rest
        for i in np.flatnonzero(~store.complete)[:3]:
            store.write(int(i), patch_tokens=np.zeros((256, c)), class_token=np.zeros(c))


# -- modes, formats and integrity ---------------------------------------------------------------
def test_open_modes(tmp_path):
    path = tmp_path / "m.zarr"
    with pytest.raises(cache.CacheNotFoundError) as info:
        cache.open(path)
    assert isinstance(info.value, FileNotFoundError) and str(path) in str(info.value)
    with pytest.raises(FileNotFoundError):
        cache.open(path, "a")  # missing, and no creation arguments
    kwargs = dict(samples=_samples(3), grid=2, token_dim=4, mask_size=8, preview_size=None)
    with cache.open(path, "w-", **kwargs) as store:
        assert store.writable and store.grid == (2, 2) and store.preview_size is None
    with pytest.raises(cache.CacheExistsError) as info:
        cache.open(path, "w-", **kwargs)
    assert isinstance(info.value, FileExistsError)
    with pytest.raises(cache.CacheExistsError):
        cache.create(path, **kwargs)
    with cache.open(path, "a") as store:
        store.write(0, patch_tokens=np.ones((4, 4)), class_token=np.ones(4))
    with cache.open(path, "r") as store:
        assert store.complete.tolist() == [True, False, False]
        with pytest.raises(cache.CacheError, match="read-only"):
            store.write(1, patch_tokens=np.ones((4, 4)), class_token=np.ones(4))
    with cache.open(path, "w", **kwargs) as store:  # replaced: nothing complete
        assert not store.complete.any()
    with cache.open(tmp_path / "new.h5", "a", **kwargs) as store:  # "a" creates when given the arguments
        assert store.format == "hdf5"
    with pytest.raises(ValueError, match="mode"):
        cache.open(path, "x")
    with pytest.raises(ValueError, match="samples"):
        cache.open(tmp_path / "other.zarr", "w")


def test_overwrite_refuses_to_delete_other_things(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "keep.png").write_bytes(b"x")
    with pytest.raises(cache.CacheExistsError, match="not a funad feature cache"):
        cache.create(folder, samples=_samples(2), grid=2, token_dim=2, mask_size=4, preview_size=None, overwrite=True)
    assert (folder / "keep.png").exists()
    assert not list(tmp_path.glob(".photos.partial-*"))


def test_format_choice(tmp_path):
    for name, fmt, expected in [("a.zarr", None, "zarr"), ("b.h5", None, "hdf5"), ("c.hdf5", None, "hdf5"),
                                ("d.feats", "hdf5", "hdf5"), ("e", None, "zarr")]:
        _create(tmp_path / name, format=fmt).close()
        with cache.open(tmp_path / name) as store:
            assert store.format == expected
    with pytest.raises(cache.CacheMismatchError, match="is a hdf5 store"):
        cache.open(tmp_path / "b.h5", format="zarr")


@pytest.mark.parametrize("name", FORMATS)
def test_open_detects_inconsistent_metadata(tmp_path, name):
    path = tmp_path / name
    _create(path).close()
    with cache.open(path, "a") as store:
        store._b.set_attrs({"n_patches": 7})
    with pytest.raises(cache.CorruptCacheError, match=rf"{path}.*n_patches=7.*grid=\[2, 3\]"):
        cache.open(path)


def test_open_detects_wrong_array_shape(tmp_path):
    path = tmp_path / "s.zarr"
    _create(path).close()
    backend = _zarr.Backend(path, writable=True)
    backend._root.create_array("class_tokens", shape=(4, 5), dtype="float16", chunks=(1, 5), overwrite=True)
    with pytest.raises(cache.CorruptCacheError, match=r"class_tokens has shape \(4, 5\), metadata says \(4, 4\)"):
        cache.open(path)


def test_open_rejects_non_stores(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(cache.CorruptCacheError, match="not HDF5"):
        cache.open(junk)
    (tmp_path / "dir.zarr").mkdir()
    with pytest.raises(cache.CorruptCacheError, match="without zarr.json"):
        cache.open(tmp_path / "dir.zarr")


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(cache.CacheMismatchError, match="appears twice"):
        cache.create(tmp_path / "a.zarr", samples=_samples(2) * 2, grid=2, token_dim=2, mask_size=4, preview_size=None)
    bad = [{"path": "x", "split": "val", "label": 0, "defect_type": "good"}]
    with pytest.raises(cache.CacheMismatchError, match="split 'val'"):
        cache.create(tmp_path / "a.zarr", samples=bad, grid=2, token_dim=2, mask_size=4, preview_size=None)
    with pytest.raises(cache.CacheMismatchError, match="grid"):
        _create(tmp_path / "b.zarr", attributes={"grid": [28, 28]})
    with _create(tmp_path / "c.zarr") as store:
        with pytest.raises(cache.CacheMismatchError, match=r"image 0 has shape \(6, 5\).*expects \(6, 4\)"):
            store.write(0, patch_tokens=np.zeros((6, 5)), class_token=np.zeros(4))
        with pytest.raises(cache.CacheMismatchError, match="out of range"):
            store.read_features([9])


# -- compatibility, fingerprint, summary ---------------------------------------------------------
def test_check_compatible_and_fingerprint(tmp_path):
    attrs = {"backbone": "vit", "layer": 7, "image_size": 392, "mean": (0.1, 0.2), "dataset_root": "/a"}
    with _create(tmp_path / "a.zarr", attributes=attrs) as a:
        assert a.check_compatible({"backbone": "vit", "layer": 7, "mean": [0.1, 0.2]}) == []
        assert a.check_compatible({"layer": 11, "weights": "w.pth"}) == [("layer", 7, 11), ("weights", None, "w.pth")]
        fp = a.fingerprint()
    with _create(tmp_path / "b.h5", attributes={**attrs, "dataset_root": "/elsewhere"}) as b:
        assert b.fingerprint() == fp  # format, location and creation time do not define the features
    with _create(tmp_path / "c.zarr", attributes={**attrs, "layer": 8}) as c:
        assert c.fingerprint() != fp
    with _create(tmp_path / "d.zarr", attributes=attrs, samples=_samples(4, n_test=2)) as d:
        assert d.fingerprint() != fp
    with cache.open(tmp_path / "a.zarr") as a:
        assert a.fingerprint() == fp


def test_summary_counts(tiny_store):
    with cache.open(tiny_store(complete=False)) as store:
        s = store.summary()
    assert (s["n_images"], s["n_complete"], s["n_pending"]) == (10, 9, 1)
    assert s["completeness"] == pytest.approx(0.9)
    assert [(r["split"], r["label"], r["defect_type"], r["images"], r["complete"]) for r in s["counts"]] == [
        ("train", 0, "good", 6, 6), ("test", 0, "good", 2, 2), ("test", 1, "defect", 2, 1)]
    assert s["size_on_disk_bytes"] > 0 and s["attrs"]["backbone"] == "synthetic"
    json.dumps(s)  # serialisable


# -- funad cache info -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
def test_cache_info_cli(tiny_store, name):
    from funad.cli.cache_cmd import cache as cache_group

    path = tiny_store(name, complete=False)
    runner = CliRunner()
    res = runner.invoke(cache_group, ["info", str(path)])
    assert res.exit_code == 0, res.output
    for text in ("complete: 9 (90.0%)", "pending: 1", "defect", "backbone", "synthetic", "1 images are pending"):
        assert text in res.output
    res = runner.invoke(cache_group, ["info", str(path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    with cache.open(path) as store:
        assert data == json.loads(json.dumps(store.summary()))


def test_cache_info_cli_errors_cleanly(tmp_path):
    from funad.cli.main import cli

    res = CliRunner().invoke(cli, ["cache", "info", str(tmp_path / "missing.zarr")])
    assert res.exit_code == 1
    assert "no feature cache here" in res.output and "Traceback" not in res.output


# -- checksums: damage cannot go unnoticed --------------------------------------------------------
def test_row_checksums_see_every_kind_of_damage():
    from funad.cache.integrity import BLOCK_BYTES

    rows = np.random.default_rng(0).normal(size=(3, BLOCK_BYTES // 2 + 99)).astype(np.float16)  # a block + a tail
    ref = cache.row_checksums(rows)
    assert ref.dtype == np.uint64 and len(set(ref.tolist())) == 3
    flipped = rows.copy()
    flipped.reshape(3, -1).view(np.uint8)[1, BLOCK_BYTES + 150] ^= 1  # one bit in the tail
    zeroed = rows.copy()
    zeroed[2] = 0
    assert (cache.row_checksums(flipped) != ref).tolist() == [False, True, False]
    assert (cache.row_checksums(zeroed) != ref).tolist() == [False, False, True]
    blocks = np.random.default_rng(1).integers(0, 256, size=(1, 2 * BLOCK_BYTES), dtype=np.uint8)
    reordered = np.concatenate([blocks[:, BLOCK_BYTES:], blocks[:, :BLOCK_BYTES]], axis=1)  # blocks swapped
    assert cache.row_checksums(blocks)[0] != cache.row_checksums(reordered)[0]
    np.testing.assert_array_equal(cache.row_checksums(rows[1:2]), ref[1:2])  # a row's checksum is its own
    small = np.arange(12, dtype=np.uint8).reshape(2, 6)  # rows shorter than a word
    changed = small.copy()
    changed[0, 5] = 99
    assert (cache.row_checksums(changed) != cache.row_checksums(small)).tolist() == [True, False]


def _checksum_in_child(queue) -> None:
    queue.put(cache.row_checksums(np.arange(4 * 70_000, dtype=np.uint64).reshape(4, -1)).tolist())


def test_checksums_agree_between_torch_numpy_and_a_forked_child():
    """Block sums are torch's where it is safe (a writable array, this process) and numpy's elsewhere: the
    same bits, and a child forked after torch's threads ran still finishes (it uses numpy)."""
    import multiprocessing

    from funad.cache.integrity import _WORDS, _block_sums

    words = np.random.default_rng(5).integers(0, 2**64, size=(3, 4, _WORDS), dtype=np.uint64)  # sums wrap
    frozen = words.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(_block_sums(words), _block_sums(frozen))
    rows = np.arange(4 * 70_000, dtype=np.uint64).reshape(4, -1)
    here = cache.row_checksums(rows).tolist()  # torch's pool has run in this process
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_checksum_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("a forked child hung computing checksums")
    assert queue.get(timeout=5) == here


@pytest.mark.parametrize("name", FORMATS)
def test_a_damaged_chunk_is_reported_with_its_image_and_file(tiny_store, name):
    path = tiny_store(name)  # chunks of 4 images
    with cache.open(path) as store:
        original = store.read_features(np.arange(store.n_images))
        p = store.n_patches * store.token_dim
    if name.endswith(".zarr"):
        (path / "patch_tokens/c.0.0.0").unlink()  # images 0-3; zarr would read the fill value, zeros
        chunk = path / "class_tokens/c.1.0"  # images 4-7
        raw = bytearray(chunk.read_bytes())
        raw[3] ^= 0x40  # a byte of image 4's row
        chunk.write_bytes(bytes(raw))
        where_2, where_4 = "patch_tokens/c.0.0.0 is missing", "class_tokens/c.1.0 does not match its checksum"
        bad, good = [0, 1, 2, 3, 4], [5, 6, 8]
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            f["patch_tokens"][2, 0, 0] = 7.0  # a silent change of one value
            f["class_tokens"][4, 1] = -3.0
        where_2 = "row 2 of dataset 'patch_tokens' in .*does not match its checksum"
        where_4 = "row 4 of dataset 'class_tokens'.*does not match"
        bad, good = [2, 4], [0, 1, 3]
    with cache.open(path) as store:
        np.testing.assert_array_equal(store.read_features(good), original[good])
        with pytest.raises(cache.CorruptCacheError, match=rf"image 2 'train/good/002.png' is damaged: .*{where_2}"):
            store.read_features([2, 5])
        with pytest.raises(cache.CorruptCacheError, match="cache verify"):
            store.read_class_tokens([4])
        damaged = store.verify(chunk=3)
    assert [d["index"] for d in damaged] == bad and p > 0
    assert re.search(where_2, damaged[bad.index(2)]["problems"][0])
    assert re.search(where_4, damaged[bad.index(4)]["problems"][-1])


def test_an_undecodable_compressed_chunk_is_reported(tiny_store):
    path = tiny_store("t.zarr")
    chunk = path / "masks/c.2.0.0"  # zstd-compressed masks of images 8 and 9 (9 has a defect)
    chunk.write_bytes(chunk.read_bytes()[:-6])
    with cache.open(path) as store:
        with pytest.raises(cache.CorruptCacheError, match=r"image 8 .*masks/c\.2\.0\.0 cannot be read"):
            store.read_masks([7, 8])
        assert [d["index"] for d in store.verify()] == [8, 9]
        store.read_features([8])  # the features of that image are fine


def test_cache_verify_cli_lists_damaged_images(tiny_store):
    path = tiny_store("t.zarr")
    ok = CliRunner().invoke(cache_cli, ["verify", str(path)])
    assert ok.exit_code == 0 and "all 10 complete images match their checksums" in ok.output
    (path / "patch_tokens/c.2.0.0").unlink()  # the last chunk: images 8 and 9
    res = CliRunner().invoke(cache_cli, ["verify", str(path)])
    assert res.exit_code == 1 and "2 of 10 complete images are damaged" in res.output, res.output
    assert "8  test/good/002.png" in res.output and "9  test/defect/003.png" in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(cache_cli, ["verify", "--json", str(path)])
    assert [d["index"] for d in json.loads(res.output)["damaged"]] == [8, 9]
    res = CliRunner().invoke(cache_cli, ["info", str(path)])
    assert res.exit_code == 0  # info reads no features


# -- records: one chunk per chunk of images, a snapshot for fast opening ------------------------------------
def test_records_snapshot_is_refreshed_by_the_lock_holder(tmp_path):
    path = tmp_path / "s.zarr"
    patches, cls = _tokens(0)
    with _create(path, chunk_images=2) as writer:
        assert int(writer._b.array("records_snapshot_valid")[0]) == 1  # all pending, as created
        writer.write(1, patch_tokens=patches, class_token=cls)
        assert int(writer._b.array("records_snapshot_valid")[0]) == 0  # stale while writing
        with cache.open(path) as reader:  # reads the per-image records meanwhile
            assert reader.status.tolist() == [0, 1, 0, 0]
        helper = cache.open(path, "a", lock=False)  # a rank of the same run
        helper.write(3, patch_tokens=patches, class_token=cls)
        helper.close()
    with cache.open(path) as store:
        assert int(store._b.array("records_snapshot_valid")[0]) == 1
        np.testing.assert_array_equal(store._b.array("records_snapshot")[:], store._b.array("records")[:])
        assert store.status.tolist() == [0, 1, 0, 1]
    assert sorted(f for f in os.listdir(path / "records") if f != "zarr.json") == ["c.0.0", "c.1.0"]  # per chunk


# -- the writer lock ---------------------------------------------------------------------------
_HOLDER = textwrap.dedent("""
    import sys, time
    from funad import cache
    store = cache.open(sys.argv[1], "a")
    print("holding", flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("name", FORMATS)
def test_a_second_writer_is_refused_with_the_holders_pid_and_host(tmp_path, name):
    import socket

    path = tmp_path / name
    _create(path).close()
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(cache.CacheLockedError) as info:
            cache.open(path, "a")
        msg = str(info.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and str(path) in msg
        with pytest.raises(cache.CacheLockedError):
            _create(path, overwrite=True)  # nor may it be replaced under the running writer
        with cache.open(path) as reader:  # readers are never refused
            assert reader.n_images == 4
    finally:
        proc.kill()
        proc.wait()
    with cache.open(path, "a") as store:  # the kernel dropped the dead holder's lock: taken over
        assert store.holds_lock
    assert not cache.lock_path(path).exists()  # released on close


def test_two_writers_in_one_process_are_refused_too(tmp_path):
    path = tmp_path / "one.zarr"
    with _create(path):
        with pytest.raises(cache.CacheLockedError, match=rf"pid {os.getpid()}"):
            cache.open(path, "a")
    cache.open(path, "a").close()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog, monkeypatch):
    import errno
    import socket

    from funad.cache import lock as lock_module

    path = tmp_path / "stale.zarr"
    _create(path).close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "2020-01-01T00:00:00+00:00"})
    cache.lock_path(path).write_text(record)
    with caplog.at_level("WARNING", logger="funad.cache.lock"):
        cache.open(path, "a").close()
    assert f"taking over the writer lock of pid {dead.pid}" in caplog.text

    # a filesystem without flock: the recorded pid decides
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    cache.lock_path(path).write_text(record)
    cache.open(path, "a").close()  # dead holder on this host: taken over
    alive = json.dumps({"pid": os.getppid(), "host": socket.gethostname()})
    cache.lock_path(path).write_text(alive)
    with pytest.raises(cache.CacheLockedError, match=rf"pid {os.getppid()} on host"):
        cache.open(path, "a")
    cache.lock_path(path).write_text(json.dumps({"pid": 1, "host": "another-node"}))
    with pytest.raises(cache.CacheLockedError, match="another-node.*if it is gone, delete the lock file"):
        cache.open(path, "a")


def test_a_format_1_store_is_read_without_checksums_and_not_written(tmp_path):
    """Stores from before per-image records (one status array, cache_version 1) stay readable."""
    import shutil

    path = tmp_path / "v1.zarr"
    patches, cls = _tokens(0)
    with _create(path) as store:
        store.write(0, patch_tokens=patches, class_token=cls)
    backend = _zarr.ZarrBackend(path, writable=True)  # rewrite it into the format-1 layout
    backend.create_array("status", (4,), "int8", (4,), "none")
    backend.array("status")[:] = np.array([1, 0, 0, 0], np.int8)
    backend.set_attrs({"cache_version": 1})
    for name in ("records", "records_snapshot", "records_snapshot_valid"):
        shutil.rmtree(path / name)
    with cache.open(path) as store:
        assert store.status.tolist() == [1, 0, 0, 0]
        np.testing.assert_array_equal(store.read_patch_tokens([0])[0], patches.astype(np.float16))
        with pytest.raises(cache.CacheError, match="cache format 1.*without checksums"):
            store.verify()
    with pytest.raises(cache.CorruptCacheError, match=r"older funad \(cache format 1\).*--overwrite"):
        cache.open(path, "a")
    assert not cache.lock_path(path).exists()


def test_create_in_a_folder_that_does_not_exist_yet(tiny_store):
    """`make demo` writes demo_out/bottle.zarr into a fresh checkout: the lock file needs the folder first."""
    for name in ("new/deeper/feats.zarr", "new2/feats.h5"):
        path = tiny_store(name)
        with cache.open(path) as store:
            assert store.complete.all()
