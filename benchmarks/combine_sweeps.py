"""One results table and plot from several ``funad sweep`` folders of the same cache.

Sweeps run at different times (e.g. FUN-AD in one, the baselines in another)
write their own results.csv. This script checks that they come from the same
cache (fingerprint), merges their rows (a later folder's row replaces an
earlier one with the same key) and writes results.md and the AUROC plot with
the sweep's own report code, so the table reads like a single sweep's.

    python benchmarks/combine_sweeps.py OUT_DIR SWEEP_DIR [SWEEP_DIR ...] [--ratios 0,0.1] [--match TEXT ...]

``--ratios`` keeps the rows of those contamination ratios; each ``--match``
keeps the rows whose cell key contains one of the texts (e.g.
``synthetic=off`` or ``knn``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from funad.pipelines.sweep_report import read_results, write_markdown, write_plot


def _options(args: list[str]) -> tuple[list[str], Optional[set], list[str]]:
    """(positional arguments, ratios to keep or None, texts to match)."""
    positional, ratios, matches = [], None, []
    it = iter(args)
    for arg in it:
        if arg == "--ratios":
            ratios = {round(float(r), 6) for r in next(it).split(",")}
        elif arg == "--match":
            matches.append(next(it))
        else:
            positional.append(arg)
    return positional, ratios, matches


def main() -> None:
    args, ratios, matches = _options(sys.argv[1:])
    if len(args) < 2:
        raise SystemExit(__doc__)
    out, dirs = Path(args[0]), [Path(d) for d in args[1:]]
    rows: dict[str, dict] = {}
    for d in dirs:
        for row in read_results(d / "results.csv"):
            if ratios is not None and round(float(row["ratio"]), 6) not in ratios:
                continue
            if matches and not any(m in row["key"] for m in matches):
                continue
            rows[row["key"]] = row
    if not rows:
        raise SystemExit("no row of those sweeps matches --ratios / --match")
    prints = {r["cache_fingerprint"] for r in rows.values()}
    if len(prints) != 1:
        raise SystemExit(f"the sweeps come from {len(prints)} different caches; combine sweeps of one cache only")
    attrs = {}
    for d in dirs:
        if (d / "sweep.json").is_file():
            attrs = json.loads((d / "sweep.json").read_text()).get("attrs", {})
    out.mkdir(parents=True, exist_ok=True)
    merged = list(rows.values())
    write_markdown(out / "results.md", merged, store_attrs=attrs)
    write_plot(out / "auroc_vs_contamination.png", merged)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
