"""The viewer at 10,000 rows: static file size, server-side paging cost, browser load time.

    python bench/viewer_scale.py                       # generates the fixture dataset (40 items, seed 11)
    python bench/viewer_scale.py --dataset DIR --rows 10000 --json bench/results/viewer_scale.json
    python bench/viewer_scale.py --screenshot docs/img/viewer.png   # also the docs' screenshot

Rows are the fixture dataset's ``ranked`` rows replicated (ids made unique) into shards of 1,000,
so no model runs 10,000 times. Prints one line per figure and writes them as JSON with an env block.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1280,1500")


def fixture_dataset(root: Path) -> Path:
    items = root / "items.jsonl"
    subprocess.run(["hscr", "fixture", "items", "--n", "40", "--seed", "11", "--out", str(items),
                    "--images", str(root / "img")], check=True)
    subprocess.run(["hscr", "generate", "--input", str(items), "--output", str(root / "ds")], check=True)
    return root / "ds"


def replicate(dataset: Path, rows: int, out: Path, shard_rows: int = 1000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hscr_client import schema
    from hscr_client.viewer import ViewerDataset

    source = ViewerDataset.open(str(dataset))
    base = []
    for path in source.shards:
        base += pq.read_table(dataset / path).to_pylist()
    (out / "ranked").mkdir(parents=True)
    arrow_schema = schema.features("ranked").arrow_schema
    for shard, start in enumerate(range(0, rows, shard_rows)):
        stop = min(rows, start + shard_rows)
        batch = [dict(base[k % len(base)], custom_id=f"big-{k:05d}") for k in range(start, stop)]
        pq.write_table(pa.Table.from_pylist(batch, schema=arrow_schema), out / "ranked" / f"part-{shard:05d}.parquet",
                       compression="zstd")


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def browser_figures(page: Path, screenshot_of: Path | None, screenshot: Path | None) -> dict:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        print("chromium/chromedriver not installed: browser figures skipped", file=sys.stderr)
        return {}
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    figures = {}
    try:
        def ready(d, after=0):
            body = d.find_element(By.TAG_NAME, "body")
            return body.get_attribute("data-state") == "ready" and int(body.get_attribute("data-render") or 0) > after

        start = time.perf_counter()
        driver.get(page.as_uri())
        WebDriverWait(driver, 300).until(ready)
        figures["browser_first_page_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        driver.find_element(By.ID, "q").send_keys("big-04321\n")
        WebDriverWait(driver, 300).until(lambda d: ready(d, 1))
        figures["browser_search_all_rows_s"] = round(time.perf_counter() - start, 3)
        heap = driver.execute_script("return performance.memory ? performance.memory.usedJSHeapSize : null")
        figures["browser_js_heap_mb_after_search"] = round(heap / 1e6, 1) if heap else None
        if screenshot_of and screenshot:
            driver.get("about:blank")
            driver.get(screenshot_of.as_uri() + "#size=10")
            WebDriverWait(driver, 60).until(ready)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot))
            print(f"screenshot: {screenshot}")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="a generated dataset directory [default: generate the fixture]")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--thumb", type=int, default=128)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--screenshot", type=Path, help="write a screenshot of the fixture dataset's page here")
    args = parser.parse_args()

    from hscr_client.viewer import DatasetCache, Filters, script_json, write_static_file

    work = Path(tempfile.mkdtemp(prefix="viewer-scale-"))
    try:
        dataset = args.dataset or fixture_dataset(work)
        large = work / "large"
        replicate(dataset, args.rows, large)

        page = work / "large.html"
        start = time.perf_counter()
        stats = write_static_file(str(large), page, thumb_side=args.thumb)
        write_s = time.perf_counter() - start
        cache = DatasetCache()
        open_s, viewer = timed(lambda: DatasetCache().get(str(large)), repeat=1)
        cache.get(str(large))
        text_bytes = sum(len(script_json(viewer.rows[k:k + 100]).encode()) for k in range(0, len(viewer.rows), 100))
        figures = {
            "rows": stats.rows,
            "static_html_mb": round(stats.bytes / 1e6, 2),
            "static_bytes_per_row": round(stats.bytes / stats.rows),
            "static_text_json_mb": round(text_bytes / 1e6, 2),
            "static_write_s": round(write_s, 2),
            "api_open_dataset_s": round(open_s, 3),
            "api_cached_get_s": round(timed(lambda: cache.get(str(large)))[0], 4),
            "api_page_first_s": round(timed(lambda: viewer.page(Filters(), offset=0, limit=25))[0], 4),
            "api_page_last_s": round(timed(lambda: viewer.page(Filters(), offset=args.rows - 25, limit=25))[0], 4),
            "api_page_search_s": round(timed(lambda: viewer.page(Filters(q="big-04321"), limit=25))[0], 4),
            "api_page_json_kb": round(len(json.dumps(viewer.page(Filters(), limit=25))) / 1e3, 1),
        }
        screenshot_page = None
        if args.screenshot:
            screenshot_page = work / "fixture.html"
            write_static_file(str(dataset), screenshot_page, title="HSCR fixture dataset (40 items, seed 11)")
        figures.update(browser_figures(page, screenshot_page, args.screenshot))
        for name, value in figures.items():
            print(f"{name}: {value}")
        if args.json:
            sys.path.insert(0, str(REPO_ROOT / "bench"))
            import torch
            from common import env_block, write_json

            write_json(args.json, {"env": env_block(torch.device("cpu")), "figures": figures})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
