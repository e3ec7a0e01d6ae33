"""What each FUN-AD deviation costs: fit variants x seeds on one cache, with training diagnostics.

Every variant is a FunADConfig (a preset plus ``NAME=VALUE`` overrides). For
each variant and seed the script draws the contamination split exactly as
``funad fit --contamination R --seed S`` does, fits on the training images
(final epoch; nothing looks at test labels inside the fit), scores the test
images through the same path as ``funad eval`` and records:

- image / pixel AUROC and AUPRO@0.3;
- fit time (only comparable within one run on an otherwise idle machine);
- per epoch: bank images, bank purity and pseudo-label precision / recall
  (reported from the labels, never acted upon).

    python benchmarks/ablation.py CACHE --ratio 0.1 --seeds 0,1,2 --epochs 60 \\
        --variant paper=paper --variant fast=fast --variant "bank_every=paper:bank_every=7" \\
        --out benchmarks/results/ablation-bottle196

Writes OUT.csv (one row per fit), OUT.jsonl (per-epoch records) and OUT.md
(mean ± std over seeds). Re-running skips rows already in OUT.csv. Notes written by hand in
OUT.md below the line NOTES_MARK survive the rewrite of the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from funad import FunAD, cache
from funad.config import preset
from funad.pipelines.features import load_features
from funad.pipelines.fit_data import diagnostics_for, split_cache
from funad.pipelines.scoring import measure, score_tensor

from bench_fit import matmul_flops  # benchmarks/ is on sys.path when run as a script

METRICS = ("image_auroc", "pixel_auroc", "aupro")
NOTES_MARK = "<!-- notes: ablation.py keeps everything below this line when it rewrites the table -->"


def parse_variant(text: str) -> tuple[str, str, dict]:
    """``label=preset[:NAME=V,NAME=V]`` -> (label, preset, overrides)."""
    label, _, rest = text.partition("=")
    name, _, sets = rest.partition(":")
    overrides = {}
    for item in filter(None, sets.split(",")):
        key, _, value = item.partition("=")
        from funad.config import FunADConfig

        overrides[key] = FunADConfig.parse_value(key, value)
    return label, name, overrides


def changed_from_paper(config_json: str) -> str:
    """The settings of a stored variant config that differ from ``preset("paper")``, as ``NAME=V,NAME=V``
    (epochs left out: every variant of one table runs the same), or "" when there are none."""
    config, paper = json.loads(config_json), preset("paper").to_dict()
    return ",".join(f"{k}={v}" for k, v in config.items() if k not in ("seed", "epochs") and v != paper.get(k))


def cpu_name() -> str:
    """The CPU a fit runs on, as precisely as a VM shows it: the model name with its family and model numbers (a VM
    may call several generations "AMD EPYC") and torch's vector capability (AVX2, AVX512)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    family = f", family {info['cpu family']} model {info.get('model', '?')}" if "cpu family" in info else ""
    return f"{name}{family}, {torch.backends.cpu.get_cpu_capability()}"


def machines_line(epochs: list[dict], n_fits: int) -> str:
    """Which CPUs the table's fits ran on, from the per-epoch log (fits logged before it recorded the CPU are
    counted as such), so that rows of several sessions never pass for one machine's."""
    cpus = {(e["variant"], e["seed"]): e["cpu"] for e in epochs if "cpu" in e}
    parts = [f"{cpu} ({n} fit{'s' if n > 1 else ''})" for cpu, n in Counter(cpus.values()).items()]
    if len(cpus) < n_fits:
        parts.append(f"not recorded for {n_fits - len(cpus)} of {n_fits} fits (they ran before ablation.py logged it)")
    return "CPU: " + "; ".join(parts)


