"""`funad fit`: the pipeline, the model directory and the CLI on tiny synthetic stores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from funad import cache
from funad.cli.fit_cmd import fit as fit_cmd
from funad.pipelines import checkpoints
from funad.pipelines import fit as fit_pipeline
from funad.pipelines import modeldir
from funad.pipelines.fit_data import diagnostics_for
from funad.pipelines.errors import ModelDirError, PipelineError
from funad.pipelines.features import StoreSource, choose_residency, feature_bytes, load_features, patch_labels

GRID, C, MASK = (2, 2), 4, (8, 8)  # P = 4 patches, D = 2C = 8
FAST = ["--set", "batch_size=4", "--epochs", "2", "--device", "cpu"]


def make_store(path, *, n_train=8, n_test_good=4, n_test_bad=6, labelled=True, complete=True, seed=0):
    """A tiny store: normal patches near 0, anomalous images with one shifted, masked patch."""
    rng = np.random.default_rng(seed)
    label = (lambda v: v) if labelled else (lambda v: -1)
    samples = (
        [{"path": f"train/good/{i:03d}.png", "split": "train", "label": label(0), "defect_type": "good"}
         for i in range(n_train)]
        + [{"path": f"test/good/{i:03d}.png", "split": "test", "label": label(0), "defect_type": "good"}
           for i in range(n_test_good)]
        + [{"path": f"test/crack/{i:03d}.png", "split": "test", "label": label(1), "defect_type": "crack"}
           for i in range(n_test_bad)]
    )
    n, p = len(samples), GRID[0] * GRID[1]
    patches = rng.normal(0, 0.1, (n, p, C)).astype(np.float32)
    classes = rng.normal(0, 0.1, (n, C)).astype(np.float32)
    masks = np.zeros((n, *MASK), np.uint8)
    for i, s in enumerate(samples):
        if s["defect_type"] == "crack":
            patches[i, 3] += 3.0  # bottom-right patch
            masks[i, 5:8, 5:8] = 1
    store = cache.create(path, samples=samples, grid=GRID, token_dim=C, mask_size=MASK, preview_size=None,
                         dtype="float32", attributes={"backbone": "synthetic", "layer": 1})
    last = n if complete else n - 2
    store.write_batch(np.arange(last), patch_tokens=patches[:last], class_tokens=classes[:last], masks=masks[:last])
    store.close()
    return path


@pytest.fixture
def store_path(tmp_path):
    return make_store(tmp_path / "feats.zarr")


def assert_same_weights(a: dict, b: dict) -> None:
    """Two saved states hold the same entries, and bit-identical tensors."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        elif isinstance(a[key], dict):
            assert_same_weights(a[key], b[key])
        else:
            assert a[key] == b[key], key


def run(args):
    result = CliRunner().invoke(fit_cmd, [str(a) for a in args])
    return result


def two_curves(store_path, dirs, first_args, second_args) -> tuple[list, list]:
    """Fit ``dirs`` (two model directories) with ``--eval-every 1`` and each one's extra arguments; return the
    training-log records that carry test metrics, one list per directory."""
    logs = []
    for out, args in zip(dirs, (first_args, second_args)):
        res = run([store_path, "-o", out, *FAST, "--eval-every", "1", *args])
        assert res.exit_code == 0, res.output
        logs.append([r for r in modeldir.read_log(out) if "test_image_auroc" in r])
    return logs[0], logs[1]


def split_image_auroc(model_dir, store_path) -> float:
    """Image AUROC of a model directory on its own test split, scored from the cache."""
    from funad.metrics import image_metrics

    model, info = modeldir.load_model_dir(model_dir)
    with cache.open(store_path) as store:
        scores = model.score_images(torch.from_numpy(store.read_features(info.test_ids, dtype="float32")))
        labels = store.labels[info.test_ids]
    return image_metrics(labels, scores)["image_auroc"]


# ----------------------------------------------------------------- features


