"""How long the DAG processor takes to parse each DAG file, in seconds.

Each file is parsed in a fresh interpreter, as the DAG processor does, after Airflow's
Task SDK is imported (the processor has it loaded already). Also printed: the cold
figure, Airflow's import included. Target: well under a second per file.

    .venv/bin/python bench/dag_parse.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, runpy, sys, time
started = time.perf_counter()
import airflow.sdk
sdk = time.perf_counter() - started
started = time.perf_counter()
runpy.run_path(sys.argv[1])
print(json.dumps({"sdk": sdk, "file": time.perf_counter() - started}))
"""


def parse_times(path: Path, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True,
                             text=True, check=True, cwd=REPO_ROOT).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "file_s": statistics.median(r["file"] for r in runs),
        "with_sdk_import_s": statistics.median(r["sdk"] + r["file"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    figures = {}
    for path in sorted((REPO_ROOT / "dags").glob("*.py")):
        times = figures[path.name] = parse_times(path, args.repeat)
        print(f"{path.name:24s} parse {times['file_s']:.3f} s"
              f"   (cold, with airflow.sdk import: {times['with_sdk_import_s']:.3f} s)"
              f"   median of {args.repeat}")
    print(json.dumps({"bench": "dag_parse", "target_s": 1.0, "files": figures}))


if __name__ == "__main__":
    main()
