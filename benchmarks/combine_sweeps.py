"""One results table and plot from several ``funad sweep`` folders of the same cache.

Sweeps run at different times (e.g. FUN-AD in one, the baselines in another)
write their own results.csv. This script checks that they come from the same
cache (fingerprint), merges their rows (a later folder's row replaces an
earlier one with the same key) and writes results.md and the AUROC plot with
the sweep's own report code, so the table reads like a single sweep's.

    python benchmarks/combine_sweeps.py OUT_DIR SWEEP_DIR [SWEEP_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from funad.pipelines.sweep_report import read_results, write_markdown, write_plot


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out, dirs = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
    rows: dict[str, dict] = {}
    for d in dirs:
        for row in read_results(d / "results.csv"):
            rows[row["key"]] = row
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
