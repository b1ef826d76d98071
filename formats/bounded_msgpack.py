"""msgpack decoding that builds no more arrays and maps than a format allows.

msgpack's own limits (``max_array_len`` and the like) cap each container, not how many
there are, and a container costs far more than its bytes: one byte (0x90) becomes an
empty list of 56 bytes and more. So a few kilobytes of metadata, inflated, could become
a gigabyte of Python objects before any count in it was checked. The formats that come
from a registry (the layer index, learned profiles) are therefore read top-down with
``BoundedUnpacker``: a long array's or map's length is read from its header and checked
against the format's cap before anything is built for it, and the items read in bulk
may build only as many arrays and maps as the caller allowed for; one more stops the
decoding with the format's own error. Peak memory is then what the format's counts
allow, whatever the bytes say.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

# Read a chunk at a time, so that the unpacker's buffer holds what the value being
# decoded needs rather than a second copy of the whole document.
_READ_SIZE = 1 << 20


class BoundedUnpacker:
    """Reads one msgpack document from ``data``, raising ``error`` (the format's own
    error type) for anything malformed or over a limit, never msgpack's errors.

    ``max_array_len`` and ``max_map_len`` cap the arrays and maps that ``value`` and
    ``values`` build whole (short ones: a table row, a checkpoint); longer ones are read
    with ``array``, ``items`` and ``fields``, whose lengths are checked before their
    items are read. Nothing built whole may hold an array or a map unless ``allow``
    said so.
    """

    def __init__(
        self,
        data: bytes,
        error: type[ValueError],
        what: str,
        *,
        max_str_len: int,
        max_bin_len: int,
        max_array_len: int = 0,
        max_map_len: int = 0,
        unicode_errors: str = "strict",
    ) -> None:
        self._error = error
        self._what = what
        self._size = len(data)
        self._arrays = 0
        self._maps = 0
        self._unpacker = msgpack.Unpacker(
            file_like=io.BytesIO(data),
            read_size=min(_READ_SIZE, max(len(data), 1)),
            max_buffer_size=max(len(data), 1),
            raw=False,
            strict_map_key=True,
            unicode_errors=unicode_errors,
            max_str_len=max_str_len,
            max_bin_len=max_bin_len,
            max_array_len=max_array_len,
            max_map_len=max_map_len,
            max_ext_len=0,
            list_hook=self._built_array,
            object_hook=self._built_map,
        )

    def allow(self, arrays: int = 0, maps: int = 0) -> None:
        """Let what is read next build at most ``arrays`` arrays and ``maps`` maps (in
        place of what an earlier allowance left)."""
        self._arrays = arrays
        self._maps = maps

    def array(self, limit: int, what: str) -> int:
        """The length of the array that comes next, refused above ``limit``."""
        length = self._header(self._unpacker.read_array_header, "an array", what)
        if length > limit:
            raise self._error(f"{what} has {length} items, more than {limit}")
        return length

    def items(
        self, limit: int, what: str, arrays_each: int = 0, arrays_besides: int = 0
    ) -> list[Any]:
        """The array that comes next (at most ``limit`` items), each item built whole
        and allowed ``arrays_each`` arrays, with ``arrays_besides`` more among them."""
        count = self.array(limit, what)
        self.allow(arrays=count * arrays_each + arrays_besides)
        items = self.values(count)
        self.allow()
        return items

    def fields(
        self, readers: Mapping[str, Callable[[BoundedUnpacker], Any]], what: str
    ) -> dict[Any, Any]:
        """The map that comes next, each field's value read by its reader. A field the
        format does not know is read whole with nothing allowed for it, for the caller
        to refuse along with missing ones."""
        count = self._header(self._unpacker.read_map_header, "a map", what)
        if count > len(readers):
            raise self._error(f"{what} must have exactly the fields {sorted(readers)}")
        fields: dict[Any, Any] = {}
        for _ in range(count):
            self.allow()
            key = self.value()
            if key in fields:
                raise self._error(f"{what} repeats the field {key!r}")
            read = readers.get(key) if isinstance(key, str) else None
            fields[key] = self.value() if read is None else read(self)
        return fields

    def value(self) -> Any:
        """The next value, built whole."""
        try:
            return self._unpacker.unpack()
        except self._error:
            raise
        except (ValueError, msgpack.UnpackException) as exc:
            raise self._malformed(exc) from None

    def values(self, count: int) -> list[Any]:
        """The next ``count`` values (an array's items), each built whole."""
        try:
            items = list(itertools.islice(self._unpacker, count))
        except self._error:
            raise
        except (ValueError, msgpack.UnpackException) as exc:
            raise self._malformed(exc) from None
        if len(items) != count:
            raise self._error(f"{self._what} ends early")
        return items

    def finish(self) -> None:
        """Refuse bytes after the document."""
        if self._unpacker.tell() != self._size:
            raise self._error(f"{self._what} has bytes after its end")

    def _header(self, read: Callable[[], int], kind: str, what: str) -> int:
        try:
            return read()
        except ValueError as exc:
            raise self._error(f"{what} must be {kind}; msgpack says: {exc}") from None
        except msgpack.UnpackException as exc:
            raise self._malformed(exc) from None

    def _malformed(self, exc: Exception) -> ValueError:
        if isinstance(exc, msgpack.StackError):
            return self._error(f"{self._what} nests too deeply")
        return self._error(f"{self._what} is not valid msgpack: {exc}")

    def _built_array(self, items: list[Any]) -> list[Any]:
        self._arrays -= 1
        if self._arrays < 0:
            raise self._error(f"{self._what} holds more arrays than its counts allow")
        return items

    def _built_map(self, pairs: dict[str, Any]) -> dict[str, Any]:
        self._maps -= 1
        if self._maps < 0:
            raise self._error(f"{self._what} holds more maps than its counts allow")
        return pairs
