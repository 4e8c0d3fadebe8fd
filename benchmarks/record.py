"""One benchmark run appended to its results file: date, commit and machine beside the figures."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def append_run(path: Path, **entry: Any) -> None:
    """Append ``entry`` with today's date, the commit, the machine and this process's peak RSS."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    previous = json.loads(path.read_text()) if path.is_file() else []
    previous.append({"date": dt.date.today().isoformat(), "commit": commit,
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores", **entry,
                     "bench_peak_rss_mb": resource.getrusage(
                         resource.RUSAGE_SELF).ru_maxrss / 1024})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(previous, indent=2))
