"""How long an ``hscr`` call takes before it does anything: the command group's start-up cost.

Each command runs as a fresh process (the installed ``hscr`` console script), round-robin with two
references, so that drift on a shared machine hits them all alike:

- ``python -c pass``: the interpreter alone;
- ``python -c "from hscr_trainer.hscr_config import HSCRConfig"`` (torch, transformers and peft): what every
  ``hscr`` call paid while the command group imported the trainer's config module (issue #16 item 9).

    python bench/cli_startup.py [--repeats 5] [--out results.json]

Prints one line per command: the median wall seconds, the ratio to the heavy import (below 1 means the
call no longer pays for torch) and to the bare interpreter. ``jobs list`` is pointed at a
loopback server that answers 404 (not retried), so it ends (exit 1) after one real request: the cost of
a ``jobs`` call minus the service's work. The test that these commands import no torch, transformers or peft is
``tests/test_cli_imports.py``; this script only measures.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HEAVY_IMPORT = "from hscr_trainer.hscr_config import HSCRConfig"  # torch, transformers and peft
HEAVY_LABEL = "import hscr_trainer.hscr_config"


class _NotFound(BaseHTTPRequestHandler):
    """Answers every request 404 at once: an error the SDK does not retry, so `jobs list` ends after one
    round trip on loopback."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b'{"error": {"message": "no such route", "type": "not_found"}}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def start_not_found_server() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def hscr_command() -> list[str]:
    """The console script beside this interpreter (the README's venv), else the same entry point via -c."""
    script = Path(sys.executable).parent / "hscr"
    if script.exists():
        return [str(script)]
    found = shutil.which("hscr")
    return [found] if found else [sys.executable, "-c", "from hscr_client._cli import main; main()"]


def commands(base_url: str) -> dict[str, tuple[list[str], int]]:
    """name -> (argv, expected exit status)."""
    hscr = hscr_command()
    return {
        "python -c pass": ([sys.executable, "-c", "pass"], 0),
        HEAVY_LABEL: ([sys.executable, "-c", HEAVY_IMPORT], 0),
        "hscr --help": ([*hscr, "--help"], 0),
        "hscr jobs --help": ([*hscr, "jobs", "--help"], 0),
        "hscr jobs list (404)": ([*hscr, "jobs", "list", "--base-url", base_url], 1),
        "hscr serve --help": ([*hscr, "serve", "--help"], 0),
    }


def time_once(argv: list[str], expected_status: int) -> float:
    began = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    seconds = time.perf_counter() - began
    if result.returncode != expected_status:
        raise SystemExit(f"{argv} exited {result.returncode}, expected {expected_status}:\n{result.stderr[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (medians are reported)")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first run of each command")
    args = parser.parse_args(argv)

    server = start_not_found_server()
    runs = commands(f"http://127.0.0.1:{server.server_address[1]}")
    if not args.no_warmup:
        for argv_, status in runs.values():  # warm the page cache once, untimed
            time_once(argv_, status)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (argv_, status) in runs.items():
            seconds[name].append(time_once(argv_, status))

    medians = {name: statistics.median(values) for name, values in seconds.items()}
    bare = medians["python -c pass"]
    heavy = medians[HEAVY_LABEL]
    print(f"{'command':<32} {'median s':>9} {'/ heavy import':>15} {'/ bare python':>14}")
    for name, median in medians.items():
        print(f"{name:<32} {median:>9.2f} {median / heavy:>14.2f}x {median / bare:>13.1f}x")
    if args.out:
        report = {
            "benchmark": "cli_startup",
            "env": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "python": platform.python_version(), "platform": platform.platform()},
            "repeats": args.repeats,
            "seconds": seconds,
            "median_seconds": medians,
            "ratio_to_heavy_import": {name: median / heavy for name, median in medians.items()},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
