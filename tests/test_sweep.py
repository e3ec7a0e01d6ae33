"""`funad sweep` on a tiny synthetic store: outputs, resume, grid parsing."""

from __future__ import annotations

import json

import csv

import pytest
from click.testing import CliRunner

from funad.cli.sweep_cmd import sweep as sweep_cmd
from funad.pipelines import sweep as sw
from funad.pipelines.errors import PipelineError
from test_fit_pipeline import make_store  # tests/ is on sys.path (pytest rootdir-relative import)


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def short(key):
    """The readable part of a cell key (without its ``|cfg=<digest>`` suffix)."""
    head, sep, digest = key.rpartition("|cfg=")
    assert sep and len(digest) == 12, key
    return head


def test_sweep_outputs_and_resume(tmp_path, monkeypatch):
    store = make_store(tmp_path / "f.zarr")
    out = tmp_path / "sweep"
    args = [str(store), "-o", str(out), "--contamination", "0,0.25", "--overlap", "both", "--methods", "funad,knn",
            "--seeds", "0", "--set", "batch_size=4", "--epochs", "1", "--device", "cpu"]
    res = CliRunner().invoke(sweep_cmd, args)
    assert res.exit_code == 0, res.output

    rows = rows_of(out / "results.csv")
    # 2 methods x 2 overlap settings x 2 ratios x 1 seed
    assert len(rows) == 8 and len({r["key"] for r in rows}) == 8
    for r in rows:
        for m in sw.METRICS:
            assert 0.0 <= float(r[m]) <= 1.0, (r["key"], m, r[m])
        assert r["selection"] == "final" and float(r["peak_rss_mb"]) > 0
    by_key = {short(r["key"]): r for r in rows}
    # kNN with the planted anomalies: perfect without contamination...
    assert float(by_key["knn|no-overlap|ratio=0|seed=0"]["image_auroc"]) == 1.0
    # ... and the ratio-0 overlap cell is the no-overlap run, reused.
    assert by_key["knn|overlap|ratio=0|seed=0"]["reused_from"] == by_key["knn|no-overlap|ratio=0|seed=0"]["key"]
    moved = by_key["knn|overlap|ratio=0.25|seed=0"]
    assert int(moved["n_moved"]) == 2 and int(moved["n_test"]) == 10
    assert int(by_key["knn|no-overlap|ratio=0.25|seed=0"]["n_test"]) == 8
    # every cell reports F1 at the unlabelled thresholds next to F1-max, and keeps its scores for later comparisons
    for r in rows:
        assert r["thr_rule"] == ("mad" if r["method"] == "funad" else "quantile") and all(0.0 <= float(r[m]) <= 1.0 for m in sw.THRESHOLD_METRICS)
        assert float(r["f1_at_thr"]) <= float(r["image_f1_max"]) + 1e-9  # F1-max is the best any threshold gives
    cell = json.loads(next((out / "cells").glob("knn_no-overlap_ratio=0.25_*.json")).read_text())
    assert len(cell["threshold"]["training_scores"]["image_scores"]) == int(by_key["knn|no-overlap|ratio=0.25|seed=0"]["n_train"])
    assert len(cell["test_image_scores"]) == len(cell["test_labels"]) == 8
    funad = by_key["funad:cleaned|no-overlap|ratio=0.25|seed=0|batch_size=4|epochs=1"]
    assert funad["cfg_batch_size"] == "4" and funad["cfg_epochs"] == "1" and funad["params"] == "batch_size=4 epochs=1"
    n_kept = int(funad["n_train"]) // 2  # the default clean_share=0.5
    assert int(funad["clean_images"]) == n_kept and 0.0 <= float(funad["clean_normal_share"]) <= 1.0
    assert by_key["knn|no-overlap|ratio=0.25|seed=0"]["clean_images"] == ""  # not a clean_knn model

    md = (out / "results.md").read_text()
    assert "| method | setting | 0% | 25% |" in md
    assert "| knn | overlap |" in md and "| funad:cleaned (batch_size=4 epochs=1) | no overlap |" in md
    assert "100.0 / " in md  # kNN image AUROC at 0%
    png = (out / "auroc_vs_contamination.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # A second run skips every cell: no fit may run.
    def no_fit(*a, **k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(sw, "run_cell", no_fit)
    res = CliRunner().invoke(sweep_cmd, args)
    assert res.exit_code == 0, res.output
    assert rows_of(out / "results.csv") == rows


def test_sweep_extends_the_grid(tmp_path):
    store = make_store(tmp_path / "f.zarr")
    out = tmp_path / "sweep"
    common = dict(overlap="no-overlap", methods=sw.parse_methods("knn"), device="cpu")
    sw.sweep(store, out, ratios=[0.0], seeds=[0], **common)
    rows = sw.sweep(store, out, ratios=[0.0, 0.25], seeds=[0, 1], **common)
    assert sorted(short(r["key"]) for r in rows) == [
        "knn|no-overlap|ratio=0.25|seed=0", "knn|no-overlap|ratio=0.25|seed=1",
        "knn|no-overlap|ratio=0|seed=0", "knn|no-overlap|ratio=0|seed=1",
    ]
    assert "±" in (out / "results.md").read_text()  # two seeds -> mean ± std


def test_other_epochs_or_preset_values_are_other_cells(tmp_path, monkeypatch):
    # The key holds every config field: a re-run with other --epochs, or after a preset changed, runs again
    # and its rows get their own label instead of being skipped or mixed with the earlier rows.
    store = make_store(tmp_path / "f.zarr")
    out = tmp_path / "sweep"
    kw = dict(ratios=[0.0], overlap="no-overlap", methods=sw.parse_methods("funad:fast"), sets={"batch_size": [4]},
              device="cpu")
    sw.sweep(store, out, epochs=1, **kw)
    rows = sw.sweep(store, out, epochs=2, **kw)
    assert sorted(r["cfg_epochs"] for r in rows) == ["1", "2"] and len({r["key"] for r in rows}) == 2
    md = (out / "results.md").read_text()
    assert "| funad:fast (batch_size=4 epochs=1) |" in md and "| funad:fast (batch_size=4 epochs=2) |" in md

    from funad import config

    monkeypatch.setitem(config.PRESETS, "fast", {**config.PRESETS["fast"], "lr": 3e-4})
    rows = sw.sweep(store, out, epochs=2, **kw)
    assert sorted(r["cfg_lr"] for r in rows) == sorted(["0.0001", "0.0001", "0.0003"])
    md = (out / "results.md").read_text()
    # same label, told apart by the digest, in all three tables (AUROC, AUPRO, F1 at the unlabelled thresholds)
    assert md.count("| funad:fast (batch_size=4 epochs=2) [cfg ") == 2 * 3


def test_cells_that_differ_only_in_inference_settings_train_once(tmp_path, monkeypatch):
    # clean_share acts after training: the second cell takes the first cell's Local-Net and gives what
    # training again gives; the preset fast with cleaned's max_iterations trains as cleaned does, so it shares
    # that net too.
    from funad.model import FunAD

    store = make_store(tmp_path / "f.zarr")
    kw = dict(ratios=[0.25], overlap="no-overlap", epochs=1, device="cpu")
    calls = []
    real_fit = FunAD.fit
    monkeypatch.setattr(FunAD, "fit", lambda self, *a, **k: (calls.append(self.config.clean_share),
                                                             real_fit(self, *a, **k))[1])
    rows = sw.sweep(store, tmp_path / "grid", methods=sw.parse_methods("funad,funad:fast"),
                    sets={"batch_size": [4], "clean_share": [0.5, 0.75], "max_iterations": [210]}, **kw)
    assert calls == [0.5]
    by_share = {(r["preset"], r["cfg_clean_share"]): r for r in rows}
    first = by_share[("cleaned", "0.5")]
    assert first["trained_by"] == "" and by_share[("cleaned", "0.75")]["trained_by"] == first["key"]
    assert by_share[("fast", "0.5")]["trained_by"] == first["key"]
    assert int(by_share[("cleaned", "0.75")]["clean_images"]) == int(int(first["n_train"]) * 0.75)
    md = (tmp_path / "grid" / "results.md").read_text()
    assert "| funad:cleaned (batch_size=4 clean_share=0.5 max_iterations=210 epochs=1) | 1 |" in md  # the time table: cells that trained
    assert "| funad:fast" not in md.split("## Fit and scoring time")[1]

    alone = sw.sweep(store, tmp_path / "alone", methods=sw.parse_methods("funad"),
                     sets={"batch_size": [4], "clean_share": [0.75], "max_iterations": [210]}, **kw)
    assert calls == [0.5, 0.75] and alone[0]["trained_by"] == ""
    for m in sw.METRICS + sw.THRESHOLD_METRICS:
        assert alone[0][m] == by_share[("cleaned", "0.75")][m], m


def test_grid_parsing():
    assert [m.label for m in sw.parse_methods("funad,knn,funad:paper,knn")] == ["funad:cleaned", "knn", "funad:paper"]
    with pytest.raises(PipelineError, match="unknown preset"):
        sw.parse_methods("funad:turbo")
    with pytest.raises(PipelineError, match="unknown method"):
        sw.parse_methods("patchcore")
    assert sw.parse_grid_sets(["lambda_=0,2.5", "bank_every=1,4"]) == {"lambda_": [0.0, 2.5], "bank_every": [1, 4]}
    with pytest.raises(Exception, match="lamda"):
        sw.parse_grid_sets(["lamda=1"])
    assert sw.parse_floats("0.1,0,0.1", "--contamination") == [0.0, 0.1]
    cells = sw.build_grid(sw.parse_methods("funad,knn"), [0.0, 0.1], [False, True], [0, 1],
                          {"lambda_": [0.0, 2.5]})
    # funad: 2 overlaps x 2 ratios x 2 seeds x 2 lambdas; knn ignores --set
    assert len(cells) == 16 + 8 and len({c.key for c in cells}) == 24


def test_sweep_refuses_results_of_another_cache(tmp_path):
    out = tmp_path / "sweep"
    kw = dict(ratios=[0.0], overlap="no-overlap", methods=sw.parse_methods("knn"), device="cpu")
    sw.sweep(make_store(tmp_path / "a.zarr"), out, **kw)
    with pytest.raises(PipelineError, match="another cache"):
        sw.sweep(make_store(tmp_path / "b.zarr", seed=1, n_train=9), out, **kw)


def test_results_md_averages_the_seeds_of_one_setting(tmp_path):
    store = make_store(tmp_path / "f.zarr")
    out = tmp_path / "sweep"
    args = [str(store), "-o", str(out), "--contamination", "0", "--overlap", "no-overlap", "--methods", "knn",
            "--seeds", "0,1,2"]
    assert CliRunner().invoke(sweep_cmd, args).exit_code == 0
    md = (out / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| knn |")]
    assert len(rows) == 4  # one row per table (AUROC, AUPRO/F1, F1 at the thresholds, times), not one per seed
    assert "cfg" not in rows[0] and "±" in rows[0]
    timing = rows[-1].split("|")  # | knn | 3 | fit median (min-max) | scoring median (min-max) |
    assert "## Fit and scoring time" in md
    assert timing[2].strip() == "3" and all("(" in c and "-" in c for c in timing[3:5])


def test_results_csv_of_an_older_funad_is_upgraded_not_refused(tmp_path):
    """A results.csv written before the original-size columns existed gains them (empty in its rows)."""

    from funad.pipelines.sweep_report import COLUMNS, ORIGINAL_METRICS, PIXEL_DECISION_METRICS, append_row, read_results

    old_columns = [c for c in COLUMNS if c not in ORIGINAL_METRICS + ("map_size",) + PIXEL_DECISION_METRICS]
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_columns)
        w.writeheader()
        w.writerow({"key": "old", "method": "knn", "image_auroc": "0.9"})
    append_row(path, {"key": "new", "method": "knn", "image_auroc": 0.8, "pixel_auroc_original": 0.7,
                      "map_size": "original"})
    rows = read_results(path)
    assert [r["key"] for r in rows] == ["old", "new"]
    assert rows[0]["image_auroc"] == "0.9" and rows[0]["pixel_auroc_original"] == ""
    assert rows[1]["pixel_auroc_original"] == "0.7"
    with open(path) as f:
        assert tuple(next(csv.reader(f))) == COLUMNS

    foreign = tmp_path / "foreign.csv"
    foreign.write_text("key,something_else\nx,1\n")
    with pytest.raises(PipelineError, match="other columns"):
        append_row(foreign, {"key": "new"})


def test_threshold_table_says_n_a_when_no_anomalous_test_image_is_left(tmp_path):
    """A cell whose test set holds no anomaly (every one moved into training) has no F1: n/a, not 0.0."""
    from funad.pipelines.sweep_report import COLUMNS, write_markdown

    row = {c: "" for c in COLUMNS}
    row.update(key="k", method="knn", overlap=0, ratio=0.1, seed=0, image_auroc="", pixel_auroc="",
               f1_thr_quantile=0.0, f1_thr_mad=0.0, f1_thr_otsu=0.0, fit_s=1.0, score_s=2.0)
    write_markdown(tmp_path / "r.md", [row])
    line = next(l for l in (tmp_path / "r.md").read_text().splitlines() if l.startswith("| knn | no overlap | 10% |"))
    assert "0.0" not in line and line.count("n/a") >= 4
