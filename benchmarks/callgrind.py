"""Instructions per request (or per event) of the gateway, counted by valgrind's callgrind.

    python benchmarks/callgrind.py [--scenario S3] [--out DIR] [--repeat 1]

CPU time on a shared 2-core machine moves by 20-50 % between runs; an instruction count does
not (it is the same work whatever else runs). This starts the fake upstream, then the gateway
under ``valgrind --tool=callgrind --instr-atstart=no`` (start-up and imports not counted), warms
it up, switches counting on with ``callgrind_control -i on``, runs the scenario's load client
(its own process, not counted), dumps the counters, and prints the gateway's instructions per
unit (``Ir``). ``callgrind_annotate DIR/callgrind.out.*`` shows where they went (C level: for
Python-level attribution use py-spy on a normal run). Linux with valgrind only.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import targets
from run import SCENARIOS, Upstream, run_client

HERE = Path(__file__).resolve().parent
GATEWAY_ARGUMENTS = "-m gateway --config {config}"


def _callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def measure(
    scenario_key: str,
    out: Path,
    index: int,
    source: Path | None = None,
    arguments: str = GATEWAY_ARGUMENTS,
) -> float:
    """One counted run of the scenario; the gateway's instructions per unit. ``source``: run
    the gateway from that checkout instead (e.g. the code before a change, via git archive);
    ``arguments``: what follows ``python`` (e.g. ``benchmarks/floor_proxy.py {config}``)."""
    scenario = SCENARIOS[scenario_key]
    spec = scenario.spec
    work = out / f"{scenario_key}-{index}"
    work.mkdir(parents=True, exist_ok=True)
    dump = work / "callgrind.out"
    command = (
        f"valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file={dump}.%p "
        "{python} " + arguments
    )
    if source is not None:  # `python -m` imports from the working directory first
        command = f"sh -c 'cd {shlex.quote(str(source))} && exec {command}'"
    upstream = Upstream(work)
    gateway = targets.make("gateway", upstream.port, work / "gateway", command)
    old_timeout = targets.START_TIMEOUT
    targets.START_TIMEOUT = 180.0  # imports under valgrind take a while
    try:
        gateway.start()
        problem = targets.warm_up(gateway)
        if problem:
            raise SystemExit(f"warm-up: {problem}")
        assert gateway.proc is not None
        pid = str(gateway.proc.pid)
        _callgrind_control("-z", pid)
        _callgrind_control("-i", "on", pid)
        summary, error = run_client(gateway, spec, work, lambda: None)
        _callgrind_control("-i", "off", pid)
        _callgrind_control("-d", pid)
        if error or summary is None:
            raise SystemExit(f"client: {error}")
        time.sleep(0.5)
    finally:
        targets.START_TIMEOUT = old_timeout
        gateway.stop()
        upstream.stop()
    # counting was on only while the client ran: valgrind's closing "Collected" is that run
    log = (work / "gateway" / "gateway.log").read_text(errors="replace")
    collected = re.findall(r"Collected : (\d+)", log)
    if not collected:
        raise SystemExit(f"no callgrind total in {work / 'gateway' / 'gateway.log'}")
    total = int(collected[-1])
    units = spec.requests if scenario.unit == "request" else spec.streams * spec.events
    (work / "spec.json").write_text(json.dumps(asdict(spec)))
    return total / units


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario",
        default="S3",
        type=lambda key: {k.lower(): k for k in SCENARIOS}.get(key.lower(), key),
        choices=sorted(SCENARIOS),
    )
    parser.add_argument("--out", type=Path, default=HERE / "out" / "callgrind")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--source", type=Path, help="run the gateway from this checkout (default: this one)"
    )
    parser.add_argument(
        "--arguments",
        default=GATEWAY_ARGUMENTS,
        help="what to run after python, {config} filled in (default: %(default)s); "
        "'benchmarks/floor_proxy.py {config}' counts the floor",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (with callgrind_control) is not installed", file=sys.stderr)
        return 2
    unit = SCENARIOS[args.scenario].unit
    for i in range(args.repeat):
        per_unit = measure(args.scenario, args.out, i, args.source, args.arguments)
        print(f"{args.scenario} run {i + 1}: {per_unit:,.0f} instructions per {unit}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
