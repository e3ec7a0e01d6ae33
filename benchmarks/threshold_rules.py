"""Compare unlabelled threshold rules (funad.threshold) and their parameters on finished fits, without refitting.

Inputs are sweep folders (``funad sweep`` keeps each cell's training and test
image scores in ``cells/<key>.json``) and/or model directories (their
training and test images are scored from the cache they record). For every
fit and every rule variant it prints image F1 at the rule's threshold, chosen
from the *unlabelled training scores*, next to F1-max (threshold chosen with
the test labels), and the mean over seeds of F1 / F1-max per setting.

    python benchmarks/threshold_rules.py bench_out/sweep_bottle bench_out/sweep_ksdd
    python benchmarks/threshold_rules.py --model-dir runs/bottle_s0 --model-dir runs/ksdd_s0
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from funad import metrics
from funad import threshold as T

VARIANTS = [("mad", {"mad_k": k}) for k in (2.0, 2.5, 3.0)] + \
           [("quantile", {"expected_contamination": c}) for c in (0.05, 0.1, 0.15)] + [("otsu", {})]


def _label(name: str, params: dict) -> str:
    return name + "".join(f" {k.split('_')[-1]}={v:g}" for k, v in params.items())


def from_sweep(folder: Path):
    for f in sorted((folder / "cells").glob("*.json")):
        d = json.loads(f.read_text())
        key = f.stem
        setting = f"{folder.name} {key.split('_')[0]}: " + ("overlap" if "_overlap_" in key else "no-overlap") + \
                  " " + next((p for p in key.split("_") if p.startswith("ratio=")), "")
        yield setting, key, d["threshold"]["params"]["scale"], np.array(d["threshold"]["training_scores"]["image_scores"]), \
            np.array(d["test_labels"]), np.array(d["test_image_scores"])


def from_model_dir(path: Path):
    import torch

    from funad import cache
    from funad.pipelines.modeldir import load_model_dir
    from funad.pipelines.scoring import score_cached
    from funad.pipelines.thresholds import rule_for

    model, info = load_model_dir(path)
    cpu = torch.device("cpu")
    with cache.open(info.cache["path"]) as store:
        _, train = score_cached(model, store, info.train_ids, device=cpu, with_images=True)
        _, test = score_cached(model, store, info.test_ids, device=cpu, with_images=True)
        labels = np.asarray(store.labels)[info.test_ids]
    c = info.contamination
    setting = f"{Path(info.cache['path']).name}: {'overlap' if c['overlap'] else 'no-overlap'} ratio={c['ratio']:g}"
    yield setting, path.name, rule_for(info.method).scale, train, labels, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="*", type=Path)
    ap.add_argument("--model-dir", action="append", type=Path, default=[])
    args = ap.parse_args()
    fits = [f for s in args.sweeps for f in from_sweep(s)] + [f for m in args.model_dir for f in from_model_dir(m)]
    if not fits:
        raise SystemExit("no finished fits found (sweep folders need cells/*.json)")
    names = [_label(n, p) for n, p in VARIANTS]
    print("| setting | fit | F1-max (test labels) | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    shares: dict = defaultdict(lambda: defaultdict(list))
    for setting, key, scale, train, labels, test in fits:
        best = metrics.image_metrics(labels, test)["image_f1_max"]
        cells = []
        for (name, params), label in zip(VARIANTS, names):
            t = T.ThresholdRule(name, scale=scale, **params).threshold(train)
            f1 = T.at_threshold(labels, test, t)["f1"]
            shares[setting][label].append((f1, best))
            cells.append(f"{100 * f1:.1f} ({f1 / best:.2f})")
        print(f"| {setting} | {key[:40]} | {100 * best:.1f} | " + " | ".join(cells) + " |")
    print("\nMean over fits of F1 at the rule / mean F1-max (target >= 0.9):\n")
    print("| setting | n fits | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for setting, by_rule in sorted(shares.items()):
        row = []
        for label in names:
            f1s, bests = zip(*by_rule[label])
            row.append(f"{np.mean(f1s) / np.mean(bests):.2f}")
        print(f"| {setting} | {len(by_rule[names[0]])} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