def test_patch_labels_max_pool_masks():
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 5, 5] = 1  # one pixel in the bottom-right cell
    masks[1, 0:4, 0:4] = 1  # exactly the top-left cell
    out = patch_labels(masks, (2, 2))
    assert out.tolist() == [[0, 0, 0, 1], [1, 0, 0, 0]]


def test_residency_auto_follows_budget():
    cpu = torch.device("cpu")
    need = feature_bytes(230, 784, 768)
    assert need == 230 * 784 * 768 * 4
    assert choose_residency("auto", need, cpu, ram=4 * need, gpu_free=0) == ("memory", cpu)
    assert choose_residency("auto", need, cpu, ram=need, gpu_free=0)[0] == "stream"  # 50% budget
    assert choose_residency("stream", 10, cpu, ram=10**9, gpu_free=0)[0] == "stream"
    assert choose_residency("memory", need, cpu, ram=need, gpu_free=0)[0] == "memory"
    with pytest.raises(PipelineError, match="--resident"):
        choose_residency("disk", need, cpu, ram=need, gpu_free=0)


def test_store_source_matches_memory(store_path):
    with cache.open(store_path) as store:
        ids = np.array([9, 2, 5])
        src = StoreSource(store, ids)
        mem = load_features(store, ids)
        assert (src.n_images, src.n_patches, src.dim) == (3, 4, 8)
        got = src.get(np.array([2, 0]))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, mem[[2, 0]])
        torch.testing.assert_close(mem[1], torch.from_numpy(store.read_features([2], dtype="float32")[0]))


# ------------------------------------------------------------------ the fit


def test_fit_cli_writes_model_dir(store_path, tmp_path):
    out = tmp_path / "model"
    res = run([store_path, "-o", out, *FAST, "--contamination", "0.25", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "train_log.jsonl"}  # no checkpoint
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "funad" and cfg["selection"] == "final" and cfg["complete"] is True
    assert cfg["config"]["batch_size"] == 4 and cfg["config"]["epochs"] == 2 and cfg["config"]["seed"] == 3
    assert cfg["cache"]["fingerprint"] and cfg["cache"]["attrs"]["backbone"] == "synthetic"
    assert cfg["cache"]["grid"] == [2, 2] and cfg["cache"]["feature_dim"] == 8
    split = cfg["contamination"]
    assert split["ratio"] == 0.25 and split["overlap"] is False and split["seed"] == 3
    assert split["n_moved"] == 2 == len(split["moved_ids"])  # round(0.25 * 8)
    assert all(p.startswith("test/crack/") for p in split["moved_paths"])
    assert set(split["moved_ids"]) <= set(split["train_ids"])
    assert not set(split["moved_ids"]) & set(split["test_ids"])  # no overlap
    assert len(split["train_ids"]) == 10 and len(split["test_ids"]) == 8
    assert cfg["fit_seconds"] > 0

    log = modeldir.read_log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    # The two moved anomalies have their planted patch labelled: pseudo-label recall is defined.
    assert all(r["pseudo_recall"] is not None and 0.0 <= r["bank_purity"] <= 1.0 for r in log)

    model, info = modeldir.load_model_dir(out)
    assert info.method == "funad" and info.moved_ids.tolist() == split["moved_ids"]
    with cache.open(store_path) as store:
        x = torch.from_numpy(store.read_features(info.test_ids, dtype="float32"))
    scores = model.score_patches(x)
    assert scores.shape == (8, 4) and np.isfinite(scores).all()


def test_diagnostics_see_the_labels_of_the_training_images(store_path, tmp_path):
    # Patch labels are the masks pooled onto the grid, in training-source order.
    with cache.open(store_path) as store:
        ids = np.array([0, 12, 3, 15])  # train/good, test/crack, train/good, test/crack
        diag = diagnostics_for(store, ids)
    assert diag["image_labels"].tolist() == [0, 1, 0, 1]
    assert diag["patch_labels"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1]]
    # Clean training data: every bank image is normal (purity exactly 1) and there is no anomalous patch to recall.
    res = run([store_path, "-o", tmp_path / "clean", *FAST])
    assert res.exit_code == 0, res.output
    log = modeldir.read_log(tmp_path / "clean")
    assert [r["bank_purity"] for r in log] == [1.0, 1.0]
    assert [r["pseudo_recall"] for r in log] == [None, None]


