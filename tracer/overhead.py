"""What tracing costs a traced process, and every other process on the node.

The probes run on every openat/read/mmap system-wide (the target filter is in the
kernel), so two numbers matter: the extra cost inside a traced container, and the cost
of the filter for processes nobody traces. Run as `python -m tracer.overhead`.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.logging import configure_logging
from tracer.trace import Tracer

# The measured loop runs in a child so that it can be targeted (or not) by pid.
_LOOP = """
import os, sys, time
path, n = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()
start = time.perf_counter_ns()
for _ in range(n):
    os.close(os.open(path, os.O_RDONLY))
print((time.perf_counter_ns() - start) / n / 1000)
"""


@dataclass(frozen=True)
class Overhead:
    """Median microseconds per openat+close."""

    untraced_us: float
    filtered_out_us: float  # tracer loaded, this process not a target
    traced_us: float  # this process is a target (in-kernel dedup keeps events few)


def _run_loop(path: Path, iterations: int, tracer: Tracer | None) -> float:
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOOP, str(path), str(iterations)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if tracer is not None:
            tracer.add_target(pid=proc.pid)
        out, _ = proc.communicate("go\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if tracer is not None:
            tracer.remove_target(pid=proc.pid)
    return float(out)


def measure(iterations: int = 200_000, runs: int = 5) -> Overhead:
    """Medians over `runs`; untraced runs both before loading and after unloading and
    traced/filtered runs interleaved, so a busy node skews all three alike."""
    with tempfile.NamedTemporaryFile(prefix="acceld-overhead-") as target:
        path = Path(target.name)
        untraced = [_run_loop(path, iterations, None) for _ in range(runs)]
        filtered: list[float] = []
        traced: list[float] = []
        with Tracer() as tracer:
            for _ in range(runs):
                filtered.append(_run_loop(path, iterations, None))
                traced.append(_run_loop(path, iterations, tracer))
            tracer.collect(quiet_s=0.2, deadline_s=2.0)
        untraced += [_run_loop(path, iterations, None) for _ in range(runs)]
    return Overhead(
        untraced_us=statistics.median(untraced),
        filtered_out_us=statistics.median(filtered),
        traced_us=statistics.median(traced),
    )


def main() -> None:
    configure_logging()
    result = measure()
    print(f"openat+close untraced:              {result.untraced_us:.2f} us")
    print(f"openat+close tracer loaded, other:  {result.filtered_out_us:.2f} us")
    print(f"openat+close traced:                {result.traced_us:.2f} us")


if __name__ == "__main__":
    main()
