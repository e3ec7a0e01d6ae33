"""``funad extract`` with a tiny random ViT: store contents, resume, refusals, bad images, the CLI."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import funad
from conftest import backbone_killed_on_call
from funad import cache
from funad.cli.cache_cmd import cache as cache_cli
from funad.cli.extract_cmd import extract as extract_cli
from funad.pipelines.backbone import Backbone, BackboneSpec, MaskTransform, image_transform, load_backbone
from funad.pipelines.errors import DatasetError
from funad.pipelines.extract import extract

TINY = "vit_tiny_patch16_224"
SIZE = 32  # grid 2x2, C = 192


@pytest.fixture(scope="module")
def bb() -> Backbone:
    return load_backbone(BackboneSpec(TINY, image_size=SIZE, pretrained=False), "cpu", precision="fp32")


def write_png(path: Path, seed: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_mvtec(root: Path, n_train: int = 5) -> Path:
    """MVTec-like: n_train train/good, 1 test/good, 2 test/crack with a mask covering the right half."""
    for i in range(n_train):
        write_png(root / "train/good" / f"{i:03d}.png", seed=i)
    write_png(root / "test/good/000.png", seed=100)
    for i in range(2):
        write_png(root / "test/crack" / f"{i:03d}.png", seed=200 + i)
        m = np.zeros((30, 40), np.uint8)
        m[:, 20:] = 255
        (root / "ground_truth/crack").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(root / "ground_truth/crack" / f"{i:03d}_mask.png")
    return root


class Recorder:
    """A Progress that records what it is told."""

    def __init__(self) -> None:
        self.advanced = 0.0
        self.total = None

    def task(self, description, total=None, unit="it"):
        self.total = total
        return self

    def advance(self, n=1):
        self.advanced += n

    def update(self, *, description=None, total=None, **fields):
        pass


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_extract_fills_the_store(tmp_path, bb, fmt):
    data = make_mvtec(tmp_path / "data")
    out = tmp_path / ("feats.zarr" if fmt == "zarr" else "feats.h5")
    progress = Recorder()
    # the paper geometry: one S x S input per image (the full frame is tested in test_geometry.py)
    result = extract(data, out, backbone=bb, batch_size=3, num_workers=0, progress=progress, geometry="paper")
    assert (result.written, result.skipped, result.already, result.n_images) == (8, 0, 0, 8)
    assert progress.total == 8 and progress.advanced == 8
    with cache.open(out) as store:
        assert store.format == fmt and store.complete.all()
        assert store.grid == (2, 2) and store.token_dim == 192 and store.mask_size == (SIZE, SIZE)
        assert [s["path"] for s in store.samples][:2] == ["train/good/000.png", "train/good/001.png"]
        assert store.labels.tolist() == [0] * 5 + [1, 1, 0]  # test/crack sorts before test/good
        attrs = store.attrs
        assert attrs["backbone"] == TINY and attrs["layer"] == 11 and attrs["image_size"] == SIZE
        assert attrs["resize"] == 37 and attrs["crop"] == SIZE and attrs["grid"] == [2, 2]
        assert attrs["funad_version"] == funad.__version__ and attrs["dataset_kind"] == "mvtec"
        assert attrs["dataset_root"] == str(data.resolve()) and attrs["weights_sha256"] == bb.weights_sha256
        # features are the backbone's tokens of the pre-processed image, stored as float16
        img = Image.open(data / "test/crack/001.png")
        cls, patches = bb(image_transform(bb)(img)[None])
        feats = store.read_features([6], dtype="float32")[0]
        np.testing.assert_allclose(feats[:, 192:], patches[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(feats[:, :192], np.repeat(cls.numpy(), 4, axis=0), rtol=2e-3, atol=2e-3)
        # masks follow the image geometry; normal images get an empty mask
        mask = store.read_masks([6])[0]
        np.testing.assert_array_equal(mask, MaskTransform(SIZE)(Image.open(data / "ground_truth/crack/001_mask.png")))
        assert mask[:, -5:].all() and not mask[:, :5].any() and not store.read_masks([0]).any()
        preview = store.read_previews([6])[0]
        assert preview.shape == (SIZE, SIZE, 3) and preview.dtype == np.uint8
        np.testing.assert_array_equal(preview, image_transform(bb).crop(img))


def test_worker_processes_give_the_same_store(tmp_path, bb):
    data = make_mvtec(tmp_path / "data", n_train=2)
    extract(data, tmp_path / "a.zarr", backbone=bb, batch_size=2, num_workers=0)
    extract(data, tmp_path / "b.zarr", backbone=bb, batch_size=2, num_workers=1)
    with cache.open(tmp_path / "a.zarr") as a, cache.open(tmp_path / "b.zarr") as b:
        idx = np.arange(a.n_images)
        np.testing.assert_array_equal(a.read_features(idx), b.read_features(idx))
        np.testing.assert_array_equal(a.read_masks(idx), b.read_masks(idx))


def test_resume_after_a_crash_gives_identical_features(tmp_path, bb, monkeypatch):
    data = make_mvtec(tmp_path / "data")
    extract(data, tmp_path / "clean.zarr", backbone=bb, batch_size=3, num_workers=0)

    with backbone_killed_on_call(2), pytest.raises(KeyboardInterrupt):
        extract(data, tmp_path / "crash.zarr", backbone=bb, batch_size=3, num_workers=0)
    with cache.open(tmp_path / "crash.zarr") as store:
        assert store.status.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # the first batch survived the crash
        first = store.read_patch_tokens([0, 1, 2])

    result = extract(data, tmp_path / "crash.zarr", backbone=bb, batch_size=3, num_workers=0)
    assert (result.already, result.written) == (3, 5)
    with cache.open(tmp_path / "crash.zarr") as resumed, cache.open(tmp_path / "clean.zarr") as clean:
        idx = np.arange(8)
        assert resumed.complete.all()
        np.testing.assert_array_equal(resumed.read_patch_tokens([0, 1, 2]), first)  # not recomputed
        np.testing.assert_array_equal(resumed.read_features(idx), clean.read_features(idx))
        np.testing.assert_array_equal(resumed.read_masks(idx), clean.read_masks(idx))

    again = extract(data, tmp_path / "crash.zarr", backbone=bb, batch_size=3, num_workers=0)
    assert (again.already, again.written) == (8, 0)


def test_changed_settings_are_refused_unless_overwrite(tmp_path, bb):
    data = make_mvtec(tmp_path / "data", n_train=2)
    out = tmp_path / "f.zarr"
    extract(data, out, backbone=bb, batch_size=4, num_workers=0)
    other = copy.copy(bb)
    other.layer = 5
    with pytest.raises(cache.CacheMismatchError, match=r"layer: store has 11, this run asks for 5.*--overwrite"):
        extract(data, out, backbone=other, num_workers=0)
    with pytest.raises(cache.CacheMismatchError, match=r"dtype: store has 'float16', this run asks for 'float32'"):
        extract(data, out, backbone=bb, dtype="float32", num_workers=0)
    write_png(data / "train/good/009.png", seed=9)  # a new image is appended (tests/test_extract_grow.py)
    with pytest.raises(cache.CacheMismatchError, match=r"layer: store has 11, this run asks for 5"):
        extract(data, out, backbone=other, num_workers=0)
    with cache.open(out) as store:
        assert store.n_images == 5
    result = extract(data, out, backbone=bb, dtype="float32", overwrite=True, num_workers=0)
    assert result.written == 6
    with cache.open(out) as store:
        assert store.dtype == "float32" and store.n_images == 6


def test_extract_redoes_exactly_the_damaged_images(tmp_path, bb):
    data = make_mvtec(tmp_path / "data", n_train=3)  # batches of 1: features do not depend on the batching
    out = tmp_path / "f.zarr"
    extract(data, out, backbone=bb, batch_size=1, num_workers=0, chunk_images=2)
    with cache.open(out) as store:
        idx = np.arange(store.n_images)
        before = store.read_features(idx)
        tokens_2 = store.read_patch_tokens([2])
    (out / "patch_tokens/c.0.0.0").unlink()  # images 0 and 1
    mask = out / "masks/c.1.0.0"  # images 2 and 3; test/crack/000.png (3) has a mask
    mask.write_bytes(mask.read_bytes()[:-4])
    res = CliRunner().invoke(cache_cli, ["verify", str(out)])
    assert res.exit_code == 1 and "4 of 6 complete images are damaged" in res.output

    result = extract(data, out, backbone=bb, batch_size=1, num_workers=0)
    assert (result.already, result.written) == (2, 4)
    with cache.open(out) as store:
        assert store.verify() == []
        np.testing.assert_array_equal(store.read_features(idx), before)
        np.testing.assert_array_equal(store.read_patch_tokens([2]), tokens_2)
    assert CliRunner().invoke(cache_cli, ["verify", str(out)]).exit_code == 0


def test_changed_settings_are_refused_before_the_backbone_loads(tmp_path, bb, monkeypatch):
    from funad.pipelines import extract as extract_module

    data = make_mvtec(tmp_path / "data", n_train=2)
    out = tmp_path / "f.zarr"
    extract(data, out, backbone=bb, batch_size=4, num_workers=0)

    def no_loading(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the settings were checked")

    monkeypatch.setattr(extract_module, "load_backbone", no_loading)
    spec = BackboneSpec(TINY, image_size=SIZE, layer=3, pretrained=False)
    with pytest.raises(cache.CacheMismatchError, match=r"layer: store has 11, this run asks for 3"):
        extract(data, out, backbone=spec, precision="fp32", num_workers=0)
    with pytest.raises(cache.CacheMismatchError, match=r"image_size: store has 32, this run asks for 64"):
        extract(data, out, backbone=BackboneSpec(TINY, image_size=64, pretrained=False), precision="fp32")
    with pytest.raises(cache.CacheMismatchError, match=r"precision: store has 'fp32', this run asks for 'bf16'"):
        extract(data, out, backbone=BackboneSpec(TINY, image_size=SIZE, pretrained=False), precision="bf16")


def test_auto_precision_follows_the_store_then_the_hardware(tmp_path, monkeypatch):
    """--precision auto resumes a store in its recorded precision (no mismatch), and on a new store
    picks bf16 only where the CPU has native bf16 arithmetic."""
    import torch

    from funad.pipelines import device as device_module
    from funad.pipelines import extract as extract_module

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not device_module.cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert device_module.cpu_has_native_bf16(cpuinfo)
    assert not device_module.cpu_has_native_bf16(tmp_path / "absent")
    cpu = torch.device("cpu")
    assert device_module.auto_precision(cpu, recorded="bf16") == "bf16"

    data = make_mvtec(tmp_path / "data", n_train=2)
    spec = BackboneSpec(TINY, image_size=SIZE, pretrained=False)
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda native=native: native)
        out = tmp_path / f"{expected}.zarr"
        extract(data, out, backbone=spec, device="cpu", precision="auto", num_workers=0)
        with cache.open(out) as store:
            assert store.attrs["precision"] == expected
    # resuming the bf16 store on a machine without native bf16: auto keeps bf16, fp32 is refused
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    loads = []
    real_load = extract_module.load_backbone
    monkeypatch.setattr(extract_module, "load_backbone",
                        lambda *a, **k: loads.append(k["precision"]) or real_load(*a, **k))
    result = extract(data, tmp_path / "bf16.zarr", backbone=spec, device="cpu", precision="auto", num_workers=0)
    assert result.written == 0 and loads == ["bf16"]
    with pytest.raises(cache.CacheMismatchError, match=r"precision: store has 'bf16', this run asks for 'fp32'"):
        extract(data, tmp_path / "bf16.zarr", backbone=spec, device="cpu", precision="fp32", num_workers=0)


def test_corrupt_image_stops_with_its_path_or_is_skipped(tmp_path, bb):
    data = make_mvtec(tmp_path / "data")
    (data / "train/good/004.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match=r"cannot read image .*train/good/004\.png .*--skip-bad"):
        extract(data, tmp_path / "stop.zarr", backbone=bb, batch_size=2, num_workers=0)
    with cache.open(tmp_path / "stop.zarr") as store:
        assert store.status.tolist()[:4] == [1, 1, 1, 1]  # batches before the bad image are kept

    result = extract(data, tmp_path / "skip.zarr", backbone=bb, batch_size=2, num_workers=0, skip_bad=True)
    assert (result.written, result.skipped) == (7, 1)
    with cache.open(tmp_path / "skip.zarr") as store:
        assert store.status.tolist() == [1, 1, 1, 1, 2, 1, 1, 1]
        assert "UnidentifiedImageError" in store.skip_reason(4) or "OSError" in store.skip_reason(4)
        assert 4 not in store.indices()


def test_cli_extract_with_a_local_weights_file(tmp_path, bb):
    data = make_mvtec(tmp_path / "data", n_train=2)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
    args = [str(data), "-o", str(tmp_path / "f.zarr"), "--backbone", TINY, "--weights", str(weights),
            "--image-size", str(SIZE), "--device", "cpu", "--precision", "fp32", "--num-workers", "0"]
    res = CliRunner().invoke(extract_cli, args)
    assert res.exit_code == 0, res.output
    assert "5 images written, 0 skipped, 0 already complete" in res.output
    with cache.open(tmp_path / "f.zarr") as store:
        assert store.attrs["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert store.attrs["weights"] == str(weights.resolve())
        assert store.complete.all()
    res = CliRunner().invoke(extract_cli, [*args, "--layer", "3"])
    assert res.exit_code == 1 and "layer: store has 11, this run asks for 3" in res.output


def _half_done_store(out: Path, data: Path, opts: dict, monkeypatch) -> None:
    """A store whose extraction stopped after two images."""
    with backbone_killed_on_call(3), pytest.raises(KeyboardInterrupt):
        extract(data, out, **opts)


def test_torchrun_with_two_processes_gives_the_store_of_one(tmp_path, bb, monkeypatch):
    """gloo on the CPU: 2 ranks resume a store a single process left with two images, one of them
    damaged (rank 1 finds it); the result is byte for byte the store one process makes (batches of
    1, so batching cannot change a value)."""
    data = make_mvtec(tmp_path / "data", n_train=3)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
    spec = BackboneSpec(TINY, weights=str(weights), image_size=SIZE)
    opts = dict(backbone=spec, device="cpu", precision="fp32", batch_size=1, num_workers=0, chunk_images=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets for its processes: the thread count changes float sums
    try:
        extract(data, tmp_path / "one.zarr", **opts)
        _half_done_store(tmp_path / "two.zarr", data, opts, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    chunk = tmp_path / "two.zarr/patch_tokens/c.0.0.0"  # images 0 and 1 (chunks of 2)
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0x40  # damage image 1 only
    chunk.write_bytes(bytes(raw))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "funad",
           "extract", str(data), "-o", str(tmp_path / "two.zarr"), "--backbone", TINY, "--weights", str(weights),
           "--image-size", str(SIZE), "--device", "cpu", "--precision", "fp32", "--batch-size", "1",
           "--num-workers", "0", "--chunk-images", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout.count("images written") == 1  # rank 0 reports, for both
    assert "5 images written, 0 skipped, 1 already complete (6 in all)" in res.stdout

    with cache.open(tmp_path / "one.zarr") as one, cache.open(tmp_path / "two.zarr") as two:
        assert two.complete.all() and two.verify() == []
        for name in ("patch_tokens", "class_tokens", "masks", "previews", "skip_reasons", "records",
                     "records_snapshot", "records_snapshot_valid"):
            np.testing.assert_array_equal(two._b.array(name)[:], one._b.array(name)[:], err_msg=name)
        drop = lambda attrs: {k: v for k, v in attrs.items() if k != "created_at"}  # noqa: E731
        assert drop(two.attrs) == drop(one.attrs) and two.samples == one.samples
    assert not cache.lock_path(tmp_path / "two.zarr").exists()


def test_ranks_share_the_images_out_by_chunk():
    from funad.pipelines.distributed import Group

    pending = np.array([1, 2, 3, 4, 5, 9, 10, 17])
    shares = [Group(rank=r, world=2).share(pending, 4).tolist() for r in range(2)]
    assert shares == [[1, 2, 3, 9, 10], [4, 5, 17]]  # chunks 0 and 2 to rank 0, chunks 1 and 4 to rank 1
    assert Group().share(pending, 4).tolist() == pending.tolist()


def test_the_writer_writes_whole_chunks(tmp_path):
    """Batches of 3 into chunks of 4: each chunk is written once, when its last pending image arrives
    (a skipped image counts as arrived); what is held at close is written then."""
    from funad.pipelines.extract_io import BatchWriter

    calls = []

    class Store:
        chunk_images = 4

        def write_batch(self, indices, **arrays):
            calls.append(np.asarray(indices).tolist())
            assert arrays["patch_tokens"][:, 0, 0].tolist() == np.asarray(indices).tolist()

        def mark_skipped(self, index, reason):
            calls.append(("skip", index))

    class Task:
        def advance(self, n):
            pass

    def batch(idx):
        idx = np.asarray(idx)
        return {"indices": idx, "patch_tokens": idx[:, None, None].astype(np.float32) * np.ones((1, 2, 3)),
                "class_tokens": np.zeros((idx.size, 3)), "masks": np.zeros((idx.size, 2, 2), np.uint8),
                "previews": None, "digests": None}

    writer = BatchWriter(Store(), Task(), pending=np.arange(2, 13))
    writer.put("write", batch([2, 3, 4]))  # chunk 0 (pending: 2, 3) is complete
    writer.put("write", batch([5, 6, 7]))  # chunk 1 (4-7) is complete
    writer.put("skip", (8, "unreadable"))
    writer.put("write", batch([9, 10]))  # chunk 2 waits for 11
    writer.close()
    assert calls == [[2, 3], [4, 5, 6, 7], ("skip", 8), [9, 10]] and writer.written == 8


def test_torchrun_refuses_an_hdf5_output(tmp_path, bb, monkeypatch):
    from funad.pipelines import distributed
    from funad.pipelines.errors import PipelineError

    monkeypatch.setattr(distributed, "join", lambda: distributed.Group(rank=0, world=2))
    data = make_mvtec(tmp_path / "data", n_train=1)
    with pytest.raises(PipelineError, match=r"f\.h5: an HDF5 file takes one writer process.*zarr"):
        extract(data, tmp_path / "f.h5", backbone=bb, num_workers=0)


@pytest.mark.realdata
def test_real_bottle_images_with_offline_weights(tmp_path, shared_dir):
    src = shared_dir / "data/mvtec_ad/bottle"
    weights = shared_dir / "weights/vit_small_patch14_dinov2.imgfocus.safetensors"
    data = tmp_path / "bottle"
    for rel in ("train/good/000.png", "train/good/001.png", "test/good/000.png", "test/broken_large/000.png",
                "ground_truth/broken_large/000_mask.png"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, data / rel)
    spec = BackboneSpec("vit_small_patch14_dinov2", weights=str(weights), layer=7, image_size=392)
    result = extract(data, tmp_path / "bottle.zarr", backbone=spec, device="cpu", batch_size=4, num_workers=0)
    assert result.written == 4
    with cache.open(tmp_path / "bottle.zarr") as store:
        assert store.grid == (28, 28) and store.token_dim == 384 and store.feature_dim == 768
        # the default geometry: bottle's square 900 x 900 images whole, short side 392, nothing cropped
        assert store.attrs["geometry"] == "full" and store.attrs["resize"] is None and store.attrs["layer"] == 7
        assert store.attrs["weights_sha256"] == "7eff090d699a0b320248e02a16f776182f36f4f06b2597aead05498fb39e998e"
        feats = store.read_features(np.arange(4), dtype="float32")
        assert feats.shape == (4, 784, 768) and np.isfinite(feats).all()
        broken = [s["path"] for s in store.samples].index("test/broken_large/000.png")
        assert store.labels[broken] == 1 and store.labels.sum() == 1
        masks = store.read_masks(np.arange(4))
        assert masks.shape == (4, 392, 392) and masks[broken].sum() > 100 and masks.sum() == masks[broken].sum()
        # the two normal training bottles resemble each other more than the broken one
        patches = feats[:, :, 384:]
        dist = lambda a, b: float(np.linalg.norm(patches[a] - patches[b], axis=1).mean())  # noqa: E731
        assert dist(0, 1) < dist(0, broken)
