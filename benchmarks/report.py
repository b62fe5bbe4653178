"""Turning a run's records into the Markdown table, the goals against nginx, and the chart.

Memory is read from ``/proc`` in KiB and shown in decimal units (1 MB = 10^6 bytes,
1 KB = 10^3 bytes), the units the goals are stated in.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

# (scenario, figure, record key, goal, unit): from the issue; the nginx column is measured
GOALS = (
    ("S2", "proxy CPU per event", "proxy_cpu_us_per_unit", 25.0, "µs"),
    ("S2", "added delay p99 vs direct", "added_p99_ms", 2.0, "ms"),
    ("S1", "proxy CPU per event", "proxy_cpu_us_per_unit", 10.0, "µs"),
    ("S3", "proxy CPU per request", "proxy_cpu_us_per_unit", 250.0, "µs"),
    ("S4", "peak RSS growth for the stream", "rss_peak_growth_mb", 5.0, "MB"),
    ("S5", "RSS per open stream", "rss_per_stream_kb_dec", 40.0, "KB"),
)
# the figures of each scenario for the ratio against nginx in the closing note
RATIO_FIGURES = (
    ("S1", "proxy CPU per event", "proxy_cpu_us_per_unit", "µs"),
    ("S2", "proxy CPU per event", "proxy_cpu_us_per_unit", "µs"),
    ("S2", "added delay p99 vs direct", "added_p99_ms", "ms"),
    ("S2b", "proxy CPU per event", "proxy_cpu_us_per_unit", "µs"),
    ("S3", "proxy CPU per request", "proxy_cpu_us_per_unit", "µs"),
    ("S4", "proxy CPU per 64 KiB event", "proxy_cpu_us_per_unit", "µs"),
    ("S4", "peak RSS growth", "rss_peak_growth_mb", "MB"),
    ("S5", "RSS per open stream", "rss_per_stream_kb_dec", "KB"),
    ("S5", "proxy CPU per event", "proxy_cpu_us_per_unit", "µs"),
)
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def _kib_to_mb(kib: float) -> float:
    return kib * 1024 / 1e6


def _kib_to_kb(kib: float) -> float:
    return kib * 1024 / 1e3


def derive(result: dict[str, Any]) -> None:
    """Add the figures that compare targets: delay added over direct, the goals table."""
    by_key = {(r["scenario"], r["target"]): r for r in result["records"]}
    for record in result["records"]:
        client = record.get("client")
        if "rss_peak_growth_kb" in record:
            record["rss_peak_growth_mb"] = _kib_to_mb(record["rss_peak_growth_kb"])
            record["rss_base_mb"] = _kib_to_mb(record["rss_base_kb"])
        if "rss_per_stream_kb" in record:
            record["rss_per_stream_kb_dec"] = _kib_to_kb(record["rss_per_stream_kb"])
        direct = by_key.get((record["scenario"], "direct"), {}).get("client")
        if client and direct and client.get("delay_ms") and direct.get("delay_ms"):
            for q in ("p50", "p99"):
                record[f"added_{q}_ms"] = client["delay_ms"][q] - direct["delay_ms"][q]
    goals = []
    for scenario, figure, key, goal, unit in GOALS:
        nginx = by_key.get((scenario, "nginx"), {}).get(key)
        gateway = by_key.get((scenario, "gateway"), {}).get(key)
        goals.append(
            {
                "scenario": scenario,
                "figure": figure,
                "key": key,
                "unit": unit,
                "nginx": nginx,
                "gateway": gateway,
                "ratio": _ratio(gateway, nginx),
                "goal": goal,
                "met": None if gateway is None else gateway <= goal,
            }
        )
    result["goals"] = goals
    ratios = []
    for scenario, figure, key, unit in RATIO_FIGURES:
        if scenario not in result["scenarios"]:
            continue
        nginx = by_key.get((scenario, "nginx"), {}).get(key)
        gateway = by_key.get((scenario, "gateway"), {}).get(key)
        floor = by_key.get((scenario, "floor"), {}).get(key)
        ratios.append(
            {
                "scenario": scenario,
                "figure": figure,
                "unit": unit,
                "nginx": nginx,
                "gateway": gateway,
                "ratio": _ratio(gateway, nginx),
                "floor": floor,
                "floor_ratio": _ratio(gateway, floor),
            }
        )
    result["ratios"] = ratios


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs <= 0:
        return None
    return ours / theirs


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def _throughput(record: dict[str, Any], unit: str) -> str:
    client = record["client"]
    if record["scenario"] == "S4":
        return f"{client['mb_per_s']:.0f} MB/s"
    per = "req" if unit == "request" else "ev"
    return f"{client['events_per_s']:,.0f} {per}/s"


def machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}; Python {machine['python']}, aiohttp {machine['aiohttp']}, "
        f"uvloop {machine['uvloop']}; nginx {machine['nginx']}; {machine['gateway']}; "
        f"load average at the end {machine['load']}"
    )


def markdown(result: dict[str, Any]) -> str:
    """The whole report: machine, per-target table, goals, ratios, harness cost, notes."""
    m = result["machine"]
    lines = [
        f"Measured {m['date']} with `{result['command']}`"
        + (" (quick: every scenario ~10x smaller)" if result["quick"] else "")
        + (f". **{result['label']}**" if result.get("label") else ""),
        "",
        f"Machine: {machine_line(m)}.",
        "",
        "| scenario | target | proxy CPU µs/unit | delay p50 ms | delay p99 ms "
        "| p99 vs direct ms | TTFB p50 / p99 ms | throughput | RSS MB | peak RSS growth MB "
        "| RSS per stream KB | complete | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    notes: list[str] = []
    for record in result["records"]:
        key, name = record["scenario"], record["target"]
        unit = result["scenarios"][key]["unit"]
        if "skipped" in record or "client" not in record:
            why = record.get("skipped") or record.get("error") or "no result"
            lines.append(f"| {key} | {name} | not measured: {why[:160]} |" + " |" * 10)
            continue
        client = record["client"]
        delay, ttfb = client.get("delay_ms") or {}, client.get("ttfb_ms") or {}
        cpu = record.get("proxy_cpu_us_per_unit")
        per_stream = record.get("rss_per_stream_kb_dec")
        errors = client["error_total"]
        if client["errors"]:
            notes.append(f"{key} {name}: errors {client['errors']}")
        if record.get("error"):
            notes.append(f"{key} {name}: {record['error']}")
        for note in record.get("notes", []):
            notes.append(f"{key} {name}: {note}")
        complete = (
            "yes"
            if client["complete"]
            else (
                f"no ({client['events']:,}/{client['expected_events']:,} events, "
                f"{client['bytes']:,}/{client['expected_bytes']:,} B)"
            )
        )
        lines.append(
            f"| {key} | {name} | {_num(cpu, 1)} /{unit} | {_num(delay.get('p50'), 2)} "
            f"| {_num(delay.get('p99'), 2)} | {_signed(record.get('added_p99_ms'))} "
            f"| {_num(ttfb.get('p50'), 2)} / {_num(ttfb.get('p99'), 2)} "
            f"| {_throughput(record, unit)} | {_num(record.get('rss_base_mb'), 1)} "
            f"| {_num(record.get('rss_peak_growth_mb'), 1)} | {_num(per_stream, 1)} "
            f"| {complete} | {errors} |"
        )
    lines += [
        "",
        "Goals (from the issue), gateway against nginx measured in the same run:",
        "",
        "| scenario | figure | nginx | gateway | gateway ÷ nginx | goal | met |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for g in result["goals"]:
        if g["scenario"] not in result["scenarios"]:
            continue
        met = "—" if g["met"] is None else ("yes" if g["met"] else "**no**")
        ratio = "—" if g["ratio"] is None else f"{g['ratio']:.1f}x"
        lines.append(
            f"| {g['scenario']} | {g['figure']} | {_num(g['nginx'], 2)} {g['unit']} "
            f"| {_num(g['gateway'], 2)} {g['unit']} | {ratio} | ≤ {g['goal']:g} {g['unit']} "
            f"| {met} |"
        )
    harness = [r for r in result["records"] if r["target"] == "direct" and "client" in r]
    if harness:
        lines += [
            "",
            "Harness cost in the direct run, CPU µs per unit, in processes of their own (for"
            " paced streams most of it is system time: one socket write or read per event):",
            "",
            "| scenario | load client | fake upstream |",
            "| --- | ---: | ---: |",
        ]
        for r in harness:
            lines.append(
                f"| {r['scenario']} | {_num(r['client_cpu_us_per_unit'], 1)} "
                f"| {_num(r['upstream_cpu_us_per_unit'], 1)} |"
            )
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    # the closing note: the measured ratio against nginx for every scenario
    lines += [
        "",
        "Closing note: the gateway against nginx, measured in this run, every scenario:",
        "",
    ]
    for r in result["ratios"]:
        if r["ratio"] is not None:
            ratio = f"**{r['ratio']:.1f}x** nginx"
        elif r["gateway"] is not None and r["nginx"] is not None:
            ratio = "no ratio (nginx's figure is not above zero)"
        else:
            ratio = "not measured"
        floor = ""
        if r.get("floor_ratio") is not None:
            floor = f"; floor {_num(r['floor'], 2)} {r['unit']}: {r['floor_ratio']:.1f}x the floor"
        lines.append(
            f"- {r['scenario']} {r['figure']}: gateway {_num(r['gateway'], 2)} {r['unit']}, "
            f"nginx {_num(r['nginx'], 2)} {r['unit']}: {ratio}{floor}"
        )
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> str:
    """Draw the chart; matplotlib is a benchmark-only extra, so say so if it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart: matplotlib is not installed (pip install -r benchmarks/requirements.txt)"
    colors = {"direct": "#999999", "gateway": "#d9541e", "nginx": "#2a9d3f", "floor": "#3a6ea5"}
    by_key = {(r["scenario"], r["target"]): r for r in result["records"]}
    scenarios = list(result["scenarios"])
    proxies = [t for t in result["targets"] if t != "direct"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    quick = " (quick run)" if result["quick"] else ""
    fig.suptitle(f"modelarts-gateway relay vs nginx{quick}", fontsize=14, fontweight="bold")

    goals: dict[str, dict[str, float]] = {}
    for g in result["goals"]:
        goals.setdefault(g["key"], {})[g["scenario"]] = g["goal"]

    def bars(ax: Any, key: str, title: str, ylabel: str, keys: list[str], log: bool) -> None:
        width = 0.8 / max(len(proxies), 1)
        span = width * len(proxies)
        marked = False
        for i, scenario in enumerate(keys):
            goal = goals.get(key, {}).get(scenario)
            if goal is not None:
                ax.hlines(
                    goal,
                    i - width / 2,
                    i - width / 2 + span,
                    colors="black",
                    linestyles="dashed",
                    label=None if marked else "goal",
                )
                marked = True
        for n, target in enumerate(proxies):
            values = [by_key.get((s, target), {}).get(key) for s in keys]
            xs = [i + n * width for i in range(len(keys))]
            heights = [v if v is not None else 0 for v in values]
            rects = ax.bar(xs, heights, width, label=target, color=colors.get(target))
            for rect, value in zip(rects, values, strict=True):
                label = "n/a" if value is None else _num(value, 1)
                ax.annotate(
                    label,
                    (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set_xticks([i + width * (len(proxies) - 1) / 2 for i in range(len(keys))], keys)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("symlog", linthresh=1)
        ax.legend(fontsize=8)

    bars(
        axes[0][0],
        "proxy_cpu_us_per_unit",
        "proxy CPU per event (S3: per request)",
        "µs (log)",
        scenarios,
        True,
    )
    bars(
        axes[0][1],
        "added_p99_ms",
        "paced streams: delivery delay p99 added over direct",
        "ms",
        [s for s in scenarios if s in ("S2", "S5")],
        False,
    )
    ax = axes[0][2]
    if "S2" in scenarios:
        for target in result["targets"]:
            cdf = by_key.get(("S2", target), {}).get("client", {}).get("delay_cdf_ms")
            if cdf:
                ys = [100 * i / (len(cdf) - 1) for i in range(len(cdf))]
                ax.plot(cdf, ys, label=target, color=colors.get(target))
        ax.set_xscale("log")
        ax.set_xlabel("delivery delay, ms (log)")
        ax.set_ylabel("% of events")
        ax.set_title("S2 (LLM pacing): delivery delay distribution")
        ax.legend(fontsize=8)
    bars(
        axes[1][0],
        "rss_peak_growth_mb",
        "peak RSS growth during the scenario",
        "MB",
        scenarios,
        False,
    )
    bars(
        axes[1][1],
        "rss_per_stream_kb_dec",
        "S5: RSS per open stream",
        "KB",
        [s for s in scenarios if s == "S5"],
        False,
    )
    ax = axes[1][2]
    ax.axis("off")
    m = result["machine"]
    text = [
        f"{m['date']}",
        f"CPU: {m['cpu']}",
        f"{m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}",
        f"Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}",
        f"nginx {m['nginx']} (1 worker, proxy_buffering off)",
        f"{m['gateway']}",
        "",
        "gateway ÷ nginx:",
    ]
    for r in result["ratios"]:
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.1f}x"
        text.append(f"  {r['scenario']} {r['figure']}: {ratio}")
    text += ["", *textwrap.wrap(f"command: {result['command']}", 60, subsequent_indent="  ")]
    ax.text(0, 1, "\n".join(text), va="top", ha="left", fontsize=9, family="monospace", wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"chart: {path}"


def publish(result: dict[str, Any], text: str, chart_path: Path, here: Path) -> str:
    """Put this run into the README (table and chart) and append it to RESULTS.md."""
    done = []
    if chart_path.exists():
        shutil.copyfile(chart_path, here / "chart.png")
        done.append("benchmarks/chart.png")
    readme = here / "README.md"
    if readme.exists():
        body = readme.read_text()
        block = f"{README_START}\n![chart](chart.png)\n\n{text}{README_END}"
        pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
        if pattern.search(body):
            readme.write_text(pattern.sub(lambda _: block, body))
            done.append("benchmarks/README.md")
    results = here / "RESULTS.md"
    kind = "quick run" if result["quick"] else "full run"
    if result.get("label"):
        kind += f", {result['label']}"
    section = f"\n## {result['machine']['date']}: {kind}\n\n{text}"
    with results.open("a") as f:
        f.write(section)
    done.append("benchmarks/RESULTS.md")
    return "published: " + ", ".join(done)


def main() -> None:
    """Re-render ``report.md`` and ``chart.png`` beside a ``results.json`` without re-running."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path, help="a results.json written by run.py")
    args = parser.parse_args()
    result = json.loads(args.results.read_text())
    derive(result)
    text = markdown(result)
    (args.results.parent / "report.md").write_text(text)
    print(text)
    print(chart(result, args.results.parent / "chart.png"))


if __name__ == "__main__":
    main()
