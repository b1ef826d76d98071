"""Stopping the rig's server processes: SIGTERM, a grace period, then SIGKILL.

Every rig server (registry, token service, containerd, the agent, helper servers in
a namespace) runs in its own session, so signals go to its whole process group and
no child outlives a test.
"""

from __future__ import annotations

import os
import signal
import subprocess


def terminate_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
    """Stop ``process`` and its group; returns its exit code (None if it was killed late)."""
    if process.poll() is not None:
        return process.returncode
    try:
        os.killpg(process.pid, signal.SIGTERM)
        return process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(grace)
        return None
    except ProcessLookupError:
        return process.wait(grace)
