"""Measure the relay side by side: direct, the gateway, nginx and the floor, six scenarios.

    python benchmarks/run.py [--quick] [--scenarios S1,S2] [--targets direct,gateway,nginx,floor]

For each scenario and each target, the target is started fresh on loopback, warmed up, and the
load client (its own process) runs the scenario through it against the fake upstream (its own
process, shared by all). The proxy's CPU comes from ``/proc`` just before and after, its memory
is sampled every 50 ms. Prints a Markdown table; writes ``results.json``, ``report.md`` and
``chart.png`` under ``--out``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import procstat
import report
import targets
from client import Spec
from common import raise_nofile

HERE = Path(__file__).resolve().parent
SETTLE_S = 0.3  # after warm-up, before the baseline: let the target go idle
OPEN_SETTLE_S = 1.0  # S5: after every stream has its first event, before reading RSS


@dataclass(frozen=True)
class Scenario:
    """One scenario: what the client does, and what the proxy's CPU is divided by."""

    key: str
    title: str
    spec: Spec
    quick: dict[str, Any]
    unit: str  # "event" or "request"

    def for_run(self, quick: bool) -> Spec:
        return replace(self.spec, **self.quick) if quick else self.spec


SCENARIOS = {
    s.key: s
    for s in (
        Scenario(
            "S1",
            "1 stream x 20,000 small events, unpaced",
            Spec("stream", streams=1, events=20_000, size=200, deadline_s=60),
            {"events": 2_000, "deadline_s": 20},
            "event",
        ),
        Scenario(
            "S2",
            "100 streams x 200 events every 20 ms (LLM pacing)",
            Spec("stream", streams=100, events=200, interval_ms=20, size=200, deadline_s=60),
            {"events": 20, "deadline_s": 20},
            "event",
        ),
        Scenario(
            "S2b",
            "10 streams x 200 events every 20 ms (S2 with a tenth of the streams)",
            Spec("stream", streams=10, events=200, interval_ms=20, size=200, deadline_s=60),
            {"events": 20, "deadline_s": 20},
            "event",
        ),
        Scenario(
            "S3",
            "2,000 non-streaming requests at concurrency 50",
            Spec("request", requests=2_000, concurrency=50, deadline_s=120),
            {"requests": 200, "deadline_s": 30},
            "request",
        ),
        Scenario(
            "S4",
            "1 stream of ~200 MB in 64 KiB events",
            Spec("stream", streams=1, events=3_200, size=65_536, deadline_s=180),
            {"events": 320, "deadline_s": 30},
            "event",
        ),
        Scenario(
            "S5",
            "1,000 concurrent slow streams (an event every 2 s, held ~10 s)",
            Spec(
                "stream",
                streams=1_000,
                events=6,
                interval_ms=2_000,
                size=200,
                deadline_s=60,
                signal_open=True,
            ),
            {"streams": 100, "events": 3, "interval_ms": 1_000, "deadline_s": 20},
            "event",
        ),
    )
}
TARGETS = ("direct", "gateway", "nginx", "floor")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_info(date: str, nginx_version: str, gateway_version: str) -> dict[str, Any]:
    """What the figures were measured on: printed beside the table and on the chart."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {
        "date": date,
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "nginx": nginx_version,
        "gateway": gateway_version,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


class Upstream:
    """The fake upstream process, shared by every scenario and target of a run."""

    def __init__(self, workdir: Path) -> None:
        self.log = workdir / "upstream.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "upstream.py"), "--port", "0"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.proc.stdout is not None
        timer = threading.Timer(15, self.proc.kill)
        timer.start()
        line = self.proc.stdout.readline()
        timer.cancel()
        if not line.startswith("READY "):
            self.stop()
            raise SystemExit(f"the fake upstream did not start: {targets.tail(self.log)}")
        self.port = int(line.split()[1])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def run_client(
    target: targets.Target, spec: Spec, workdir: Path, on_open: Callable[[], None]
) -> tuple[dict[str, Any] | None, str | None]:
    """Run the load client to completion; returns (its summary, or None, and an error)."""
    argv = [
        sys.executable,
        str(HERE / "client.py"),
        "--port",
        str(target.port),
        "--path",
        target.path,
        "--spec",
        json.dumps(asdict(spec)),
    ]
    if target.token:
        argv.append("--token")
    log = workdir / "client.log"
    with log.open("ab") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True
        )
    # the client keeps its own deadline; this one only catches a client that hangs anyway
    watchdog = threading.Timer(spec.deadline_s + 30, proc.kill)
    watchdog.start()
    summary = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "OPEN":
                on_open()
            elif line.startswith("{"):
                summary = json.loads(line)
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if summary is None:
        return None, f"client exited {proc.returncode} without a result: {targets.tail(log, 3)}"
    return summary, None


def run_one(
    scenario: Scenario, spec: Spec, target: targets.Target, upstream: Upstream, workdir: Path
) -> dict[str, Any]:
    """One scenario through one started target: the client's summary plus the proxy's costs."""
    record: dict[str, Any] = {"scenario": scenario.key, "target": target.name}
    problem = targets.warm_up(target)
    if problem:
        record["error"] = problem
        return record
    time.sleep(SETTLE_S)
    pids = target.pids()
    record["pids"] = pids
    rss_base = procstat.rss_kb(pids)
    cpu0, up0 = procstat.cpu(pids), procstat.cpu([upstream.proc.pid])
    sampler = procstat.RssSampler(pids)
    sampler.start()
    opened: dict[str, int] = {}

    def on_open() -> None:
        time.sleep(OPEN_SETTLE_S)
        opened["rss_kb"] = procstat.rss_kb(pids)

    summary, error = run_client(target, spec, workdir, on_open)
    cpu1, up1 = procstat.cpu(pids), procstat.cpu([upstream.proc.pid])
    peak = sampler.stop()
    if error:
        record["error"] = error
    if summary is None:
        return record
    units = summary["expected_events"] if scenario.unit == "event" else spec.requests
    record["client"] = summary
    record["units"] = units
    if pids:
        proxy_cpu = cpu1 - cpu0
        record["proxy_cpu_us_per_unit"] = proxy_cpu.best_ns() / 1000 / units
        record["proxy_cpu_stat_us_per_unit"] = proxy_cpu.stat_ns / 1000 / units
        record["rss_base_kb"] = rss_base
        record["rss_peak_kb"] = peak
        record["rss_peak_growth_kb"] = peak - rss_base
        record["rss_samples"] = sampler.samples
        if "rss_kb" in opened:
            record["rss_open_kb"] = opened["rss_kb"]
            record["rss_per_stream_kb"] = (opened["rss_kb"] - rss_base) / spec.streams
        elif spec.signal_open:
            record["error"] = "the streams were never all open at once: no RSS per stream"
    record["upstream_cpu_us_per_unit"] = (up1 - up0).best_ns() / 1000 / units
    record["client_cpu_us_per_unit"] = float(summary["client_cpu_s"]) * 1e6 / units
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every scenario ~10x smaller")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument(
        "--gateway-command",
        default=targets.Gateway.default_command,
        help="how to start the gateway ({python} and {config} are filled in)",
    )
    parser.add_argument(
        "--label", default="", help="a word on this run for the report, e.g. 'development run'"
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="also put the table and chart into benchmarks/README.md and append to RESULTS.md",
    )
    args = parser.parse_args(argv)
    by_lower = {key.lower(): key for key in SCENARIOS}  # "s2b" and "S2B" name S2b
    chosen = [by_lower.get(s.strip().lower(), s.strip()) for s in args.scenarios.split(",")]
    chosen = [key for key in chosen if key]
    wanted = [t.strip().lower() for t in args.targets.split(",") if t.strip()]
    for key in chosen:
        if key not in SCENARIOS:
            parser.error(f"unknown scenario {key!r} (one of {', '.join(SCENARIOS)})")
    for name in wanted:
        if name not in TARGETS:
            parser.error(f"unknown target {name!r} (one of {', '.join(TARGETS)})")
    if not Path("/proc/self/stat").exists():
        parser.error("this benchmark reads /proc: it runs on Linux only")

    raise_nofile()  # inherited by the upstream, the client and every target
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.out / "work"  # configs and logs of this run, kept for a look afterwards
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    upstream = Upstream(workdir)
    started = time.monotonic()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    records: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    versions: dict[str, str] = {}
    command = "python benchmarks/run.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
    )
    try:
        for key in chosen:
            scenario = SCENARIOS[key]
            spec = scenario.for_run(args.quick)
            for name in wanted:
                target = targets.make(name, upstream.port, workdir / name, args.gateway_command)
                if name not in versions:
                    versions[name] = target.version()
                if name in unavailable:
                    records.append({"scenario": key, "target": name, "skipped": unavailable[name]})
                    continue
                print(f"# {key} {name} ...", file=sys.stderr, flush=True)
                try:
                    target.start()
                except targets.TargetUnavailable as exc:
                    unavailable[name] = str(exc)
                    records.append({"scenario": key, "target": name, "skipped": str(exc)})
                    continue
                try:
                    record = run_one(scenario, spec, target, upstream, workdir)
                    if target.proc is not None and target.proc.poll() is not None:
                        record["error"] = f"{name} exited with code {target.proc.returncode}"
                except Exception as exc:  # a harness fault: say so in the table, go on
                    record = {"scenario": key, "target": name, "error": f"harness: {exc!r}"}
                finally:
                    target.stop()
                if target.exit_code not in (None, 0):
                    record.setdefault("notes", []).append(
                        f"exited with code {target.exit_code} on SIGTERM"
                    )
                records.append(record)
                if not upstream.alive():
                    raise SystemExit(f"the fake upstream died: {targets.tail(upstream.log)}")
    finally:
        upstream.stop()
    result = {
        "command": command,
        "quick": args.quick,
        "label": args.label,
        "machine": machine_info(date, versions.get("nginx", "?"), versions.get("gateway", "?")),
        "scenarios": {k: {"title": SCENARIOS[k].title, "unit": SCENARIOS[k].unit} for k in chosen},
        "specs": {k: asdict(SCENARIOS[k].for_run(args.quick)) for k in chosen},
        "targets": wanted,
        "records": records,
        "duration_s": round(time.monotonic() - started, 1),
    }
    report.derive(result)
    text = report.markdown(result)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "report.md").write_text(text)
    chart_note = report.chart(result, args.out / "chart.png")
    print(text)
    print(chart_note, file=sys.stderr)
    if args.publish:
        print(report.publish(result, text, args.out / "chart.png", HERE), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
