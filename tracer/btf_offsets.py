"""Kernel struct field offsets read from the running kernel's BTF.

The tracer walks kernel structs (task -> files -> file -> dentry...) with
bpf_probe_read_kernel, and the layout of those structs changes between kernel builds:
Debian's 6.1 headers put task_struct.nsproxy 1200 bytes away from where this kernel has
it. /sys/kernel/btf/vmlinux describes the exact layout of the running kernel, so every
offset the BPF program uses is computed here at load time and compiled in as a constant.
Parsing the blob in Python keeps bpftool out of the dependency list.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

_BTF_MAGIC = 0xEB9F

# BTF_KIND_* values from the kernel's uapi btf.h.
_KIND_INT = 1
_KIND_PTR = 2
_KIND_ARRAY = 3
_KIND_STRUCT = 4
_KIND_UNION = 5
_KIND_ENUM = 6
_KIND_TYPEDEF = 8
_KIND_VOLATILE = 9
_KIND_CONST = 10
_KIND_RESTRICT = 11
_KIND_FUNC_PROTO = 13
_KIND_VAR = 14
_KIND_DATASEC = 15
_KIND_DECL_TAG = 17
_KIND_TYPE_TAG = 18
_KIND_ENUM64 = 19

# Bytes that follow the 12-byte common header, per kind: fixed part + per-member part.
_EXTRA_FIXED = {_KIND_INT: 4, _KIND_ARRAY: 12, _KIND_VAR: 4, _KIND_DECL_TAG: 4}
_EXTRA_PER_MEMBER = {
    _KIND_STRUCT: 12,
    _KIND_UNION: 12,
    _KIND_ENUM: 8,
    _KIND_FUNC_PROTO: 8,
    _KIND_DATASEC: 12,
    _KIND_ENUM64: 12,
}
_QUALIFIERS = {_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT, _KIND_TYPE_TAG}


class BTFError(Exception):
    """The BTF blob is missing, malformed, or lacks a struct/field the tracer needs."""


class _Type(NamedTuple):
    kind: int
    name_off: int
    kind_flag: bool
    vlen: int
    size_or_type: int
    body: int  # offset of the kind-specific data inside the type section


@dataclass(frozen=True)
class Member:
    """A struct member as the tracer needs it: where it is and how big it is."""

    offset: int  # bytes from the start of the outermost struct asked about
    size: int


class KernelBTF:
    """Index of a BTF blob: types by id, structs/unions by name, resolved lazily."""

    def __init__(self, blob: bytes) -> None:
        if len(blob) < 24:
            raise BTFError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != _BTF_MAGIC:
            raise BTFError(f"bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        self._types_bytes = blob[hdr_len + type_off : hdr_len + type_off + type_len]
        self._strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
        self._starts: list[int] = [0]  # type id 0 is void and has no record
        self._by_name: dict[str, int] = {}
        self._index()

    @classmethod
    def from_running_kernel(cls, path: Path = VMLINUX_BTF) -> KernelBTF:
        try:
            return cls(path.read_bytes())
        except OSError as exc:
            raise BTFError(f"cannot read {path}: {exc}") from exc

    def _index(self) -> None:
        """Record where each type starts; types are decoded only when asked for, which
        keeps this one pass over ~130k types cheap."""
        data = self._types_bytes
        unpack = struct.Struct("<III").unpack_from
        fixed = [_EXTRA_FIXED.get(k, 0) for k in range(32)]
        per_member = [_EXTRA_PER_MEMBER.get(k, 0) for k in range(32)]
        starts = self._starts
        pos = 0
        end = len(data)
        while pos < end:
            starts.append(pos)
            name_off, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            if kind in (_KIND_STRUCT, _KIND_UNION) and name_off:
                # The first definition wins: a name is unique for vmlinux structs.
                self._by_name.setdefault(self._name(name_off), len(starts) - 1)
            pos += 12 + fixed[kind] + (info & 0xFFFF) * per_member[kind]

    def _type(self, type_id: int) -> _Type | None:
        if type_id == 0:
            return None  # void
        pos = self._starts[type_id]
        name_off, info, size_or_type = struct.unpack_from("<III", self._types_bytes, pos)
        return _Type(
            (info >> 24) & 0x1F, name_off, bool(info >> 31), info & 0xFFFF, size_or_type, pos + 12
        )

    def _name(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _resolve(self, type_id: int) -> int:
        """Strip typedefs and qualifiers, which do not change the layout."""
        t = self._type(type_id)
        while t is not None and t.kind in _QUALIFIERS:
            type_id = t.size_or_type
            t = self._type(type_id)
        return type_id

    def _size(self, type_id: int) -> int:
        type_id = self._resolve(type_id)
        t = self._type(type_id)
        if t is None:
            return 0
        if t.kind == _KIND_PTR:
            return 8
        if t.kind == _KIND_ARRAY:
            elem, _index_type, nelems = struct.unpack_from("<III", self._types_bytes, t.body)
            return self._size(elem) * nelems
        return t.size_or_type

    def _members(self, type_id: int) -> list[tuple[str, int, int]]:
        """(name, type id, byte offset) of each direct member; bitfields are skipped."""
        t = self._type(type_id)
        assert t is not None
        out = []
        for i in range(t.vlen):
            name_off, mtype, raw = struct.unpack_from("<III", self._types_bytes, t.body + 12 * i)
            bit_off = raw & 0xFFFFFF if t.kind_flag else raw
            bitfield = t.kind_flag and (raw >> 24) != 0
            if bit_off % 8 or bitfield:
                continue
            out.append((self._name(name_off) if name_off else "", mtype, bit_off // 8))
        return out

    def _find_member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(type id, offset) of `name`, looking inside anonymous structs/unions too."""
        for mname, mtype, off in self._members(type_id):
            if mname == name:
                return mtype, off
            if not mname:
                inner = self._resolve(mtype)
                t = self._type(inner)
                if t is not None and t.kind in (_KIND_STRUCT, _KIND_UNION):
                    found = self._find_member(inner, name)
                    if found is not None:
                        return found[0], off + found[1]
        return None

    def struct_size(self, struct_name: str) -> int:
        return self._size(self._struct_id(struct_name))

    def _struct_id(self, struct_name: str) -> int:
        try:
            return self._by_name[struct_name]
        except KeyError:
            raise BTFError(f"struct {struct_name} not in kernel BTF") from None

    def member(self, struct_name: str, dotted: str) -> Member:
        """Offset of e.g. ("file", "f_path.dentry"): nested members sum their offsets."""
        type_id = self._struct_id(struct_name)
        total = 0
        for part in dotted.split("."):
            found = self._find_member(self._resolve(type_id), part)
            if found is None:
                raise BTFError(f"struct {struct_name} has no member {dotted}")
            type_id, off = found
            total += off
        return Member(offset=total, size=self._size(type_id))
