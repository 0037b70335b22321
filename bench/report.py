"""docs/benchmarks.md's generated part and the PNG plots, from the benchmarks' JSON records.

Guarantees: the generated part of the document lies between two marker lines and is rebuilt whole
from `bench/results/latest.json` (the last record of every section, merged), so the document is
always a pure function of that file; everything outside the markers is left as it is (appended
after the first heading when the markers are missing). Plots are written with matplotlib's Agg
backend, one PNG per section, next to the document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import end_to_end, hit_path, miss_overhead

BEGIN = (
    "<!-- bench:begin - written by `make bench` (bench/all.py); edits inside are overwritten -->"
)
END = "<!-- bench:end -->"
PLOTS = {
    "hit": "bench-hit-path.png",
    "miss": "bench-miss-overhead.png",
    "e2e": "bench-end-to-end.png",
}


def merge_results(path: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """The stored record with the sections just run replaced; written back."""
    stored: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    sections = {**stored.get("sections", {}), **fresh.get("sections", {})}
    merged = {**stored, **{k: v for k, v in fresh.items() if k != "sections"}}
    merged["sections"] = sections
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def replace_generated(document: Path, body: str) -> None:
    text = document.read_text() if document.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        lines = text.split("\n")
        cut = next((i + 1 for i, line in enumerate(lines) if line.startswith("# ")), 0)
        # After the title and the paragraph that follows it.
        while cut < len(lines) and lines[cut].strip():
            cut += 1
        while cut < len(lines) and not lines[cut].strip():
            cut += 1
        while cut < len(lines) and lines[cut].strip():
            cut += 1
        text = "\n".join([*lines[:cut], "", block, "", *lines[cut:]])
    document.write_text(text)


# --------------------------------------------------------------------------- markdown


def render(record: dict[str, Any]) -> str:
    sections = record.get("sections", {})
    run = record.get("run", {})
    machine = record.get("machine", {})
    lines = [
        "## Side by side: `make bench`",
        "",
        "One command runs every section below in one go on one machine and rewrites this part of"
        " the document and its plots:",
        "",
        "```bash",
        f"{run.get('command', 'make bench')}",
        "```",
        "",
        f"- last full run: {run.get('date', '?')} at commit {run.get('commit', '?')};"
        f" `make bench` took {run.get('elapsed_min', '?')} min"
        + (f" (sections run: {', '.join(run.get('sections', []))})" if run.get("sections") else ""),
        f"- machine: {machine.get('nproc', '?')} vCPUs ({machine.get('cpu_model', '?')}),"
        f" {machine.get('memory_gib', '?')} GiB, Linux {machine.get('kernel', '?')},"
        f" Python {machine.get('python', '?')}; load average at the start"
        f" {' '.join(machine.get('loadavg_at_start', []))}, at the end"
        f" {' '.join(machine.get('loadavg_at_end', []))} (the machine is shared: other jobs"
        " run beside the benchmark, hence the CPU-share and req/CPU-s columns)",
        "- single sections: `make bench SECTIONS=hit` (or `miss`, `e2e`, comma-separated);"
        " `make bench QUICK=1` for short cells (a smoke test, not for the record)",
        "",
        *render_targets(sections),
        "",
    ]
    if "hit" in sections:
        lines += [
            "### 1. Hit path: bare Starlette vs Strata L1 / L2 / L3 vs LiteLLM's cache hits",
            "",
            f"![hit-path requests per second]({PLOTS['hit']})",
            "",
            provenance(sections["hit"]),
            hit_path.render_markdown(
                sections["hit"], sections["hit"]["machine"], _hit_config(sections["hit"])
            ).split("\n", 2)[2],
        ]
    if "miss" in sections:
        lines += [
            "### 2. Miss overhead: a fake engine with a fixed delay, direct vs through a gateway",
            "",
            f"![miss overhead]({PLOTS['miss']})",
            "",
            provenance(sections["miss"]),
            miss_overhead.render_markdown(sections["miss"]),
        ]
    lines += ["### 3. Peers", "", *render_peers(sections), ""]
    if "e2e" in sections:
        lines += [
            "### 4. End to end: a realistic workload on vLLM CPU, directly and through Strata",
            "",
            f"![end to end]({PLOTS['e2e']})",
            "",
            provenance(sections["e2e"]),
            end_to_end.render_markdown(sections["e2e"]),
        ]
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def provenance(record: dict[str, Any]) -> str:
    """Which run recorded a section: a partial `make bench SECTIONS=...` may be newer."""
    when = record.get("recorded_at", "in the `make bench` run above")
    return (
        f"_Recorded {when} by `{record.get('section_command', '?')}`"
        f" ({record.get('section_elapsed_s', 0):.0f} s)._\n"
    )


def _hit_config(record: dict[str, Any]) -> hit_path.Config:
    cfg = record["config"]
    return hit_path.Config(
        duration=cfg["duration_s"], warmup=cfg["warmup_s"], rounds=cfg["rounds"],
        stat=cfg["stat"], redis_url=record["redis"]["url"],
        server_cpu=cfg.get("server_cpu", 0), client_cpu=cfg.get("client_cpu", 1),
        gateway_cmd=cfg["gateway_cmd"], wrk="wrk", out=None, check=False,
        private_redis=record["redis"]["private"],
    )  # fmt: skip


def render_targets(sections: dict[str, Any]) -> list[str]:
    """Issue 8's three acceptance targets, from the sections that decide them."""
    lines = ["**Targets (issue 8)**", ""]
    hit = sections.get("hit", {}).get("targets", {}).get("l1_over_litellm_rps_c16")
    if hit:
        l1 = sections["hit"]["results"]["l1"]["c16"]["rps"]
        peer = sections["hit"]["results"]["litellm"]["c16"]["rps"]
        lines.append(
            f"- Strata L1 hit RPS >= 50x LiteLLM's cache-hit RPS at c=16: {l1:,.0f} vs"
            f" {peer:,.1f} req/s = **{hit['value']:.0f}x**: {hit_path.verdict(hit['pass'])}"
        )
    else:
        lines.append("- Strata L1 hit RPS >= 50x LiteLLM's at c=16: not measured in this record")
    miss = sections.get("miss", {}).get("targets", {})
    if miss:
        parts = [
            f"c={name.rsplit('_c', 1)[1]}: {t['value']:+.2f} ms vs {t['litellm']:+.2f} ms"
            for name, t in miss.items()
        ]
        ok = all(t["pass"] for t in miss.values())
        lines.append(
            f"- Strata's miss overhead p50 below LiteLLM's: {'; '.join(parts)}:"
            f" {hit_path.verdict(ok)}"
        )
    else:
        lines.append("- miss overhead p50 below LiteLLM's: not measured in this record")
    e2e = sections.get("e2e", {}).get("ratios", {})
    if e2e:
        runs = sections["e2e"]["runs"]
        parts = []
        for mode, ratio in e2e.items():
            share = runs[mode]["shares"]
            parts.append(
                f"{mode} **{ratio:.2f}x** (served by L1 {100 * share['l1']:.1f}%, L2"
                f" {100 * share['l2']:.1f}%, L3 {100 * share['l3']:.1f}%, coalesced"
                f" {100 * share['coalesced']:.1f}%, engine {100 * share['engine']:.1f}%):"
                f" {hit_path.verdict(ratio >= end_to_end.GOODPUT_RATIO_MIN)}"
            )
        lines.append("- goodput through Strata >= 3x direct vLLM CPU: " + "; ".join(parts))
    else:
        lines.append("- goodput through Strata >= 3x direct vLLM CPU: not measured in this record")
    return lines


