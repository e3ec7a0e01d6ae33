"""End-to-end ``funad predict`` throughput against the backbone's forward-only throughput.

Builds two small model directories through the library (extract a few MVTec
AD bottle training images with the offline stand-in backbone; fit a FUN-AD
model for one epoch, whose Local-Net costs what a fully trained one costs, and
a kNN model), then, in the same run and with the same backbone, batch size and
precision:

1. **predict**: ``funad.pipelines.predict.predict`` on real image files
   (decode + resize/crop in a DataLoader worker, backbone, scoring), heatmaps
   off; its own images/s figure (the timed loop; the backbone is loaded before);
2. **forward only**: the backbone's forward pass on the same images already
   decoded, normalised and in memory;
3. **predict with PNG heatmaps** (``--heatmaps png``, the default): the same
   images, heatmaps rendered with PIL in predict's writer thread, interleaved
   with the heatmap-free runs.

The ratio predict / forward-only shows what the deployment path costs beyond
the backbone (target >= 0.9); the ratio predict with PNGs / predict without
shows what the heatmaps cost (target >= 0.7, issue 9). Prints markdown.

    python benchmarks/bench_predict.py                    # 24 images, batch 8, fp32, 2 rounds
    python benchmarks/bench_predict.py --images 64 --device cuda --backbone-precision fp16
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from funad.pipelines.backbone import BackboneSpec, image_transform, load_backbone
from funad.pipelines.extract import extract
from funad.pipelines.fit import FitSpec, fit
from funad.pipelines.predict import predict

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data" / "mvtec_ad" / "bottle"
WEIGHTS = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_only(bb, images: list[Path], batch_size: int, device: torch.device) -> float:
    """images/s of ``bb`` on pre-decoded, pre-cropped inputs held on the device (one warm-up batch first)."""
    tf = image_transform(bb)
    crops = []
    for p in images:
        with Image.open(p) as im:
            crops.append(torch.from_numpy(tf.crop(im).transpose(2, 0, 1).copy()))
    x = bb.normalize(torch.stack(crops))
    bb(x[:batch_size])  # warm-up
    sync(device)
    start = time.perf_counter()
    for s in range(0, len(x), batch_size):
        bb(x[s:s + batch_size])
    sync(device)
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24, help="test images to predict (MVTec AD bottle test set)")
    ap.add_argument("--train", type=int, default=8, help="training images extracted for the kNN model")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--backbone-precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--workers", type=int, default=None, help="predict's decode workers (default: its own)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved forward/predict rounds; best of each kept")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not (DATA.is_dir() and WEIGHTS.is_file()):
        raise SystemExit(f"needs {DATA} and {WEIGHTS}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    tests = sorted(DATA.glob("test/*/*.png"))
    rng = np.random.default_rng(0)
    tests = [tests[i] for i in sorted(rng.choice(len(tests), size=min(args.images, len(tests)), replace=False))]
    spec = BackboneSpec(name="vit_small_patch14_dinov2", weights=str(WEIGHTS), layer=7, image_size=392)

    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        tmp = Path(tmp)
        (tmp / "train").mkdir()
        for p in sorted(DATA.glob("train/good/*.png"))[: args.train]:
            shutil.copy(p, tmp / "train" / p.name)
        t0 = time.perf_counter()
        extract(tmp / "train", tmp / "train.zarr", dataset="folder", backbone=spec, device=str(device),
                batch_size=args.batch_size, precision=args.backbone_precision)
        fit(tmp / "train.zarr", tmp / "funad", FitSpec(method="funad", epochs=1, overrides=(("batch_size", 4),)),
            device=str(device))
        fit(tmp / "train.zarr", tmp / "knn", FitSpec(method="knn"), device=str(device))
        setup_s = time.perf_counter() - t0

        def run(model: str, images: list[Path], out: str, heatmaps: str = "none"):
            return predict(tmp / model, images, tmp / out, device=str(device), batch_size=args.batch_size,
                           workers=args.workers, heatmaps=heatmaps)

        run("funad", tests[: args.batch_size], "warm")  # warm-up: thread pools, allocator
        bb = load_backbone(spec, device, precision=args.backbone_precision)
        fwds, e2es, pngs = [], [], []
        for r in range(args.rounds):  # interleaved, so all three see the same background load
            fwds.append(forward_only(bb, tests, args.batch_size, device))
            e2es.append(run("funad", tests, f"out_funad_{r}").throughput["images_per_s"])
            pics = run("funad", tests, f"pics_{r}", heatmaps="png")
            pngs.append(pics.throughput["images_per_s"])
        knn = run("knn", tests, "out_knn")
        png_files = [tmp / f"pics_{args.rounds - 1}" / r["heatmap"] for r in pics.records if r.get("heatmap")]
        png_kb = np.mean([p.stat().st_size for p in png_files]) / 1e3 if png_files else float("nan")
        fwd, e2e, png = max(fwds), max(e2es), max(pngs)

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print("# funad predict: end-to-end throughput vs the backbone's forward pass\n")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, GPU: {gpu}; device used: {device}")
    print(f"- backbone: vit_small_patch14_dinov2 (offline stand-in weights), block 7, 392 px (28x28 grid), "
          f"{args.backbone_precision} autocast, batch {args.batch_size}; "
          f"decode workers {knn.throughput['workers']}")
    print(f"- models: FUN-AD (Local-Net, 1 epoch) and kNN (bank of all {args.train * bb.n_patches} training patches) on "
          f"{args.train} extracted MVTec AD bottle training images (setup {setup_s:.0f} s, not timed); "
          f"{len(tests)} bottle test images predicted from their PNG files")
    print(f"- CPU shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end): absolute numbers are "
          f"noisy; forward-only and FUN-AD predict ran interleaved, {args.rounds} rounds, best of each kept "
          f"(all rounds: forward {', '.join(f'{v:.2f}' for v in fwds)}; predict {', '.join(f'{v:.2f}' for v in e2es)}; "
          f"predict with PNGs {', '.join(f'{v:.2f}' for v in pngs)})\n")
    print("| path | images/s |")
    print("|---|---|")
    kps = knn.throughput["images_per_s"]
    print(f"| backbone forward only (decoded inputs in memory) | {fwd:.2f} |")
    print(f"| predict FUN-AD end to end (files -> scores, heatmaps off) | {e2e:.2f} |")
    print(f"| **ratio FUN-AD predict / forward** (target >= 0.9) | **{e2e / fwd:.2f}** |")
    print(f"| predict kNN end to end | {kps:.2f} |")
    print(f"| ratio kNN predict / forward | {kps / fwd:.2f} |")
    print(f"| predict FUN-AD end to end with PNG heatmaps (--heatmaps png) | {png:.2f} |")
    print(f"| **ratio with PNGs / without** (target >= 0.7) | **{png / e2e:.2f}** |")
    print(f"| mean PNG size | {png_kb:.0f} KB |")


if __name__ == "__main__":
    main()
