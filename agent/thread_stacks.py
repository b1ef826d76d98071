"""Where every thread of this process is, in Python and in the kernel, and where a
suspended coroutine waits.

A hung agent is diagnosed from one record written at the moment of the hang: the
Python stack says which call of ours is stuck, the kernel stack and wait channel say on
what (a FUSE reply, a page lock, a pipe, a mutex). The kernel side comes from
/proc/self/task, which also lists threads Python did not start (gRPC's, libfuse's);
anything unreadable there (no root, no CONFIG_STACKTRACE) is left out, never fatal.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from dataclasses import dataclass
from types import FrameType

from common.kernel_threads import kernel_thread, thread_ids


@dataclass(frozen=True)
class ThreadStack:
    """One thread (Python-started or not) and what it is doing."""

    native_id: int | None
    name: str
    python_stack: str | None = None
    state: str | None = None
    wchan: str | None = None
    kernel_stack: str | None = None

    def as_dict(self) -> dict[str, object]:
        """For a structured log record (unknown parts omitted, to keep it short)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def kernel_view(native_id: int) -> tuple[str | None, str | None, str | None, str | None]:
    """(command name, state letter, wait channel, kernel stack) of one of our threads."""
    thread = kernel_thread(os.getpid(), native_id)
    return thread.comm, thread.state, thread.wchan, thread.stack


def all_thread_stacks() -> list[ThreadStack]:
    """Every thread of the process: Python threads with their stacks, then the ones only
    the kernel knows."""
    frames = sys._current_frames()
    threads = {t.ident: t for t in threading.enumerate()}
    result: list[ThreadStack] = []
    seen: set[int] = set()
    for ident, frame in frames.items():
        thread = threads.get(ident)
        native_id = thread.native_id if thread is not None else None
        name = thread.name if thread is not None else f"thread-{ident}"
        python_stack = "".join(traceback.format_stack(frame))
        if native_id is None:
            result.append(ThreadStack(None, name, python_stack))
            continue
        seen.add(native_id)
        _, state, wchan, kernel = kernel_view(native_id)
        result.append(ThreadStack(native_id, name, python_stack, state, wchan, kernel))
    for native_id in thread_ids(os.getpid()):
        if native_id not in seen:
            comm, state, wchan, kernel = kernel_view(native_id)
            result.append(ThreadStack(native_id, comm or "?", None, state, wchan, kernel))
    return result


def await_stack(coroutine: object, limit: int = 64) -> str:
    """The chain of awaits a suspended coroutine waits in, outermost first.

    Task.print_stack shows only a task's own coroutine frame; what is stuck is at the
    far end of its ``cr_await`` chain. (A pyfuse3 worker task cannot be followed from
    the top: Cython's await wrapper hides what it awaits, so start from our handler.)
    Call on the loop's thread: a running loop changes the chain under a reader."""
    frames: list[tuple[FrameType, int]] = []
    awaited: object = coroutine
    tail = ""
    for _ in range(limit):
        if awaited is None:
            break
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if not isinstance(frame, FrameType):
            tail = f"awaiting {awaited!r}\n"
            break
        frames.append((frame, frame.f_lineno))
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return "".join(traceback.StackSummary.extract(frames).format()) + tail
