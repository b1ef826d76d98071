"""The HTTP library's exceptions, in one place: which are worth another try, and what
every one of them becomes before it leaves the registry client.

Callers of the registry client handle `fetcher.errors` types only. An exception of
aiohttp's own that escapes reaches code that cannot know it: one for a registry that
answered with an oversized header line once got past every retry loop and the FUSE read
handler, and left `cat` blocked in the kernel (issue 21, item 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from fetcher.errors import BodyInterruptedError, MalformedResponseError

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    TimeoutError,
)
"""What aiohttp raises for a failure worth another try: a connection refused, reset or
timed out, a body cut short. Any other aiohttp error is an answer that cannot be read."""

_DETAIL_CAP = 200


def describe(exc: BaseException) -> str:
    """A short account of an aiohttp error: its class, and for an answer the parser
    refused, the parser's reason (never a URL: a redirect's may carry a signature)."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}: {exc.message[:_DETAIL_CAP]}"
    return type(exc).__name__


def malformed(what: str, exc: aiohttp.ClientError, url: str | None) -> MalformedResponseError:
    """The error for an answer about ``what`` that aiohttp could not read."""
    return MalformedResponseError(f"{what}: unreadable answer ({describe(exc)})", url=url)


@contextmanager
def reading_body(what: str, url: str | None) -> Iterator[None]:
    """Around a read of a response body: aiohttp's errors become BodyInterruptedError
    (worth another try) or MalformedResponseError."""
    try:
        yield
    except TRANSIENT_ERRORS as exc:
        raise BodyInterruptedError(f"{what} cut short ({describe(exc)})", url=url) from None
    except aiohttp.ClientError as exc:
        raise malformed(what, exc, url) from None