def render_peers(sections: dict[str, Any]) -> list[str]:
    lines = []
    peers: dict[str, Any] = {}
    for name in ("hit", "miss"):
        peers.update(sections.get(name, {}).get("peers", {}))
    info = peers.get("litellm")
    if info and "version" in info:
        lines.append(
            f"- **LiteLLM {info['version']}** (`{info['spec']}`, installed by the benchmark into"
            " `.bench/litellm-venv`): its proxy (`litellm --config ... --num_workers 1`, uvicorn +"
            " uvloop as it chooses, no master key, logs at ERROR) with `cache: true` and"
            " `cache_params: {type: redis}` on the same Redis, in front of the same fake engine,"
            " pinned to the same CPU and driven by the same wrk script. A hit is a response with"
            " LiteLLM's `x-litellm-cache-key` header (set only when it answered from its cache);"
            " the fake engine's call counter must not move while hits are measured. Its rows are"
            " `litellm` in tables 1 and 2."
        )
    elif info:
        lines.append(f"- LiteLLM ({info['spec']}) could not be measured: {info.get('error')}")
    lines.append(
        "- **Portkey's gateway** (`@portkey-ai/gateway` 1.15.2 from npm, Node.js) installs here"
        " and speaks the OpenAI API, but its published build has no response cache: the"
        " `memoryCache` middleware is only registered when `conf.json` sets `cache: true`, and"
        " the bundled `build/start-server.js` contains neither the middleware nor its cache"
        " statuses. With nothing to hit, it is not a peer for this comparison and was left out."
    )
    return lines


