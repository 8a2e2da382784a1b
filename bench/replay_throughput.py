"""Replay throughput against a fast trivial service, at concurrency 1, 8 and 64.

Runs `qtrace replay` (the CLI, as users do) with primary and candidate on
bench/replay_target.py, reporting off, and prints queries/s per concurrency side by side."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
QTRACE = str(Path(sys.executable).parent / "qtrace")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 64])
    a = ap.parse_args()
    target = subprocess.Popen(
        [sys.executable, str(HERE / "replay_target.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert target.stdout is not None
    url = f"http://127.0.0.1:{int(target.stdout.readline())}"
    try:
        with tempfile.TemporaryDirectory() as d:
            log = Path(d) / "q.txt"
            log.write_text("".join(f"query {i}\n" for i in range(a.queries)))
            print(f"{'concurrency':>11} {'queries':>8} {'q/s':>8}")
            for c in a.concurrency:
                r = subprocess.run(
                    [QTRACE, "replay", "--no-report", "--format", "json", "--queries", str(log),
                     "--template", "GET /s?q={query}", "--primary", url, "--candidate", url,
                     "--concurrency", str(c)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                s = json.loads(r.stdout)
                print(f"{c:>11} {s['queries']:>8} {s['queries'] / s['elapsed_s']:>8.0f}")
    finally:
        target.terminate()
        target.wait()


if __name__ == "__main__":
    main()
