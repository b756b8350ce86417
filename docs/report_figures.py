"""The report page's figures in the README: page size and time to open in headless Chromium, for a page that
exists (e.g. ``outputs/demo/report.html``) and for a synthetic test set of N images (demo-style captions, two
systems, four per-sample metrics, one distinct image file per row: copies of the demo images), and, on the
synthetic page, the time to sort by a column (a mouse click on its header) and to filter.

    python docs/report_figures.py --page outputs/demo/report.html --rows 10000 --work /tmp/report_figures
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from medcap.data.findings import LOCATIONS, caption_for
from medcap.metrics.result import mean_scored
from medcap.report import ReportOptions, System, caption_report
from medcap.report.browser import Chromium

READY = "document.body && document.body.dataset.ready === '1'"
FIRST = "document.querySelector('#rows tbody tr').dataset.id"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def open_page(page: Path, repeats: int = 3) -> dict:
    """Median over ``repeats`` fresh loads: seconds from the navigation to the first rows drawn (the page's own
    ``report-ready`` mark), and the rows drawn then."""
    marks = []
    with Chromium(width=1280, height=900) as browser:
        for _ in range(repeats):
            browser.send("Page.navigate", {"url": "about:blank"})
            browser.open(page, READY)
            marks.append(browser.evaluate("performance.getEntriesByName('report-ready')[0].startTime") / 1000)
        rows = browser.evaluate("document.querySelectorAll('#rows tbody tr').length")
    return {"open_s": float(np.median(marks)), "rows_drawn": rows}


def interactions(page: Path, column: str) -> dict:
    """Seconds for a click on ``column``'s header until the first row changes, and for a filter to apply."""
    with Chromium(width=1280, height=900) as browser:
        browser.open(page, READY)
        before = browser.evaluate(FIRST)
        start = time.perf_counter()
        browser.click(f"#rows th[data-key='{column}'] button")
        browser.wait_for(f"{FIRST} !== {json.dumps(before)}", interval=0.005)
        sort_s = time.perf_counter() - start
        browser.evaluate("window.scrollTo(0, 0)")
        start = time.perf_counter()
        browser.type_text("#filter", "opacity")
        browser.wait_for("document.getElementById('count').textContent.endsWith('match')", interval=0.005)
        filter_s = time.perf_counter() - start - 0.12  # less the page's typing delay
        count = browser.evaluate("document.getElementById('count').textContent")
    return {"sort_click_s": sort_s, "filter_s": filter_s, "filter_count": count}


def synthetic(work: Path, n: int, max_rows: int | None, sources: list[Path]) -> tuple[Path, float]:
    """A page of ``n`` rows; row i's image is a copy of ``sources[i % len(sources)]`` (a distinct file each)."""
    rng = np.random.default_rng(0)
    images = work / "images"
    if not images.is_dir() or len(list(images.iterdir())) != n:
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir(parents=True)
        for i in range(n):
            shutil.copyfile(sources[i % len(sources)], images / f"x{i:05d}.png")
    ids = [f"x{i:05d}" for i in range(n)]
    kinds = ["nodule", "opacity", "none"]

    def caption(k):
        kind = kinds[rng.integers(3)]
        return caption_for("chest_xray", kind, "none" if kind == "none" else LOCATIONS[rng.integers(4)])

    refs = {k: [caption(k)] for k in ids}
    systems = []
    for name in ("a", "b"):
        predictions = {k: caption(k) for k in ids}
        scores = {m: rng.random(n) * scale for m, scale in
                  [("BLEU-4", 1), ("METEOR", 1), ("ROUGE-L", 1), ("CIDEr", 10)]}
        systems.append(System(name, predictions, mean_scored(ids, scores)))
    page = work / f"rows_{n}_{max_rows}" / "report.html"
    start = time.perf_counter()
    caption_report(page, systems, refs, ReportOptions(max_rows=max_rows),
                   {k: [str(images / f"{k}.png")] for k in ids})
    return page, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--page", help="an existing report page to measure")
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--work", default="/tmp/report_figures")
    parser.add_argument("--images", default="datasets/demo/images", help="PNG images the synthetic rows reuse")
    args = parser.parse_args()
    results = {}
    if args.page:
        page = Path(args.page)
        thumbs = page.with_name(f"{page.stem}_thumbs")
        results["page"] = {"path": str(page), "html_bytes": page.stat().st_size, "thumbs_bytes": folder_bytes(thumbs),
                           **open_page(page)}
    for max_rows in (None, 5000):
        page, write_s = synthetic(Path(args.work), args.rows, max_rows, sorted(Path(args.images).glob("*.png")))
        thumbs = page.with_name(f"{page.stem}_thumbs")
        results[f"synthetic_{args.rows}_max_rows_{max_rows}"] = {
            "write_s": write_s, "html_bytes": page.stat().st_size, "thumbs_bytes": folder_bytes(thumbs),
            **open_page(page), **interactions(page, "BLEU-4")}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