def mean_std(values: list[float]) -> str:
    v = np.asarray(values, dtype=float) * 100
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache")
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--overlap", action="store_true")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="override every variant's epochs")
    ap.add_argument("--variant", action="append", required=True, help="label=preset[:NAME=V,NAME=V]")
    ap.add_argument("--out", required=True, help="output path prefix")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, log_path, md_path = out.with_suffix(".csv"), out.with_suffix(".jsonl"), out.with_suffix(".md")
    done = set()
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        done = {(r["variant"], int(r["seed"])) for r in rows}
        budgets = {json.loads(r["config"])["epochs"] for r in rows}
        if args.epochs is not None and budgets - {args.epochs}:
            sys.exit(f"{csv_path} holds fits of {sorted(budgets)} epochs, not {args.epochs}: resuming would skip or "
                     f"mix rows of two budgets; give this budget its own --out")

    device = torch.device("cpu")
    cpu = cpu_name()  # logged with every fit's epochs
    with cache.open(args.cache, mode="r") as store:
        for seed in (int(s) for s in args.seeds.split(",")):
            if all((parse_variant(t)[0], seed) in done for t in args.variant):
                continue  # nothing left to fit for this seed: do not load its features
            split = split_cache(store, args.ratio, args.overlap, seed)
            train_ids = np.asarray(split["train_ids"])
            test_ids = np.asarray(split["test_ids"])
            train = load_features(store, train_ids, device=device)
            test = load_features(store, test_ids, device=device)
            labels = np.asarray(store.labels)[test_ids].astype(np.int64)
            masks = store.read_masks(test_ids)
            diagnostics = diagnostics_for(store, train_ids)
            for text in args.variant:
                label, name, overrides = parse_variant(text)
                if (label, seed) in done:
                    continue
                if args.epochs is not None:
                    overrides["epochs"] = args.epochs
                cfg = preset(name, seed=seed, **overrides)
                records: list[dict] = []
                peak = matmul_flops(device, train.shape[-1]) / 1e9  # fit times are read against this
                start = time.perf_counter()
                model = FunAD(cfg).fit(train, device=device, callback=records.append, diagnostics=diagnostics)
                fit_s = time.perf_counter() - start
                m = measure(score_tensor(model, test, device=device), labels, masks, store.grid).metrics
                row = {"variant": label, "seed": seed, "fit_s": round(fit_s, 1), "epochs": len(records),
                       **{k: m[k] for k in METRICS},
                       "final_bank_images": records[-1]["bank_images"],
                       "final_bank_purity": records[-1].get("bank_purity"),
                       "final_pseudo_recall": records[-1].get("pseudo_recall"),
                       "final_pseudo_precision": records[-1].get("pseudo_precision"),
                       "config": json.dumps({k: v for k, v in cfg.to_dict().items() if k != "seed"})}
                new = not csv_path.is_file()
                with open(csv_path, "a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(row))
                    if new:
                        w.writeheader()
                    w.writerow(row)
                with open(log_path, "a") as f:
                    for r in records:
                        f.write(json.dumps({"variant": label, "seed": seed, "matmul_gflops": round(peak, 1),
                                            "cpu": cpu, **r}) + "\n")
                print(f"{label} seed {seed}: image {m['image_auroc']:.4f} pixel {m['pixel_auroc']:.4f} "
                      f"aupro {m['aupro']:.4f} fit {fit_s:.0f} s bank {records[-1]['bank_images']}", flush=True)

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    changed = {v: changed_from_paper(next(r["config"] for r in rows if r["variant"] == v)) for v in variants}
    # Rows of earlier runs (another --variant list) stay in the CSV; the command names them by their settings.
    given = {parse_variant(t)[0]: t for t in args.variant}
    specs = [given.get(v, f"{v}=paper" + (f":{changed[v]}" if changed[v] else "")) for v in variants]
    epochs = [json.loads(line) for line in open(log_path)] if log_path.is_file() else []
    peaks = {(e["variant"], e["seed"]): e["matmul_gflops"] for e in epochs if "matmul_gflops" in e}
    lines = [f"Command: `python benchmarks/ablation.py {args.cache} --ratio {args.ratio}"
             f"{' --overlap' if args.overlap else ''} --seeds {args.seeds}"
             + (f" --epochs {args.epochs}" if args.epochs else "")
             + "".join(f" --variant '{t}'" for t in specs) + f" --out {args.out}`",
             f"({platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; final epoch, no test labels "
             "inside the fit; mean ± std over seeds; fit time only comparable within one idle run)", "",
             (f"float32 matmul peak just before each fit: {min(peaks.values()):.0f}-{max(peaks.values()):.0f} "
              f"GFLOP/s ({len(peaks)} of {len(rows)} fits; earlier ones did not record it)" if peaks else
              "No fit in this table recorded a matmul peak (they ran before ablation.py measured it), so their "
              "times compare only with each other."), "", machines_line(epochs, len(rows)), "",
             "| variant | settings changed from `paper` | seeds | image AUROC | pixel AUROC | AUPRO@0.3 "
             "| last bank images | bank images over the epochs, mean (min-max) | lowest bank purity "
             "| pseudo recall | pseudo precision | fit s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        bank = [e["bank_images"] for e in epochs if e["variant"] == v]
        purity = [e["bank_purity"] for e in epochs if e["variant"] == v and e.get("bank_purity") is not None]

        def col(key: str, fmt: str = "{:.2f}") -> str:
            vals = [float(r[key]) for r in rs if r[key] not in ("", "None")]
            return fmt.format(np.mean(vals)) if vals else "n/a"

        lines.append(f"| {v} | {changed[v].replace(',', ', ') or 'none'} | {len(rs)} | "
                     + " | ".join(mean_std([float(r[k]) for r in rs]) for k in METRICS)
                     + f" | {col('final_bank_images', '{:.0f}')} "
                     + (f"| {np.mean(bank):.0f} ({min(bank)}-{max(bank)}) " if bank else "| n/a ")
                     + (f"| {min(purity):.2f} " if purity else "| n/a ")
                     + f"| {col('final_pseudo_recall')} | {col('final_pseudo_precision')} | {col('fit_s', '{:.0f}')} |")
    old = md_path.read_text() if md_path.is_file() else ""
    notes = old[old.index(NOTES_MARK):] if NOTES_MARK in old else ""
    md_path.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
