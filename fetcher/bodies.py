"""HTTP bodies read with a cap, checked before the bytes are held.

Every body the registry client reads has a bound it can legitimately reach: a range
read its requested length, a manifest or referrers index the distribution registry's
own 4 MiB limit, an error document or a token a few KiB. Reading "the whole body" and
checking it afterwards lets a hostile registry decide how much memory the agent uses.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from fetcher.errors import ResponseTooLargeError
from fetcher.http_errors import reading_body

SMALL_BODY = 64 << 10
"""Error documents and token responses (a JWT with a certificate chain is a few KiB)."""
_PIECE = 1 << 20


async def read_capped(resp: aiohttp.ClientResponse, cap: int, what: str) -> bytes:
    """The whole body, or ResponseTooLargeError as soon as it passes ``cap`` bytes
    (at once when Content-Length already says so), or BodyInterruptedError if it is
    cut short. Reads to the end of the body: a single read may return only what has
    arrived so far."""
    url = str(resp.url.with_query(None))
    length = resp.content_length
    if length is not None and length > cap:
        raise ResponseTooLargeError(f"{what}: {length} bytes announced, over {cap}", url=url)
    parts: list[bytes] = []
    total = 0
    with reading_body(what, url):
        async for piece in resp.content.iter_chunked(_PIECE):
            total += len(piece)
            if total > cap:
                raise ResponseTooLargeError(f"{what}: body runs past {cap} bytes", url=url)
            parts.append(piece)
    return b"".join(parts)


async def json_capped(resp: aiohttp.ClientResponse, cap: int, what: str) -> Any:
    """The body parsed as JSON (ValueError if it is not), read with ``read_capped``."""
    return json.loads(await read_capped(resp, cap, what))
