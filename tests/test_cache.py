"""The feature store: round trips in both formats, completion flags, crash safety, modes, integrity."""

from __future__ import annotations

import json
import os
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
