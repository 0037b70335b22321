"""Every benchmark section in one go: `make bench` (= `python -m bench.all`).

Runs, one after another on this machine, each as its own process (so one failing section is
reported and the others still run):
  hit   bench/hit_path.py      bare Starlette vs Strata L1/L2/L3 hits vs LiteLLM's cache hits,
                               concurrency 1/16/64 (wrk + Lua, server and wrk pinned apart)
  miss  bench/miss_overhead.py a fake engine with a fixed delay, direct vs Strata vs LiteLLM,
                               concurrency 1/32
  e2e   bench/end_to_end.py    the realistic workload on vLLM CPU, directly vs through Strata
Then merges their JSON records into bench/results/latest.json (a section not run keeps its last
record), rewrites the generated part of docs/benchmarks.md from it and draws docs/bench-*.png.

    .venv/bin/python -m bench.all                      # everything (~20 minutes on 2 CPUs)
    .venv/bin/python -m bench.all --sections hit,miss  # some sections
    .venv/bin/python -m bench.all --quick              # short cells: a smoke test, not a record
    .venv/bin/python -m bench.all --render-only        # the document again, from the results
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.hit_path import cpu_model

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("hit", "miss", "e2e")
RESULTS = ROOT / "bench" / "results" / "latest.json"
DOC = ROOT / "docs" / "benchmarks.md"
PLOT_DIR = ROOT / "docs"
RUNS = ROOT / ".bench" / "results"

FULL = {
    "hit": ["--duration", "5", "--warmup", "2", "--rounds", "3"],
    "miss": ["--duration", "8", "--rounds", "2"],
    "e2e": ["--requests", "400", "--concurrency", "16"],
}
QUICK = {
    "hit": ["--duration", "2", "--warmup", "1", "--rounds", "1"],
    "miss": ["--duration", "3", "--rounds", "1"],
    "e2e": ["--requests", "80", "--concurrency", "16"],
}
MODULES = {"hit": "bench.hit_path", "miss": "bench.miss_overhead", "e2e": "bench.end_to_end"}


def log(message: str) -> None:
    print(f"[bench.all] {message}", file=sys.stderr, flush=True)


def loadavg() -> list[str]:
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return []


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def commit() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    # A run from an exported tree (no .git) names its commit in STRATA_BENCH_COMMIT.
    if exported := os.environ.get("STRATA_BENCH_COMMIT"):
        return exported
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+local changes" if git("status", "--porcelain") else "")


def run_section(name: str, extra: list[str], out: Path) -> dict[str, Any] | None:
    import json  # noqa: PLC0415

    cmd = [sys.executable, "-m", MODULES[name], *extra, "--json-out", str(out)]
    log(f"section {name}: {shlex.join(cmd)}")
    started = time.monotonic()
    out.unlink(missing_ok=True)
    result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
    elapsed = time.monotonic() - started
    if result.returncode != 0 or not out.exists():
        log(f"section {name} FAILED (exit {result.returncode}) after {elapsed:.0f} s")
        return None
    record: dict[str, Any] = json.loads(out.read_text())
    record["section_elapsed_s"] = round(elapsed, 1)
    record["recorded_at"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    record["section_command"] = shlex.join(["python", "-m", MODULES[name], *extra])
    log(f"section {name} done in {elapsed:.0f} s")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="short cells (a smoke test)")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--no-write", action="store_true", help="run and print, leave the document alone"
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: rewrite the document and plots from the stored results",
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.render_only:
        merged = report.merge_results(args.results, {})
        report.replace_generated(args.doc, report.render(merged))
        report.plot_all(merged["sections"], PLOT_DIR)
        log(f"rewrote {args.doc} and its plots from {args.results}")
        return 0
    started = time.monotonic()
    machine = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": loadavg(),
    }
    options = QUICK if args.quick else FULL
    fresh: dict[str, Any] = {}
    failed = []
    RUNS.mkdir(parents=True, exist_ok=True)
    for name in sections:
        record = run_section(name, options[name], RUNS / f"{name}.json")
        if record is None:
            failed.append(name)
        else:
            fresh[name] = record
    machine["loadavg_at_end"] = loadavg()
    elapsed = time.monotonic() - started
    command = "make bench" + (" QUICK=1" if args.quick else "")
    if sections != list(SECTIONS):
        command += f" SECTIONS={','.join(sections)}"
    log(f"all done in {elapsed / 60:.1f} min" + (f"; FAILED: {failed}" if failed else ""))
    if args.no_write or args.quick or not fresh:
        if args.quick:
            log("--quick: the document is left alone (short cells are not a record)")
        return 1 if failed else 0
    header = {
        "run": {
            "command": f"{command}   # = .venv/bin/python -m bench.all"
            + (f" --sections {','.join(sections)}" if sections != list(SECTIONS) else ""),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit(),
            "elapsed_min": round(elapsed / 60, 1),
            "sections": sections,
        },
        "machine": machine,
    }
    if sections != list(SECTIONS):
        header = {}  # a partial run keeps the last full run's header
    merged = report.merge_results(args.results, {**header, "sections": fresh})
    report.replace_generated(args.doc, report.render(merged))
    for path in report.plot_all(merged["sections"], PLOT_DIR):
        log(f"wrote {path.relative_to(ROOT)}")
    log(f"wrote {args.doc} and {args.results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
