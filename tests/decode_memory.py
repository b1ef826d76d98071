"""Decoding a hostile input in a fresh interpreter, to see what memory it takes at peak.

A parser that builds an object per few bytes of inflated metadata before checking any
count in it can take gigabytes for kilobytes of input; these tests hold each parser to
``PEAK_LIMIT`` for the whole child process, the interpreter and its imports included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PEAK_LIMIT = 256 << 20
_ROOT = Path(__file__).resolve().parent.parent
# VmHWM, the peak of this process's own memory map: ru_maxrss would also count the
# parent's pages that the child had before it replaced them with the interpreter.
_CHILD = """
import sys
{imports}
with open(sys.argv[1], "rb") as source:
    data = source.read()
try:
    {call}
    outcome = "accepted"
except {error}:
    outcome = "refused"
with open("/proc/self/status") as status:
    peak = next(line for line in status if line.startswith("VmHWM:")).split()[1]
print(outcome, int(peak) * 1024)
"""


def decode_in_child(
    tmp_path: Path, data: bytes, imports: str, call: str, error: str
) -> tuple[str, int]:
    """Run ``call`` (Python code using ``data``) in a child interpreter: "refused" if it
    raised ``error``, "accepted" if it returned, and the child's peak RSS in bytes. Any
    other exception, MemoryError included, fails the test."""
    path = tmp_path / "hostile-input"
    path.write_bytes(data)
    script = _CHILD.format(imports=imports, call=call, error=error)
    child = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    outcome, peak = child.stdout.split()
    return outcome, int(peak)