# --------------------------------------------------------------------------- plots


def plot_all(sections: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib  # noqa: PLC0415 - a dev dependency, only for the report

    matplotlib.use("Agg")
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    if "hit" in sections:
        written.append(plot_hit(sections["hit"], folder / PLOTS["hit"]))
    if "miss" in sections:
        written.append(plot_miss(sections["miss"], folder / PLOTS["miss"]))
    if "e2e" in sections:
        written.append(plot_e2e(sections["e2e"], folder / PLOTS["e2e"]))
    return written


def _bars(ax: Any, groups: list[str], series: dict[str, list[float]], log: bool) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        for bar, value in zip(bars, values, strict=True):
            if value:
                ax.annotate(
                    f"{value:,.0f}" if value >= 100 else f"{value:.3g}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7,
                )  # fmt: skip
    ax.set_xticks(range(len(groups)), groups)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_hit(record: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    results, targets = record["results"], record["targets_run"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {
        f"c={c}": [results[t].get(f"c{c}", {}).get("rps", 0.0) for t in targets]
        for c in record["concurrencies"]
    }
    _bars(left, targets, series, log=True)
    left.set_title("cache-hit requests per second (log scale, higher is better)")
    left.set_ylabel("requests / s")
    series = {
        f"c={c}": [results[t].get(f"c{c}", {}).get("rps_per_cpu", 0.0) for t in targets]
        for c in record["concurrencies"]
    }
    _bars(right, targets, series, log=True)
    right.set_title("requests per server CPU-second (log scale)")
    fig.suptitle("Hit path: one worker pinned to one CPU, wrk on the other")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_miss(record: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    results = record["results"]
    gateways = [t for t in record["targets_run"] if t != "direct"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {}
    for c in record["concurrencies"]:
        for stat in ("p50", "p99"):
            series[f"{stat} c={c}"] = [
                max(0.01, results[t].get(f"c{c}", {}).get(f"added_{stat}_ms", 0.0))
                for t in gateways
            ]
    _bars(left, gateways, series, log=True)
    left.set_title("latency added to a miss, ms (log scale, lower is better)")
    series = {
        f"c={c}": [
            100 * max(0.0, results[t].get(f"c{c}", {}).get("throughput_loss", 0.0))
            for t in gateways
        ]
        for c in record["concurrencies"]
    }
    _bars(right, gateways, series, log=False)
    right.set_title("throughput lost against the engine alone, %")
    fig.suptitle(f"Miss overhead: engine with a fixed {record['delay_ms']:g} ms delay")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_e2e(record: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    runs = record["runs"]
    modes = list(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    _bars(left, modes, {"goodput": [runs[m]["goodput"] for m in modes]}, log=False)
    left.set_title("goodput, completed requests / s (higher is better)")
    bottom = [0.0] * len(modes)
    for layer in ("l1", "l2", "l3", "coalesced", "engine"):
        values = [100 * runs[m]["shares"][layer] for m in modes]
        right.bar(modes, values, bottom=bottom, label=layer)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set_title("who served the requests, %")
    right.legend(fontsize=8)
    fig.suptitle(
        f"End to end on vLLM CPU: {record['workload']['requests']} requests, concurrency"
        f" {record['config']['concurrency']}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
