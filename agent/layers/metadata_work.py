"""Worker threads of their own for layer metadata: parsing an index or TOC and building
a layer's tree.

This work is pure CPU and runs while containerd waits on the pull, so it must stay off
the event loop (which serves FUSE and containerd's calls) and must not queue behind the
fetcher's chunk decoding on the default executor: with a profile prefetching, even a
tiny layer's tree waited there behind 4 MiB span inflates. Two threads, so a small
layer is not held up by a big one's parse.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_EXECUTOR = ThreadPoolExecutor(max_workers=2, thread_name_prefix="acceld-metadata")


async def off_loop(work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``work(*args, **kwargs)`` on a metadata thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_EXECUTOR, functools.partial(work, *args, **kwargs))
