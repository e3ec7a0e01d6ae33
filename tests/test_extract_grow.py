"""``funad extract`` on a folder that changed: new images appended, removed and renamed files reported."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import backbone_killed_on_call
from funad import cache
from funad.cli.extract_cmd import extract as extract_cli
from funad.pipelines.backbone import Backbone, BackboneSpec, load_backbone
from funad.pipelines.datasets import read_dataset as real_read
from funad.pipelines.extract import extract

from test_extract import SIZE, TINY, make_mvtec, write_png


@pytest.fixture(scope="module")
def bb() -> Backbone:
    return load_backbone(BackboneSpec(TINY, image_size=SIZE, pretrained=False), "cpu", precision="fp32")


def _run(data, out, bb, **kw):
    # batches of 1: values never depend on what else is in the batch; the paper geometry: one backbone input
    # per image, which the tests count
    return extract(data, out, backbone=bb, batch_size=1, num_workers=0, **{"geometry": "paper", **kw})


def _by_path(path) -> dict:
    with cache.open(path) as store:
        feats = store.read_features(store.indices())
        return {p: f for p, f in zip(store.paths[store.indices()].tolist(), feats)}


@pytest.mark.parametrize("name", ["f.zarr", "f.h5"])
def test_new_images_are_appended_and_only_they_are_extracted(tmp_path, bb, name, monkeypatch):
    data = make_mvtec(tmp_path / "data", n_train=3)
    out = tmp_path / name
    _run(data, out, bb)
    with cache.open(out) as store:
        old_paths, old_feats = store.paths.tolist(), store.read_features(np.arange(store.n_images))
    write_png(data / "train/good/100.png", seed=7)
    write_png(data / "test/good/050.png", seed=8)

    seen = []
    original = Backbone.__call__
    monkeypatch.setattr(Backbone, "__call__", lambda self, x: seen.append(len(x)) or original(self, x))
    result = _run(data, out, bb)
    assert (result.written, result.already, result.n_images) == (2, 6, 8) and sum(seen) == 2
    assert result.table.added == ["train/good/100.png", "test/good/050.png"] and not result.table.missing
    with cache.open(out) as store:
        assert store.paths.tolist() == old_paths + ["train/good/100.png", "test/good/050.png"]
        assert store.complete.all() and store.verify() == []
        np.testing.assert_array_equal(store.read_features(np.arange(6)), old_feats)  # ids of old images unchanged
        assert store.source_digests([6])[0] is not None
    _run(data, tmp_path / ("fresh" + out.suffix), bb)
    fresh, grown = _by_path(tmp_path / ("fresh" + out.suffix)), _by_path(out)
    assert fresh.keys() == grown.keys()
    for p in fresh:  # the grown store holds what a fresh extraction of the folder holds
        np.testing.assert_array_equal(grown[p], fresh[p], err_msg=p)
    again = _run(data, out, bb)
    assert (again.written, again.already) == (0, 8) and not again.table.changed


def test_an_interrupted_append_resumes(tmp_path, bb, monkeypatch):
    data = make_mvtec(tmp_path / "data", n_train=2)
    out = tmp_path / "f.zarr"
    _run(data, out, bb)
    for i in range(3):
        write_png(data / f"train/good/1{i}.png", seed=40 + i)
    with backbone_killed_on_call(2), pytest.raises(KeyboardInterrupt):
        _run(data, out, bb)
    with cache.open(out) as store:
        assert store.n_images == 8 and store.status.tolist() == [1] * 5 + [1, 0, 0]
        with pytest.raises(cache.IncompleteCacheError, match="train/good/11.png"):
            store.read_features([6])  # an unfinished appended image is never read as complete
    result = _run(data, out, bb)
    assert (result.written, result.already) == (2, 6) and not result.table.added  # the table grew already
    with cache.open(out) as store:
        assert store.complete.all() and store.verify() == []


def test_removed_and_renamed_files_are_reported_and_kept_until_pruned(tmp_path, bb):
    data = make_mvtec(tmp_path / "data", n_train=4)
    out = tmp_path / "f.zarr"
    _run(data, out, bb)
    with cache.open(out) as store:
        feats_2 = store.read_features([2])
    (data / "train/good/001.png").unlink()
    shutil.move(data / "train/good/002.png", data / "train/good/two.png")
    result = _run(data, out, bb)
    t = result.table
    assert t.missing == ["train/good/001.png", "train/good/002.png"]
    assert t.renamed == [("train/good/002.png", "train/good/two.png")] and t.added == ["train/good/two.png"]
    assert result.written == 1
    with cache.open(out) as store:
        assert store.missing_from_source.tolist() == [1, 2] and store.n_images == 8
        np.testing.assert_array_equal(store.read_features([2]), feats_2)  # kept, readable
        np.testing.assert_array_equal(store.read_features([7]), feats_2)  # same content, same features
        assert store.summary()["missing_from_source"] == ["train/good/001.png", "train/good/002.png"]

    pruned = _run(data, out, bb, prune_missing=True)
    assert pruned.table.pruned == ["train/good/001.png", "train/good/002.png"] and pruned.written == 0
    with cache.open(out) as store:
        assert store.n_images == 6 and "train/good/001.png" not in store.paths.tolist()
        assert store.missing_from_source.size == 0 and store.verify() == []


def test_a_pending_image_whose_file_is_gone_is_skipped_with_a_reason(tmp_path, bb, monkeypatch):
    data = make_mvtec(tmp_path / "data", n_train=3)
    out = tmp_path / "f.zarr"
    with backbone_killed_on_call(3), pytest.raises(KeyboardInterrupt):
        _run(data, out, bb)
    (data / "test/good/000.png").unlink()  # image 5 (after train/good and test/crack), never extracted
    result = _run(data, out, bb)
    assert result.table.missing == ["test/good/000.png"] and result.written == 3
    with cache.open(out) as store:
        assert store.status.tolist() == [1, 1, 1, 1, 1, 2] and "no longer in the dataset folder" in store.skip_reason(5)
        assert store.indices().tolist() == [0, 1, 2, 3, 4]  # what fit uses; nothing is left pending


def test_a_changed_split_is_refused_before_the_backbone_loads(tmp_path, bb, monkeypatch):
    from funad.pipelines import extract as extract_module
    from funad.pipelines.extract_table import compare

    data = make_mvtec(tmp_path / "data", n_train=2)
    out = tmp_path / "f.zarr"
    _run(data, out, bb)
    with cache.open(out) as store:
        records = store.samples
        records[0] = {**records[0], "split": "test"}
        changed = r"train/good/000.png \(split 'train' -> 'test'\).*new output"
        with pytest.raises(cache.CacheMismatchError, match=changed):
            compare(store, records)

    class Loaded(Exception):
        pass

    def no_loading(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(extract_module, "load_backbone", no_loading)
    monkeypatch.setattr(extract_module, "read_dataset", lambda root, kind: [
        *real_read(root, kind)[1:], type(real_read(root, kind)[0])("train/good/000.png", "test", 0, "good", None)])
    spec = BackboneSpec(TINY, image_size=SIZE, pretrained=False)
    with pytest.raises(cache.CacheMismatchError, match=r"train/good/000.png \(split 'train' -> 'test'\)"):
        extract(data, out, backbone=spec, precision="fp32", num_workers=0)
    monkeypatch.setattr(extract_module, "read_dataset", real_read)
    write_png(data / "train/good/100.png", seed=7)
    with pytest.raises(Loaded):  # a new file passes the check; only then does the backbone load
        extract(data, out, backbone=spec, precision="fp32", num_workers=0)


def test_cli_lists_new_and_missing_files(tmp_path, bb):
    from safetensors.torch import save_file

    data = make_mvtec(tmp_path / "data", n_train=1)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
    out = tmp_path / "f.zarr"
    args = [str(data), "-o", str(out), "--backbone", TINY, "--weights", str(weights), "--image-size", str(SIZE),
            "--device", "cpu", "--precision", "fp32", "--num-workers", "0"]
    assert CliRunner().invoke(extract_cli, args).exit_code == 0
    (data / "test/good/000.png").unlink()
    write_png(data / "train/good/007.png", seed=70)
    res = CliRunner().invoke(extract_cli, args)
    assert res.exit_code == 0, res.output
    assert "1 new images appended: train/good/007.png" in res.output
    assert ("1 images are no longer in the dataset folder; kept in the store, marked missing (pass --prune-missing "
            "to drop them): test/good/000.png") in res.output
    assert "1 images written, 0 skipped, 4 already complete (5 in all)" in res.output
    from funad.cli.cache_cmd import cache as cache_cli

    info = CliRunner().invoke(cache_cli, ["info", str(out)])
    assert info.exit_code == 0 and "1 images are no longer in the dataset folder" in info.output
    assert "test/good/000.png" in info.output


def test_a_format_1_store_is_refused_before_the_backbone_loads(tmp_path, bb, monkeypatch):
    """Stores written before per-image records open read-only; extract says what to do instead of growing them."""
    from funad.cache import _zarr
    from funad.pipelines import extract as extract_module

    data = make_mvtec(tmp_path / "data", n_train=1)
    out = tmp_path / "old.zarr"
    _run(data, out, bb)
    backend = _zarr.ZarrBackend(out, writable=True)  # rewrite it into the format-1 layout (test_cache.py)
    n = len(backend.read_blob("sample_table"))
    backend.create_array("status", (n,), "int8", (n,), "none")
    backend.array("status")[:] = np.ones(n, np.int8)
    backend.set_attrs({"cache_version": 1})
    for name in ("records", "records_snapshot", "records_snapshot_valid"):
        shutil.rmtree(out / name)
    write_png(data / "train/good/100.png", seed=7)
    monkeypatch.setattr(extract_module, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded"))
    spec = BackboneSpec(TINY, image_size=SIZE, pretrained=False)
    with pytest.raises(cache.CacheMismatchError, match=r"older funad \(cache format 1\).*new output.*--overwrite"):
        extract(data, out, backbone=spec, precision="fp32", num_workers=0)
    with cache.open(out) as store:  # still readable, untouched
        assert store.n_images == n and store.complete.all()
    assert not cache.lock_path(out).exists()


@pytest.mark.slow
def test_torchrun_grows_the_store_like_one_process(tmp_path, bb):
    """gloo on the CPU: rank 0 appends the new files, both ranks extract them; every image then has the
    features a single-process extraction of the final folder gives (batches of 1, one thread)."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    data = make_mvtec(tmp_path / "data", n_train=2)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
    spec = BackboneSpec(TINY, weights=str(weights), image_size=SIZE)
    opts = dict(backbone=spec, device="cpu", precision="fp32", batch_size=1, num_workers=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets for its processes: the thread count changes float sums
    try:
        extract(data, tmp_path / "two.zarr", **opts)
        for i in range(3):
            write_png(data / f"train/good/1{i}.png", seed=50 + i)
        (data / "train/good/000.png").unlink()
        extract(data, tmp_path / "one.zarr", **opts)
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "funad",
           "extract", str(data), "-o", str(tmp_path / "two.zarr"), "--backbone", TINY, "--weights", str(weights),
           "--image-size", str(SIZE), "--device", "cpu", "--precision", "fp32", "--batch-size", "1",
           "--num-workers", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "3 new images appended" in res.stdout and "1 images are no longer in the dataset folder" in res.stdout
    assert "3 images written, 0 skipped, 5 already complete (8 in all)" in res.stdout
    one, two = _by_path(tmp_path / "one.zarr"), _by_path(tmp_path / "two.zarr")
    assert set(two) == set(one) | {"train/good/000.png"}
    for p in one:
        np.testing.assert_array_equal(two[p], one[p], err_msg=p)
    with cache.open(tmp_path / "two.zarr") as store:
        assert store.verify() == [] and store.paths[store.missing_from_source].tolist() == ["train/good/000.png"]
    assert not cache.lock_path(tmp_path / "two.zarr").exists()


def test_a_store_with_synthetic_images_does_not_grow(tmp_path, bb):
    data = make_mvtec(tmp_path / "data", n_train=2)
    out = tmp_path / "f.zarr"
    extract(data, out, backbone=bb, synthetic=0.5, seed=3, num_workers=0)
    write_png(data / "test/good/050.png", seed=8)
    with pytest.raises(cache.CacheMismatchError, match=r"synthetic anomalies .*1 new, 0 removed.*cannot grow"):
        extract(data, out, backbone=bb, synthetic=0.5, seed=3, num_workers=0)
    with cache.open(out) as store:
        assert "test/good/050.png" not in store.paths.tolist()
