"""Compare unlabelled pixel-threshold rules on fitted model directories, without refitting.

A pixel threshold is chosen from the anomaly maps of the *unlabelled training
images* that the model's image threshold calls normal (pipelines/thresholds.py);
each rule below takes a different statistic of those images' map maxima:

* ``max``: the highest of them (funad's rule: no training image called normal
  shows a single pixel above it);
* ``q<p>``: their p-quantile (a share 1 - p of the normal-called training images
  would show some pixels above it).

For each rule it prints pixel F1 on the test images' masks at the rule's
threshold, next to pixel F1-max (threshold chosen with the masks), at the
cache's input size (the paper's protocol), and the mean over the model
directories of F1 at the rule / F1-max.

    python benchmarks/pixel_threshold_rules.py runs/curves/bottle_s0 runs/curves/bottle_s1 runs/curves/bottle_s2
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from funad import cache, metrics
from funad import threshold as T
from funad.anomaly_map import patch_scores_to_maps
from funad.pipelines.modeldir import load_model_dir
from funad.pipelines.scoring import MAP_SIGMA, score_cached
from funad.pipelines.thresholds import map_maxima, recorded

RULES = {"max": None, "q0.99": 0.99, "q0.95": 0.95, "q0.9": 0.9, "q0.75": 0.75, "q0.5": 0.5}


def measure_dir(path: Path) -> tuple[str, dict, float]:
    model, info = load_model_dir(path)
    record = recorded(info)
    if not record:
        raise SystemExit(f"{path} records no unlabelled threshold; re-fit it")
    cpu = torch.device("cpu")
    with cache.open(info.cache["path"]) as store:
        train_patches, train_images = score_cached(model, store, info.train_ids, device=cpu, with_images=True)
        test_patches = score_cached(model, store, info.test_ids, device=cpu)
        masks = store.read_masks(info.test_ids)
        grid, size = store.grid, store.mask_size
        name = Path(info.cache["path"]).name
    maxima = map_maxima(train_patches, grid, size, cpu)
    normal = maxima[train_images < record["image"]]
    thresholds = {r: T.pixel_threshold(normal, q) for r, q in RULES.items()}
    maps = np.asarray(patch_scores_to_maps(test_patches, grid, size, sigma=MAP_SIGMA))
    truth = masks.ravel() > 0
    f1 = {r: T.at_threshold(truth, maps.ravel(), t)["f1"] for r, t in thresholds.items()}
    best = metrics.pixel_metrics(masks, maps)["pixel_f1_max"]
    c = info.contamination
    return f"{name}: {'overlap' if c['overlap'] else 'no-overlap'} ratio={c['ratio']:g}", f1, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dirs", nargs="+", type=Path)
    args = ap.parse_args()
    print("Command: `python benchmarks/pixel_threshold_rules.py " + " ".join(map(str, args.model_dirs)) + "`\n")
    print("| setting | model | pixel F1-max (masks) | " + " | ".join(RULES) + " |")
    print("|---|---|---|" + "---|" * len(RULES))
    by_setting: dict = defaultdict(list)
    for path in args.model_dirs:
        setting, f1, best = measure_dir(path)
        by_setting[setting].append((f1, best))
        print(f"| {setting} | {path.name} | {100 * best:.1f} | "
              + " | ".join(f"{100 * f1[r]:.1f} ({f1[r] / best:.2f})" for r in RULES) + " |")
    print("\nMean over model directories of pixel F1 at the rule / mean pixel F1-max:\n")
    print("| setting | n | " + " | ".join(RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    for setting, rows in sorted(by_setting.items()):
        best = np.mean([b for _, b in rows])
        print(f"| {setting} | {len(rows)} | " + " | ".join(f"{np.mean([f[r] for f, _ in rows]) / best:.2f}"
                                                            for r in RULES) + " |")


if __name__ == "__main__":
    main()