def test_overlap_keeps_moved_in_test(store_path, tmp_path):
    res = run([store_path, "-o", tmp_path / "m", *FAST, "--contamination", "0.25", "--overlap"])
    assert res.exit_code == 0, res.output
    split = json.loads((tmp_path / "m" / "config.json").read_text())["contamination"]
    assert split["overlap"] is True and set(split["moved_ids"]) <= set(split["test_ids"])
    assert len(split["test_ids"]) == 10


def test_same_seed_same_weights_and_stream_equals_memory(store_path, tmp_path):
    for name, resident in (("a", "memory"), ("b", "memory"), ("c", "stream")):
        res = run([store_path, "-o", tmp_path / name, *FAST, "--resident", resident])
        assert res.exit_code == 0, res.output
    a, b, c = (modeldir.load_weights(tmp_path / n) for n in "abc")
    assert_same_weights(a, b)
    assert_same_weights(a, c)


def test_resume_gives_the_uninterrupted_weights(store_path, tmp_path):
    full = tmp_path / "full"
    assert run([store_path, "-o", full, *FAST[:2], "--epochs", "3", "--device", "cpu"]).exit_code == 0

    # An interrupted fit: stop after the checkpoint of epoch 2.
    part = tmp_path / "part"
    spec = fit_pipeline.FitSpec(overrides=(("batch_size", 4),), epochs=3)

    class Stop(Exception):
        pass

    real_save = modeldir.save_checkpoint

    def save_then_maybe_stop(path, state):
        real_save(path, state)
        if checkpoints.checkpoint_epoch(state) >= 2:
            raise Stop

    fit_pipeline.modeldir.save_checkpoint = save_then_maybe_stop
    try:
        with pytest.raises(Stop):
            fit_pipeline.fit(store_path, part, spec, device="cpu", checkpoint_seconds=0)
    finally:
        fit_pipeline.modeldir.save_checkpoint = real_save
    assert not (part / "model.safetensors").exists()
    assert json.loads((part / "config.json").read_text())["complete"] is False
    with pytest.raises(ModelDirError, match="did not finish"):
        modeldir.load_model_dir(part)

    # Without --resume the unfinished directory is protected.
    res = run([store_path, "-o", part, *FAST[:2], "--epochs", "3", "--device", "cpu"])
    assert res.exit_code != 0 and "--resume" in res.output
    # --resume takes the recorded options when none are given.
    res = run([store_path, "-o", part, "--resume", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    a, b = modeldir.load_weights(full), modeldir.load_weights(part)
    assert_same_weights(a, b)
    assert [r["epoch"] for r in modeldir.read_log(part)] == [1, 2, 3]

    # A finished fit whose checkpoint was kept is extended with a larger --epochs, and only then.
    short = tmp_path / "short"
    assert run([store_path, "-o", short, *FAST, "--keep-checkpoint"]).exit_code == 0  # 2 epochs
    assert checkpoints.checkpoint_epoch(modeldir.load_checkpoint(short)) == 2
    res = run([store_path, "-o", short, "--resume", "--device", "cpu"])
    assert res.exit_code != 0 and "already finished" in res.output
    res = run([store_path, "-o", short, "--resume", "--epochs", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    c = modeldir.load_weights(short)
    assert_same_weights(a, c)
    assert json.loads((short / "config.json").read_text())["config"]["epochs"] == 3


def test_resume_of_a_finished_fit_needs_its_checkpoint(store_path, tmp_path):
    out = tmp_path / "m"
    assert run([store_path, "-o", out, *FAST]).exit_code == 0  # checkpoint.pt removed at the end
    assert not (out / "checkpoint.pt").exists()
    res = run([store_path, "-o", out, "--resume", "--epochs", "3", "--device", "cpu"])
    assert res.exit_code != 0
    assert "checkpoint.pt was removed" in res.output and "--overwrite --epochs 3" in res.output
    assert json.loads((out / "config.json").read_text())["complete"] is True  # the model is untouched


class _InterruptAt:
    """A Progress whose fit task raises KeyboardInterrupt (Ctrl-C) when epoch ``n`` reports."""

    def __init__(self, n):
        self.n, self.seen = n, 0

    def task(self, description, total=None, unit="it"):
        outer = self

        class Task:
            def advance(self, k=1):
                pass

            def update(self, **fields):
                if description.startswith("fit") and "loss" in fields:
                    outer.seen += 1
                    if outer.seen == outer.n:
                        raise KeyboardInterrupt

        return Task()


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes_the_fit(store_path, tmp_path):
    spec = fit_pipeline.FitSpec(overrides=(("batch_size", 4),), epochs=3)
    full = fit_pipeline.fit(store_path, tmp_path / "full", spec, device="cpu").model_dir
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):  # at epoch 2, long before the 1-hour checkpoint interval
        fit_pipeline.fit(store_path, part, spec, device="cpu", checkpoint_seconds=3600, progress=_InterruptAt(2))
    # The last finished epoch whose state reached the checkpointer: 1, or 2 when FunAD.fit hands over the
    # checkpoint before calling the callback. Without the write on Ctrl-C there would be none (epoch 0).
    assert checkpoints.checkpoint_epoch(modeldir.load_checkpoint(part)) in (1, 2)
    fit_pipeline.fit(store_path, part, spec, device="cpu", resume=True)
    a, b = modeldir.load_weights(full), modeldir.load_weights(part)
    assert_same_weights(a, b)
    assert [r["epoch"] for r in modeldir.read_log(part)] == [1, 2, 3]
    assert not (part / "checkpoint.pt").exists()


def test_resume_with_other_settings_is_refused(store_path, tmp_path):
    out = tmp_path / "m"
    (out).mkdir()
    spec = fit_pipeline.FitSpec(overrides=(("batch_size", 4),), epochs=2)
    fit_pipeline.fit(store_path, out, spec, device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    cfg["complete"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    res = run([store_path, "-o", out, "--resume", "--set", "lambda_=1", "--device", "cpu"])
    assert res.exit_code != 0 and "lambda_" in res.output


def test_resume_of_a_fit_from_before_a_setting_existed(store_path, tmp_path):
    """A setting that a later version added counts as its default in a fit started before it existed."""
    out = tmp_path / "m"
    out.mkdir()
    fit_pipeline.fit(store_path, out, fit_pipeline.FitSpec(overrides=(("batch_size", 4),), epochs=2), device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["config"]["score_space"]  # as written before score_space existed
    cfg["complete"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    res = run([store_path, "-o", out, "--resume", "--set", "score_space=logit", "--set", "batch_size=4",
               "--epochs", "2", "--device", "cpu"])
    assert res.exit_code != 0 and "score_space" in res.output
    res = run([store_path, "-o", out, "--resume", "--set", "batch_size=4", "--epochs", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output


def test_knn_method(store_path, tmp_path):
    out = tmp_path / "knn"
    res = run([store_path, "-o", out, "--method", "knn", "--device", "cpu", "--contamination", "0.25"])
    assert res.exit_code == 0, res.output
    assert not (out / "train_log.jsonl").exists()
    model, info = modeldir.load_model_dir(out)
    assert info.method == "knn" and info.preset is None
    with cache.open(store_path) as store:
        labels = store.labels[info.test_ids]
        scores = model.score_images(torch.from_numpy(store.read_features(info.test_ids, dtype="float32")))
    assert scores[labels == 1].min() > scores[labels == 0].max()  # planted anomalies outscore


# ------------------------------------------------------------------ errors


def test_incomplete_cache_names_pending(tmp_path):
    path = make_store(tmp_path / "partial.zarr", complete=False)
    res = run([path, "-o", tmp_path / "m", *FAST])
    assert res.exit_code != 0
    assert "2 of 18 images are pending" in res.output and "funad extract" in res.output


def test_too_small_for_batch_size(store_path, tmp_path):
    res = run([store_path, "-o", tmp_path / "m", "--set", "batch_size=16", "--epochs", "1", "--device", "cpu"])
    assert res.exit_code != 0
    assert "8 training images" in res.output and "batch size 16" in res.output


def test_unlabelled_cache(tmp_path):
    path = make_store(tmp_path / "u.zarr", labelled=False)
    res = run([path, "-o", tmp_path / "bad", *FAST, "--contamination", "0.1"])
    assert res.exit_code != 0 and "--contamination must be 0" in res.output
    res = run([path, "-o", tmp_path / "ok", *FAST])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert cfg["contamination"]["labelled"] is False and cfg["contamination"]["n_train"] == 8


def test_no_training_images(tmp_path):
    path = make_store(tmp_path / "t.zarr", n_train=0)
    res = run([path, "-o", tmp_path / "m", *FAST])
    assert res.exit_code != 0 and "no complete training images" in res.output


def test_misspelt_set_and_existing_dir(store_path, tmp_path):
    res = run([store_path, "-o", tmp_path / "m", "--set", "lamda=1"])
    assert res.exit_code != 0 and "lamda" in res.output
    out = tmp_path / "full"
    out.mkdir()
    (out / "something").write_text("x")
    res = run([store_path, "-o", out, *FAST])
    assert res.exit_code != 0 and "--overwrite" in res.output
    res = run([store_path, "-o", out, *FAST, "--overwrite"])
    assert res.exit_code == 0, res.output


def test_from_model_scores_anew_as_a_fresh_fit_with_those_settings(store_path, tmp_path):
    """--from-model takes the trained Local-Net and applies other inference and threshold settings: the model
    is the one a fresh fit with those settings writes, bit for bit, and the training log is the trained one's."""
    trained, anew, fresh = tmp_path / "trained", tmp_path / "anew", tmp_path / "fresh"
    assert run([store_path, "-o", trained, *FAST, "--contamination", "0.25", "--seed", "1"]).exit_code == 0
    changes = ["--set", "clean_share=0.75", "--threshold-rule", "otsu"]
    res = run([store_path, "-o", anew, "--from-model", trained, "--device", "cpu", *changes])
    assert res.exit_code == 0, res.output
    assert f"with the Local-Net trained in {trained}" in " ".join(res.output.split())
    res = run([store_path, "-o", fresh, *FAST, "--contamination", "0.25", "--seed", "1", *changes])
    assert res.exit_code == 0, res.output
    assert_same_weights(modeldir.load_weights(anew), modeldir.load_weights(fresh))
    a, f = (json.loads((d / "config.json").read_text()) for d in (anew, fresh))
    assert a["config"] == f["config"] and a["config"]["clean_share"] == 0.75
    assert a["threshold"] == f["threshold"] and a["threshold"]["rule"] == "otsu"
    assert a["contamination"] == f["contamination"] and a["clean_bank"] == f["clean_bank"]
    assert a["trained_by"]["model_dir"] == str(trained.resolve()) and "trained_by" not in f
    assert modeldir.read_log(anew) == modeldir.read_log(trained)
    # The trained model is untouched; so is its clean-image bank (clean_share 0.5).
    assert json.loads((trained / "config.json").read_text())["config"]["clean_share"] == 0.5


def test_from_model_refuses_what_would_need_training(store_path, tmp_path):
    trained = tmp_path / "trained"
    assert run([store_path, "-o", trained, *FAST]).exit_code == 0
    cases = [
        (["--set", "lambda_=1"], "lambda_: 2.5 -> 1.0"),
        (["--epochs", "3"], "epochs: 2 -> 3"),
        (["--preset", "fast"], "max_iterations: 210 -> 420"),  # fast trains twice as long as the default
        (["--contamination", "0.25"], "contamination ratio differs"),
        (["--method", "knn"], "a knn model trains none"),
    ]
    for args, message in cases:
        res = run([store_path, "-o", tmp_path / "anew", "--from-model", trained, "--device", "cpu", *args])
        assert res.exit_code != 0 and message in " ".join(res.output.split()), (args, res.output)
        assert not (tmp_path / "anew").exists()  # refused before anything is written
    # The default's training, scored with the Local-Net's own output (the README's advice instead of --preset fast).
    res = run([store_path, "-o", tmp_path / "localnet", "--from-model", trained, "--device", "cpu",
               "--set", "scorer=localnet"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "localnet" / "config.json").read_text())["config"]["scorer"] == "localnet"
    res = run([store_path, "-o", trained, "--from-model", trained, "--overwrite", "--device", "cpu"])
    assert res.exit_code != 0 and "is the output directory" in res.output
    assert json.loads((trained / "config.json").read_text())["complete"] is True
    res = run([store_path, "-o", tmp_path / "anew", "--from-model", tmp_path / "nothing", "--device", "cpu"])
    assert res.exit_code != 0 and "nothing" in res.output and "does not exist" in res.output
    knn = tmp_path / "knn"
    assert run([store_path, "-o", knn, "--method", "knn", "--device", "cpu"]).exit_code == 0
    res = run([store_path, "-o", tmp_path / "anew", "--from-model", knn, "--device", "cpu"])
    assert res.exit_code != 0 and "a knn model trains none" in " ".join(res.output.split())
    with pytest.raises(PipelineError, match="holds a knn model, which trains no Local-Net"):
        fit_pipeline.fit(store_path, tmp_path / "anew", fit_pipeline.FitSpec(overrides=(("batch_size", 4),)),
                         device="cpu", trained_from=knn)


def test_load_model_dir_names_missing_file(store_path, tmp_path):
    out = tmp_path / "m"
    assert run([store_path, "-o", out, *FAST]).exit_code == 0
    (out / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match="model.safetensors"):
        modeldir.load_model_dir(out)
    (out / "config.json").unlink()
    with pytest.raises(ModelDirError, match="config.json"):
        modeldir.load_model_dir(out)


def test_oracle_selection_is_labelled(store_path, tmp_path):
    out = tmp_path / "oracle"
    res = run([store_path, "-o", out, *FAST, "--epochs", "3", "--select", "oracle", "--preset", "fast"])
    assert res.exit_code == 0, res.output
    assert "ORACLE" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["selection"] == "oracle" and "TEST labels" in cfg["oracle"]["warning"]
    curve = cfg["oracle"]["curve"]
    assert [p["epoch"] for p in curve] == [1, 2, 3]
    best = max(curve, key=lambda p: p["mean"])
    assert cfg["oracle"]["epoch"] == best["epoch"]
    assert modeldir.load_model_dir(out)[1].is_oracle
    assert split_image_auroc(out, store_path) == pytest.approx(best["image_auroc"])
    res = run([store_path, "-o", tmp_path / "k", "--method", "knn", "--select", "oracle"])
    assert res.exit_code != 0 and "--select oracle" in res.output


def test_eval_every_logs_a_learning_curve_and_selects_nothing(store_path, tmp_path):
    plain, curve = tmp_path / "plain", tmp_path / "curve"
    assert run([store_path, "-o", plain, *FAST, "--epochs", "3", "--preset", "fast"]).exit_code == 0
    res = run([store_path, "-o", curve, *FAST, "--epochs", "3", "--eval-every", "2", "--preset", "fast"])
    assert res.exit_code == 0, res.output
    log = modeldir.read_log(curve)
    measured = [r["epoch"] for r in log if "test_image_auroc" in r]
    assert measured == [2, 3]  # every 2 epochs, and the last
    assert all("TEST labels" in r["test_metrics_note"] for r in log if "test_image_auroc" in r)
    assert all(0.0 <= r["test_pixel_auroc_logit"] <= 1.0 for r in log if "test_image_auroc" in r)
    # The learning curve is the eval of that epoch's weights: the last point equals eval of the model.
    assert split_image_auroc(curve, store_path) == pytest.approx(log[-1]["test_image_auroc"])
    # A diagnostic only: the weights equal those of the same fit without it.
    assert_same_weights(modeldir.load_weights(plain)["net"], modeldir.load_weights(curve)["net"])
    assert json.loads((curve / "config.json").read_text())["selection"] == "final"
    res = run([store_path, "-o", tmp_path / "k", "--method", "knn", "--eval-every", "1"])
    assert res.exit_code != 0 and "--eval-every" in res.output


def test_eval_every_with_ema_logs_both_the_average_and_the_last_weights(store_path, tmp_path):
    """With ema the curve is the averaged weights' (the model kept) and the last weights' beside it; the
    last weights' curve is exactly the curve of the same fit without ema."""
    plain_log, ema_log = two_curves(store_path, (tmp_path / "plain", tmp_path / "ema"), ["--preset", "fast"],
                                    ["--set", "ema=0.5", "--preset", "fast"])
    assert [r["epoch"] for r in ema_log] == [1, 2]
    for a, b in zip(plain_log, ema_log):
        assert b["test_pixel_auroc_last_weights"] == pytest.approx(a["test_pixel_auroc"])
    assert ema_log[-1]["test_pixel_auroc"] != pytest.approx(ema_log[-1]["test_pixel_auroc_last_weights"], abs=1e-9)


def test_fit_progress_line_fits_100_columns():
    # Epoch count, elapsed, ETA, it/s and the losses all visible on a 100-column terminal.
    import re
    import time

    from rich.console import Console

    from funad.cli.common import RichProgress

    con = Console(width=100, force_terminal=True, record=True, color_system=None)
    with RichProgress(console=con) as progress:
        progress.task("loading features", total=40, unit="img").advance(40)
        log = fit_pipeline._EpochLogger(None, progress.task("fit epoch", total=1500, unit="epoch"), 7, 0)
        for epoch in range(1, 4):
            time.sleep(0.05)
            log({"epoch": epoch, "loss": 1.2345678, "loss_bce": 1.1234, "loss_ms": 0.0234567})
    last = con.export_text().splitlines()[-1]
    assert len(last) <= 100
    assert re.search(r"fit epoch .* 3/1500 \d+:\d\d:\d\d eta \d+:\d\d:\d\d [\d.]+ it/s loss 1\.23 bce 1\.12 ms 0\.0235",
                     last), last


def test_piped_output_is_plain_unwrapped_and_says_each_result_once(tmp_path):
    from funad.cli.main import cli

    deep = tmp_path / ("a-rather-long-folder-name-that-would-wrap-at-eighty-columns" * 2) / "model"
    store = make_store(tmp_path / "feats.zarr")
    res = CliRunner().invoke(cli, ["fit", str(store), "-o", str(deep), *FAST])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    written = [line for line in lines if "model written to" in line]
    assert written == [f"model written to {deep} (funad, preset cleaned, 8 training images, 0 moved anomalies, "
                       f"{written[0].rsplit(', ', 1)[1]}"]  # one unwrapped line, the full path in it
    assert not any(line.strip() == "" for line in lines)  # no blank lines, no progress-bar debris
    assert not any("━" in line for line in lines)
    # An error is one line starting with "Error:", no blank line before it and no traceback.
    res = CliRunner().invoke(cli, ["fit", str(tmp_path / "missing.zarr"), "-o", str(tmp_path / "m")])
    assert res.exit_code != 0 and res.output.startswith("Error: ") and "Traceback" not in res.output


def test_set_help_and_list_settings_name_every_field():
    from funad.config import PRESETS, FunADConfig

    fields = list(FunADConfig().to_dict())
    help_text = " ".join(CliRunner().invoke(fit_cmd, ["--help"]).output.split())
    assert all(name in help_text for name in fields) and "--list-settings" in help_text
    res = CliRunner().invoke(fit_cmd, ["--list-settings"])  # no CACHE or -o needed
    assert res.exit_code == 0, res.output
    rows = {line.split()[1]: line for line in res.output.splitlines() if line.startswith("│ ")}
    assert set(fields) <= set(rows)
    # e.g. epochs: default 1500, fast 60 (marked as differing), paper 1500
    cells = [c.strip() for c in rows["epochs"].split("│")[1:-1]]
    order = sorted(PRESETS)
    assert cells[1] == "1500" and cells[2 + order.index("fast")] == "60 *" and cells[2 + order.index("paper")] == "1500"
    assert "passes over the training set" in rows["epochs"]
    # The default trains half of fast's iterations (its kNN only needs the Local-Net's ranking).
    cells = [c.strip() for c in rows["max_iterations"].split("│")[1:-1]]
    assert cells[1] == "none", cells
    assert cells[2 + order.index("cleaned")] == "210 *" and cells[2 + order.index("fast")] == "420 *"


def test_available_ram_counts_the_page_cache_the_kernel_can_drop(tmp_path):
    from funad.pipelines.features import available_ram
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24730000 kB\nMemFree:         5000000 kB\nMemAvailable:   20000000 kB\n")
    assert available_ram(str(meminfo)) == 20000000 * 1024
    # Without /proc/meminfo (other systems): the free pages, never an error.
    assert available_ram(str(tmp_path / "absent")) >= 0


@pytest.mark.parametrize("native, bf16, hinted", [(True, False, True), (True, True, False), (False, False, False)])
def test_fit_points_to_bf16_only_where_the_hardware_has_it(store_path, tmp_path, monkeypatch, caplog, native, bf16,
                                                            hinted):
    monkeypatch.setattr(fit_pipeline, "has_native_bf16", lambda device: native)
    with caplog.at_level("INFO", logger="funad.pipelines.fit"):
        fit_pipeline.fit(store_path, tmp_path / "m", fit_pipeline.FitSpec(overrides=(("batch_size", 4), ("bf16", bf16)),
                                                                          epochs=1), device="cpu")
    assert ("--set bf16=true" in caplog.text) is hinted


def test_epochs_cut_by_the_iteration_cap_are_announced(store_path, tmp_path, caplog):
    # 8 training images in batches of 4 are 2 steps per epoch; a cap of 2 steps leaves 1 of the 3 epochs asked for.
    spec = fit_pipeline.FitSpec(overrides=(("batch_size", 4), ("max_iterations", 2)), epochs=3)
    with caplog.at_level("INFO", logger="funad.pipelines.fit"):
        result = fit_pipeline.fit(store_path, tmp_path / "m", spec, device="cpu")
    assert len(result.log) == 1
    capped = [r for r in caplog.records if "max_iterations=2" in r.getMessage()]
    assert [r.levelname for r in capped] == ["WARNING"]
    assert "runs 1 of its 3 epochs" in capped[0].getMessage()
    assert "--set max_iterations=none" in capped[0].getMessage()
    # Without --epochs the preset's own budget is only reported; with the cap lifted, nothing is said.
    caplog.clear()
    with caplog.at_level("INFO", logger="funad.pipelines.fit"):
        fit_pipeline.fit(store_path, tmp_path / "n", fit_pipeline.FitSpec(
            overrides=(("batch_size", 4), ("max_iterations", 2), ("epochs", 3))), device="cpu")
    assert [r.levelname for r in caplog.records if "max_iterations=2" in r.getMessage()] == ["INFO"]
    caplog.clear()
    with caplog.at_level("INFO", logger="funad.pipelines.fit"):
        fit_pipeline.fit(store_path, tmp_path / "o", fit_pipeline.FitSpec(
            overrides=(("batch_size", 4), ("max_iterations", None)), epochs=2), device="cpu")
    assert "max_iterations" not in caplog.text
