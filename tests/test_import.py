"""``funad import``: the authors' published feature files -> a feature store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from funad import cache
from funad.cli.import_cmd import import_features as import_cmd
from funad.pipelines.errors import DatasetError
from funad.pipelines.importer import import_features


def _features(rng, n: int, p: int, c: int) -> np.ndarray:
    """``(n, p, 2c) float32`` rows ``[class token repeated ; patch token]``, as the authors store them."""
    cls = rng.normal(size=(n, 1, c)).astype(np.float32)
    patches = rng.normal(size=(n, p, c)).astype(np.float32)
    return np.concatenate([np.repeat(cls, p, axis=1), patches], axis=2)


def write_feature_dir(folder: Path, cat: str = "bottle", *, n_train: int = 5, n_test: int = 4, p: int = 9,
                      c: int = 4, side: int = 12, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        f"{cat}.npy": _features(rng, n_train, p, c),
        f"{cat}_test.npy": _features(rng, n_test, p, c),
        f"{cat}_gt.npy": np.array([i % 2 for i in range(n_test)], dtype=np.int64),
        f"{cat}_mask.npy": np.zeros((n_test, side, side), dtype=np.float32),
    }
    for i in range(1, n_test, 2):
        arrays[f"{cat}_mask.npy"][i, i : i + 3, 2:5] = 1
    for name, arr in arrays.items():
        np.save(folder / name, arr)
    return arrays


@pytest.mark.parametrize("name", ["out.zarr", "out.h5"])
def test_import_round_trip(tmp_path, name):
    arrays = write_feature_dir(tmp_path / "feats")
    result = import_features(tmp_path / "feats", "bottle", tmp_path / name, chunk=2)  # chunks split both sets
    assert (result.n_train, result.n_test, result.grid, result.token_dim) == (5, 4, (3, 3), 4)
    with cache.open(tmp_path / name) as store:
        assert store.complete.all()
        assert (store.grid, store.n_patches, store.feature_dim, store.mask_size) == ((3, 3), 9, 8, (12, 12))
        assert store.preview_size is None
        assert [s["path"] for s in store.samples] == [f"train/{i:03d}" for i in range(5)] + \
            [f"test/{i:03d}" for i in range(4)]
        assert store.labels.tolist() == [0] * 5 + [0, 1, 0, 1]
        assert store.defect_types.tolist() == ["good"] * 5 + ["good", "defect", "good", "defect"]
        assert store.splits.tolist() == ["train"] * 5 + ["test"] * 4
        feats = store.read_features(range(9), dtype="float32")
        expected = np.concatenate([arrays["bottle.npy"], arrays["bottle_test.npy"]]).astype(np.float16)
        np.testing.assert_array_equal(feats, expected.astype(np.float32))
        np.testing.assert_array_equal(store.read_masks(np.arange(5, 9)), arrays["bottle_mask.npy"].astype(np.uint8))
        assert not store.read_masks(range(5)).any()
        attrs = store.attrs
        assert attrs["source"] == "import" and attrs["backbone"] == "vit_base_patch8_224.dino"
        assert (attrs["image_size"], attrs["resize"], attrs["crop"]) == (12, 14, 12)
        assert attrs["dataset_kind"] == "import" and attrs["category"] == "bottle"
        with pytest.raises(cache.CacheError, match="no previews"):
            store.read_previews([0])


def test_import_refuses_features_without_a_repeated_class_token(tmp_path):
    arrays = write_feature_dir(tmp_path / "feats")
    bad = arrays["bottle_test.npy"].copy()
    bad[2, 5, 1] += 0.5  # image 2, patch 5: its "class token" differs
    np.save(tmp_path / "feats" / "bottle_test.npy", bad)
    with pytest.raises(DatasetError, match=r"bottle_test.npy: image 2, patch 5, column 1.*not the same class token"):
        import_features(tmp_path / "feats", "bottle", tmp_path / "out.zarr", chunk=2)


def test_import_checks_shapes_and_files(tmp_path):
    write_feature_dir(tmp_path / "odd", p=10)
    with pytest.raises(DatasetError, match="10 patches per image is not a square grid"):
        import_features(tmp_path / "odd", "bottle", tmp_path / "a.zarr")
    write_feature_dir(tmp_path / "gt")
    np.save(tmp_path / "gt" / "bottle_gt.npy", np.zeros(3))
    with pytest.raises(DatasetError, match=r"bottle_gt.npy: expected \(4,\) labels"):
        import_features(tmp_path / "gt", "bottle", tmp_path / "b.zarr")
    with pytest.raises(DatasetError, match=r"screw.npy is missing.*--category"):
        import_features(tmp_path / "gt", "screw", tmp_path / "c.zarr")
    write_feature_dir(tmp_path / "rect", p=16, c=3, side=8)  # D = 6 and a 4x4 grid: nothing is hard-coded
    result = import_features(tmp_path / "rect", "bottle", tmp_path / "d.zarr")
    assert result.grid == (4, 4) and result.token_dim == 3


def test_import_cli(tmp_path):
    write_feature_dir(tmp_path / "feats")
    out = tmp_path / "out.h5"
    runner = CliRunner()
    args = [str(tmp_path / "feats"), "--category", "bottle", "-o", str(out), "--dtype", "float32"]
    res = runner.invoke(import_cmd, args)
    assert res.exit_code == 0, res.output
    with cache.open(out) as store:
        assert store.format == "hdf5" and store.dtype == "float32" and store.complete.all()
    res = runner.invoke(import_cmd, args)  # exists: clean refusal
    assert res.exit_code == 1 and "already exists" in res.output and "Traceback" not in res.output
    res = runner.invoke(import_cmd, args + ["--overwrite", "--format", "zarr"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(import_cmd, [str(tmp_path / "feats"), "--category", "nope", "-o", str(tmp_path / "x.zarr")])
    assert res.exit_code == 1 and "nope.npy is missing" in res.output
