"""Where FUN-AD*'s pseudo-anomalies go: real against synthetic images, from the training logs.

Reads train_log.jsonl and config.json of fits made with and without synthetic
images (``funad fit ... --eval-every N``) and prints, per arm (mean ± std
over the fits), averaged over the last ``--last`` epochs of each fit:
pseudo-label precision and recall on the real images, the same on the
synthetic ones, the share of all pseudo-anomalies that falls on synthetic
images, the bank's purity, and the test AUROC at the final epoch. These use
labels for reporting only; nothing in the fits looks at them.

    python benchmarks/synthetic_labels.py runs/off_s0 runs/off_s1 ... runs/pseudo_s2 [--last 10]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

COLUMNS = (("pseudo_precision_real", "precision, real"), ("pseudo_recall_real", "recall, real"),
           ("pseudo_precision_synthetic", "precision, synthetic"), ("pseudo_recall_synthetic", "recall, synthetic"),
           ("pseudo_share_synthetic", "share on synthetic"), ("n_pseudo_anomalies", "pseudo-anomalies / step"),
           ("bank_images", "bank images"), ("bank_purity", "bank purity"))
# FUN-AD* only: do the synthetic images set the batch's largest distance, and do the real defects lose their
# pseudo-labels in the batches that hold a synthetic image?
MECHANISM = (("batch_max_on_synthetic", "batches with a synthetic image whose largest distance is on one"),
             ("pseudo_recall_real_with_synthetic", "real-defect recall, batch with a synthetic image"),
             ("pseudo_recall_real_without_synthetic", "real-defect recall, batch without"),
             ("dhat_real_defects_with_synthetic", "real defects' mean d̂, batch with a synthetic image"),
             ("dhat_real_defects_without_synthetic", "real defects' mean d̂, batch without"))


def summarise(d: Path, last: int) -> tuple[str, dict]:
    log = [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((d / "config.json").read_text())
    arm = config["config"].get("synthetic", "pseudo") if config["contamination"].get("synthetic_ids") else "off"
    out = {}
    tail = log[-last:]
    for key, _ in COLUMNS + MECHANISM:
        if key in ("pseudo_precision_real", "pseudo_recall_real") and arm == "off":
            values = [r.get(key.rsplit("_", 1)[0]) for r in tail]  # no synthetic image: every patch is real
        else:
            values = [r.get(key) for r in tail]
        values = [v for v in values if v is not None]
        out[key] = float(np.mean(values)) if values else None
    final = [r for r in log if "test_image_auroc" in r]
    if final:
        out["test_image_auroc"] = 100 * final[-1]["test_image_auroc"]
        out["test_pixel_auroc"] = 100 * final[-1]["test_pixel_auroc"]
    return arm, out


def cell(values: list, percent: bool = False) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    scale = 100 if percent else 1
    mean = scale * np.mean(values)
    std = scale * np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}" if not percent else f"{mean:.1f} ± {std:.1f}"


def main() -> None:
    args = sys.argv[1:]
    last = 10
    if "--last" in args:
        i = args.index("--last")
        last = int(args[i + 1])
        del args[i:i + 2]
    if not args:
        raise SystemExit(__doc__)
    arms: dict[str, list] = defaultdict(list)
    for d in map(Path, args):
        arm, row = summarise(d, last)
        arms[arm].append(row)
    print(f"Means over the last {last} epochs of each fit, then mean ± std over the fits "
          f"({', '.join(f'{a}: {len(r)}' for a, r in arms.items())} fits).\n")
    print("| arm | " + " | ".join(name for _, name in COLUMNS) + " | final image / pixel AUROC |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for arm, rows in arms.items():
        cells = [cell([r[k] for r in rows]) for k, _ in COLUMNS]
        auroc = f"{cell([r.get('test_image_auroc') for r in rows])} / {cell([r.get('test_pixel_auroc') for r in rows])}"
        print(f"| {arm} | " + " | ".join(cells) + f" | {auroc} |")
    found = {arm: rows for arm, rows in arms.items() if any(r.get(MECHANISM[0][0]) is not None for r in rows)}
    if found:
        print("\nThe synthetic images' effect on the real defects, in the same epochs (fits whose log has it):\n")
        print("| arm | " + " | ".join(name for _, name in MECHANISM) + " |")
        print("|---" * (len(MECHANISM) + 1) + "|")
        for arm, rows in found.items():
            rows = [r for r in rows if r.get(MECHANISM[0][0]) is not None]
            print(f"| {arm} ({len(rows)} fits) | " + " | ".join(cell([r[k] for r in rows]) for k, _ in MECHANISM) + " |")


if __name__ == "__main__":
    main()
