"""Forgeries: what someone with push rights can publish about an image they do not own.

They can push new artifacts, blobs and tags whose digests match their content; they
cannot change the image manifest an agent asks for by digest. So every document that
refers to the image (index-only artifacts, the full-mode twin and its eStargz TOCs,
referrers, profiles) is a claim, and each forgery here changes one such claim
structure-aware (decode, change a field, re-encode) on an `rig.publication.Edition`,
which recomputes every digest that names it. The primitives come first; `FORGERIES`
is the catalogue of forgery classes the adversarial test draws from, each a function
of three integer picks (which layer, entry, value) that says what it did.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack

from common.digest import sha256_digest
from fetcher import mediatypes as mt
from formats import layer_index, layer_index_codec
from formats.accelerated import ANNOTATION_LAYER_DIGEST, ANNOTATION_PREFETCH, ARTIFACT_TYPE_INDEX
from formats.estargz_toc import (
    FOOTER_SIZE,
    TAR_END_OF_ARCHIVE,
    TOC_DIGEST_ANNOTATION,
    TOC_TAR_NAME,
    footer_bytes,
    parse_footer,
    tar_padding,
)
from formats.gzip_index import compress_window, decompress_window, inflate_range
from formats.toc import TocEntry
from profiles.format import FileStat, Profile
from rig.hostile_registry import Document
from rig.publication import Edition, descriptor_of

# -- index-only artifacts --------------------------------------------------------------


class Unforgeable(Exception):
    """An earlier forgery of the plan left a layer's index unreadable to our parser, so
    a forgery that edits it as parsed cannot apply (the broken index is forged enough)."""


def _parsed(edition: Edition, layer: int) -> layer_index.LayerIndex:
    try:
        return layer_index_codec.parse(edition.index_blobs[layer])
    except layer_index.IndexFormatError as exc:
        raise Unforgeable(f"layer {layer}'s index no longer parses: {exc}") from None


def edit_index(
    edition: Edition, layer: int, edit: Callable[[layer_index.LayerIndex], None]
) -> None:
    """Re-publish layer ``layer``'s index after ``edit`` changed it (as parsed)."""
    index = _parsed(edition, layer)
    edit(index)
    index.source_digest = ""
    edition.index_blobs[layer] = layer_index_codec.serialize(index)


def edit_index_field(edition: Edition, layer: int, key: str, value: Any) -> None:
    """Re-publish layer ``layer``'s index with one top-level field of its msgpack map
    set to ``value`` (no check that it makes sense)."""
    document = msgpack.unpackb(edition.index_blobs[layer], raw=False)
    document[key] = value
    edition.index_blobs[layer] = msgpack.packb(document, use_bin_type=True)


def entries_of(edition: Edition, layer: int) -> list[TocEntry]:
    """The file table of layer ``layer``'s index as currently published."""
    return _parsed(edition, layer).entries


def shift_checkpoint(index: layer_index.LayerIndex, plain: bytes, number: int, delta: int) -> None:
    """Claim that checkpoint ``number`` yields uncompressed byte ``offset + delta`` next
    (inflating from it still yields the layer's bytes from the true offset), and sign
    the spans that now cover other bytes with digests of exactly those bytes. Piece
    digests are dropped (an index may fetch spans whole). ``plain`` is the uncompressed
    layer."""
    points = index.checkpoints
    true_starts = [p.uncompressed_offset for p in points]
    moved = points[number].uncompressed_offset + delta
    points[number] = dataclasses.replace(points[number], uncompressed_offset=moved)
    for span in range(len(points)):
        start, end = index.span_range(span)
        index.span_digests[span] = hashlib.sha256(
            plain[true_starts[span] : true_starts[span] + end - start]
        ).digest()
    index.piece_size, index.piece_digests, index.piece_ends = 0, [], []


def tamper_window(index: layer_index.LayerIndex, compressed: bytes, number: int) -> bool:
    """Replace checkpoint ``number``'s window (the history inflation resumes with) by
    other bytes and sign the span with the digest of what it now inflates to, pieces
    included. False when the span does not reach into its window (nothing changes)."""
    window = decompress_window(index.windows[number])
    if not window:
        return False
    forged = bytes(b ^ 0x5A for b in window)
    start, end = index.span_range(number)
    point = index.checkpoints[number]
    honest = inflate_range(point, window, compressed[point.compressed_offset :], start, end - start)
    inflated = inflate_range(
        point, forged, compressed[point.compressed_offset :], start, end - start
    )
    if inflated == honest:
        return False
    index.windows[number] = compress_window(forged)
    index.span_digests[number] = hashlib.sha256(inflated).digest()
    if index.piece_size:
        size = index.piece_size
        index.piece_digests[number] = [
            hashlib.sha256(inflated[i * size : (i + 1) * size]).digest()
            for i in range(len(index.piece_digests[number]))
        ]
    return True


@functools.cache
def uncompressed(layer: bytes) -> bytes:
    """A gzip layer's tar stream (kept: the same few layers are forged again and again)."""
    return gzip.decompress(layer)


# -- eStargz (the full-mode twin's layers) ----------------------------------------------


def _toc_json(blob: bytes) -> bytes:
    """The JSON bytes of an eStargz blob's TOC."""
    toc_offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
    member = gzip.decompress(blob[toc_offset:-FOOTER_SIZE])
    with tarfile.open(fileobj=io.BytesIO(member), mode="r:") as tar:
        info = tar.next()
        assert info is not None and info.name == TOC_TAR_NAME
        reader = tar.extractfile(info)
        assert reader is not None
        return reader.read()


def with_toc(blob: bytes, toc: dict[str, Any]) -> bytes:
    """The eStargz blob with its TOC member replaced by ``toc`` (and the footer moved)."""
    toc_offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
    toc_json = json.dumps(toc, indent="\t", ensure_ascii=False).encode()
    info = tarfile.TarInfo(TOC_TAR_NAME)
    info.size, info.mode = len(toc_json), 0o644
    tar = b"".join(
        (info.tobuf(tarfile.PAX_FORMAT), toc_json, tar_padding(len(toc_json)), TAR_END_OF_ARCHIVE)
    )
    return blob[:toc_offset] + gzip.compress(tar, mtime=0) + footer_bytes(toc_offset)


def forge_estargz(edition: Edition, position: int, blob: bytes) -> None:
    """Publish ``blob`` as the twin's layer ``position``, its descriptor and TOC digest
    annotation recomputed: the twin stays self-consistent."""
    descriptor = edition.twin_doc["layers"][position]
    descriptor.update(digest=sha256_digest(blob), size=len(blob))
    annotations = descriptor.setdefault("annotations", {})
    annotations[TOC_DIGEST_ANNOTATION] = sha256_digest(_toc_json(blob))
    edition.estargz[position] = blob


def toc_entries(edition: Edition, position: int) -> list[dict[str, Any]]:
    """The TOC records of the twin's layer ``position`` as currently published."""
    entries: list[dict[str, Any]] = json.loads(_toc_json(edition.estargz[position]))["entries"]
    return entries


def edit_toc(edition: Edition, position: int, edit: Callable[[list[dict[str, Any]]], None]) -> None:
    """Re-publish the twin's layer ``position`` with its TOC entries changed by ``edit``."""
    blob = edition.estargz[position]
    toc = json.loads(_toc_json(blob))
    edit(toc["entries"])
    forge_estargz(edition, position, with_toc(blob, toc))


# -- twin manifest, index artifact manifest, referrers, profiles -------------------------


def swap_twin_layers(edition: Edition, first: int, second: int) -> None:
    """The twin lists two of its layers in each other's place (its own blobs, each
    verified by its own TOC digest: nothing but the order is a lie)."""
    layers, blobs = edition.twin_doc["layers"], edition.estargz
    layers[first], layers[second] = layers[second], layers[first]
    blobs[first], blobs[second] = blobs[second], blobs[first]


def hostile_prefetch_paths() -> str:
    """A prefetch annotation that names what a layer must never serve or spend on."""
    return json.dumps(
        ["/../../etc/shadow", "/", "/bin/", "/" + "x" * 5000, "/big/large.bin", "//..//"]
        + [f"/no/such/file-{i}" for i in range(2000)]
    )


def bogus_descriptor(number: int, artifact_type: str = ARTIFACT_TYPE_INDEX) -> dict[str, Any]:
    """A referrer that names a manifest nobody pushed."""
    body = f"bogus referrer {number}".encode()
    return descriptor_of(body, mt.OCI_MANIFEST, artifactType=artifact_type)


def foreign_index_artifact(edition: Edition) -> Document:
    """An index artifact like the edition's, but whose subject is another image."""
    doc = json.loads(edition.index_artifact)
    doc["subject"]["digest"] = sha256_digest(b"another image")
    return Document(json.dumps(doc).encode(), mt.OCI_MANIFEST, "index")


def profile_files(profile: Profile, files: list[FileStat]) -> Profile:
    """``profile`` with ``files`` added, in the canonical order the format requires."""
    position = {layer: i for i, layer in enumerate(profile.layers)}
    merged = {(f.layer, f.path): f for f in (*profile.files, *files)}
    ordered = sorted(merged.values(), key=lambda f: (position.get(f.layer, 0), f.path))
    return dataclasses.replace(profile, files=tuple(ordered))


# -- the catalogue -------------------------------------------------------------------------

MODES = ("index", "twin", "full")
"""How the adversarial test pulls the image: ``index`` (the index-only artifact, found
through referrers), ``twin`` (the full-mode twin, found from the image's tag), ``full``
(the twin pulled as the image itself)."""


@dataclass(frozen=True)
class Forgery:
    """One forgery class and the picks that choose where it strikes."""

    label: str
    picks: tuple[int, int, int]

    def describe(self) -> str:
        return f"{self.label}{list(self.picks)}"


ForgeryFn = Callable[[Edition, int, int, int], str]
FORGERIES: dict[str, tuple[tuple[str, ...], ForgeryFn]] = {}


def forges(label: str, *modes: str) -> Callable[[ForgeryFn], ForgeryFn]:
    def register(function: ForgeryFn) -> ForgeryFn:
        FORGERIES[label] = (modes, function)
        return function

    return register


T = TypeVar("T")


def _first_layer(
    layers: int,
    items_of: Callable[[int], list[T]],
    start: int,
    wanted: Callable[[T], bool],
    count: int,
) -> tuple[int | None, list[T]]:
    """(layer number, matching items) of the first layer from ``start`` (cyclically)
    holding at least ``count`` items ``wanted`` accepts: forgeries start at a drawn layer
    so that every layer gets forged over a run, not only the first suitable one."""
    for step in range(layers):
        number = (start + step) % layers
        found = [item for item in items_of(number) if wanted(item)]
        if len(found) >= count:
            return number, found
    return None, []


def _layer_with(
    edition: Edition, start: int, wanted: Callable[[TocEntry], bool], count: int = 1
) -> tuple[int | None, list[TocEntry]]:
    """Index entries, through :func:`_first_layer`."""
    return _first_layer(
        len(edition.index_blobs), lambda n: entries_of(edition, n), start, wanted, count
    )


def _edit_entry(edition: Edition, layer: int, target: str, **changes: Any) -> None:
    def edit(index: Any) -> None:
        index.entries = [
            dataclasses.replace(e, **changes) if e.name == target else e for e in index.entries
        ]

    edit_index(edition, layer, edit)


def _regular(entry: TocEntry) -> bool:
    return entry.type == "reg" and entry.size > 0


@forges("index.table.swap-names", "index")
def _swap_names(edition: Edition, a: int, b: int, c: int) -> str:
    layer, files = _layer_with(edition, a, _regular, 2)
    if layer is None:
        return "no layer with two files"
    first, second = files[b % len(files)], files[(b + 1 + c % (len(files) - 1)) % len(files)]

    def edit(index: Any) -> None:
        names = {first.name: second.name, second.name: first.name}
        index.entries = [
            dataclasses.replace(e, name=names.get(e.name, e.name)) for e in index.entries
        ]

    edit_index(edition, layer, edit)
    return f"layer {layer}: {first.name} <-> {second.name}"


@forges("index.table.rename", "index")
def _rename(edition: Edition, a: int, b: int, c: int) -> str:
    layer, entries = _layer_with(edition, a, lambda e: e.type != "dir")
    if layer is None:
        return "nothing to rename"
    entry = entries[b % len(entries)]
    others = [e.name for e in entries_of(edition, layer) if e.name != entry.name]
    name = others[c % len(others)] if c % 2 and others else f"forged-{c}"
    _edit_entry(edition, layer, entry.name, name=name)
    return f"layer {layer}: {entry.name} -> {name}"


_MODES = (0o4755, 0o6777, 0o777, 0o000, 0o7777, 0o1777)


@forges("index.table.mode", "index")
def _mode(edition: Edition, a: int, b: int, c: int) -> str:
    layer, entries = _layer_with(edition, a, lambda e: True)
    assert layer is not None
    entry = entries[b % len(entries)]
    _edit_entry(edition, layer, entry.name, mode=_MODES[c % len(_MODES)])
    return f"layer {layer}: {entry.name} mode {_MODES[c % len(_MODES)]:o}"


_IDS = (0, 1000, 65534, (1 << 32) - 2)


@forges("index.table.owner", "index")
def _owner(edition: Edition, a: int, b: int, c: int) -> str:
    layer, entries = _layer_with(edition, a, lambda e: True)
    assert layer is not None
    entry = entries[b % len(entries)]
    uid, gid = _IDS[c % len(_IDS)], _IDS[(c // 4) % len(_IDS)]
    _edit_entry(edition, layer, entry.name, uid=uid, gid=gid)
    return f"layer {layer}: {entry.name} owner {uid}:{gid}"


@forges("index.table.type", "index")
def _type(edition: Edition, a: int, b: int, c: int) -> str:
    """An entry of another type, its other fields made to fit (a table that says so
    is well formed)."""
    layer, entries = _layer_with(edition, a, lambda e: True)
    assert layer is not None
    entry = entries[b % len(entries)]
    files = [e.name for e in entries if e.type == "reg" and e.name != entry.name]
    kind, changes = (
        ("reg", {"link_name": ""}),
        ("dir", {"size": 0, "link_name": ""}),
        ("symlink", {"size": 0, "link_name": "/etc/shadow"}),
        ("fifo", {"size": 0, "link_name": ""}),
        ("hardlink", {"size": 0, "link_name": files[c % len(files)] if files else ""}),
    )[c % 5]
    _edit_entry(edition, layer, entry.name, type=kind, **changes)
    return f"layer {layer}: {entry.name} {entry.type} -> {kind} {changes}"


@forges("index.table.link", "index")
def _link(edition: Edition, a: int, b: int, c: int) -> str:
    layer, links = _layer_with(edition, a, lambda e: e.type in ("symlink", "hardlink"))
    if layer is None:
        return "no links"
    entry = links[b % len(links)]
    names = [e.name for e in entries_of(edition, layer) if e.type == "reg"]
    targets = [*names, "/etc/shadow", "../../../etc/shadow"]
    target = targets[c % len(targets)]
    _edit_entry(edition, layer, entry.name, link_name=target)
    return f"layer {layer}: {entry.name} -> {target}"


_NUDGES = (1, -1, 511, -511, 512, -512, 4096, -4096, 1 << 20)


@forges("index.table.size", "index")
def _size(edition: Edition, a: int, b: int, c: int) -> str:
    layer, files = _layer_with(edition, a, _regular)
    assert layer is not None
    entry = files[b % len(files)]
    size = max(0, entry.size + _NUDGES[c % len(_NUDGES)])
    _edit_entry(edition, layer, entry.name, size=size)
    return f"layer {layer}: {entry.name} size {entry.size} -> {size}"


@forges("index.table.offset", "index")
def _offset(edition: Edition, a: int, b: int, c: int) -> str:
    layer, files = _layer_with(edition, a, _regular)
    assert layer is not None
    entry = files[b % len(files)]
    offset = max(0, entry.offset + _NUDGES[c % len(_NUDGES)])
    _edit_entry(edition, layer, entry.name, offset=offset)
    return f"layer {layer}: {entry.name} offset {entry.offset} -> {offset}"


_XATTRS: tuple[dict[str, bytes], ...] = (
    {"user.forged": b"1"},
    {"trusted.overlay.opaque": b"y"},
    {"security.capability": b"\x01\x00\x00\x02\xff\xff\xff\xff" + bytes(12)},
    {},
)


@forges("index.table.xattr", "index")
def _xattr(edition: Edition, a: int, b: int, c: int) -> str:
    layer, entries = _layer_with(edition, a, lambda e: True)
    assert layer is not None
    entry = entries[b % len(entries)]
    xattrs = _XATTRS[c % len(_XATTRS)]
    _edit_entry(edition, layer, entry.name, xattrs=dict(xattrs))
    return f"layer {layer}: {entry.name} xattrs {sorted(xattrs)}"


@forges("index.table.device", "index")
def _device(edition: Edition, a: int, b: int, c: int) -> str:
    layer, entries = _layer_with(edition, a, lambda e: e.type != "dir")
    assert layer is not None
    entry = entries[b % len(entries)]
    kind, major, minor = (("char", 1, 3), ("block", 8, 0), ("char", 0, 0))[c % 3]
    _edit_entry(
        edition,
        layer,
        entry.name,
        type=kind,
        size=0,
        link_name="",
        dev_major=major,
        dev_minor=minor,
    )
    return f"layer {layer}: {entry.name} -> {kind} {major}:{minor}"


@forges("index.table.drop", "index")
def _drop(edition: Edition, a: int, b: int, c: int) -> str:
    layer, entries = _layer_with(edition, a, lambda e: True)
    assert layer is not None
    gone = entries[b % len(entries)]

    def edit(index: Any) -> None:
        index.entries = [e for e in index.entries if e.name != gone.name]

    edit_index(edition, layer, edit)
    return f"layer {layer}: {gone.name} dropped"


@forges("index.table.whiteout", "index")
def _whiteout(edition: Edition, a: int, b: int, c: int) -> str:
    """A row that deletes a lower layer's file or directory (or makes one opaque)."""
    layers = len(edition.index_blobs)
    top = 1 + a % (layers - 1)
    below = entries_of(edition, (top - 1 - b % top) % top)
    victim = below[c % len(below)].name
    parent, _, base = victim.rpartition("/")
    name = f"{parent}/.wh.{base}".lstrip("/") if c % 3 else f"{victim}/.wh..wh..opq"

    def edit(index: Any) -> None:
        end = max((e.offset + e.size for e in index.entries), default=0)
        index.entries.append(TocEntry(name=name, type="reg", offset=end))

    edit_index(edition, top, edit)
    return f"layer {top}: + {name}"


@forges("index.table.append", "index")
def _append(edition: Edition, a: int, b: int, c: int) -> str:
    """A new file, as large as another, whose data starts where the table's last entry
    ends (two rows cannot share data: offsets only grow)."""
    layer, files = _layer_with(edition, a, _regular)
    assert layer is not None
    source = files[b % len(files)]

    def edit(index: Any) -> None:
        end = max(e.offset + e.size for e in index.entries)
        index.entries.append(
            dataclasses.replace(source, name=f"forged-{c}", offset=max(source.offset, end))
        )

    edit_index(edition, layer, edit)
    return f"layer {layer}: + forged-{c} ({source.size} bytes, after the last entry)"


_HEADER_EDITS: tuple[tuple[str, Callable[[Any, Edition, int], Any]], ...] = (
    ("uncompressed_size", lambda value, _e, _l: value + 1),
    ("uncompressed_size", lambda value, _e, _l: value - 1),
    ("compressed_size", lambda value, _e, _l: value + 1),
    ("span_size", lambda value, _e, _l: value * 2),
    ("layer_digest", lambda _v, e, layer: _other_layer_digest(e, layer)),
    ("media_type", lambda _v, _e, _l: "application/vnd.oci.image.layer.v1.tar"),
    ("version", lambda _v, _e, _l: 1),
    ("entry_count", lambda value, _e, _l: value + 1),
)


def _other_layer_digest(edition: Edition, layer: int) -> str:
    layers = edition.converted.manifest(edition.converted.image).layers
    return layers[(layer + 1) % len(layers)].digest


@forges("index.header", "index")
def _header(edition: Edition, a: int, b: int, c: int) -> str:
    layer = a % len(edition.index_blobs)
    key, change = _HEADER_EDITS[b % len(_HEADER_EDITS)]
    value = msgpack.unpackb(edition.index_blobs[layer], raw=False)[key]
    edit_index_field(edition, layer, key, change(value, edition, layer))
    return f"layer {layer}: {key} changed"


def _spanned(edition: Edition, start: int) -> int | None:
    """A layer whose index has at least two spans."""
    layers = len(edition.index_blobs)
    for step in range(layers):
        number = (start + step) % layers
        if len(_parsed(edition, number).checkpoints) >= 2:
            return number
    return None


@forges("index.spans.digest-swap", "index")
def _digest_swap(edition: Edition, a: int, b: int, c: int) -> str:
    layer = _spanned(edition, a)
    if layer is None:
        return "no layer with two spans"

    def edit(index: Any) -> None:
        count = len(index.span_digests)
        first, second = b % count, (b + 1 + c % (count - 1)) % count
        digests = index.span_digests
        digests[first], digests[second] = digests[second], digests[first]

    edit_index(edition, layer, edit)
    return f"layer {layer}"


_SHIFTS = (1, -1, 512, -512, 4096, -4096, 100_000)


@forges("index.spans.checkpoint-shift", "index")
def _checkpoint_shift(edition: Edition, a: int, b: int, c: int) -> str:
    """A checkpoint that claims to resume at another offset, every span digest signed
    to match what inflating from it really yields."""
    layer = _spanned(edition, a)
    if layer is None:
        return "no layer with two spans"
    plain = uncompressed(edition.converted.layers[layer])
    delta = _SHIFTS[c % len(_SHIFTS)]
    holder: dict[str, int] = {}

    def edit(index: Any) -> None:
        number = 1 + b % (len(index.checkpoints) - 1)
        holder["number"] = number
        shift_checkpoint(index, plain, number, delta)

    edit_index(edition, layer, edit)
    return f"layer {layer}: checkpoint {holder['number']} {delta:+d}, spans re-signed"


@forges("index.spans.window", "index")
def _window(edition: Edition, a: int, b: int, c: int) -> str:
    """A checkpoint's window (the history inflation resumes with) replaced, and its span
    (and pieces) signed with digests of what it now inflates to."""
    layer = _spanned(edition, a)
    if layer is None:
        return "no layer with two spans"
    compressed = edition.converted.layers[layer]
    done: list[int] = []

    def edit(index: Any) -> None:
        count = len(index.checkpoints)
        for step in range(count - 1):
            number = 1 + (b + step) % (count - 1)
            if tamper_window(index, compressed, number):
                done.append(number)
                return

    edit_index(edition, layer, edit)
    return f"layer {layer}: window {done[0]} re-signed" if done else "no span uses its window"


@forges("index.spans.no-pieces", "index")
def _no_pieces(edition: Edition, a: int, b: int, c: int) -> str:
    """Honest, another encoding: spans fetched whole only."""
    layer = a % len(edition.index_blobs)

    def edit(index: Any) -> None:
        index.piece_size, index.piece_digests, index.piece_ends = 0, [], []

    edit_index(edition, layer, edit)
    return f"layer {layer}"


@forges("index.spans.piece-end", "index")
def _piece_end(edition: Edition, a: int, b: int, c: int) -> str:
    layers = len(edition.index_blobs)
    for step in range(layers):
        layer = (a + step) % layers
        index = _parsed(edition, layer)
        spans = [n for n, ends in enumerate(index.piece_ends) if ends]
        if spans:
            break
    else:
        return "no pieces"
    span = spans[b % len(spans)]
    nudge = (-1, 1, -1000)[c % 3]

    def edit(index: Any) -> None:
        ends = index.piece_ends[span]
        ends[c % len(ends)] += nudge

    edit_index(edition, layer, edit)
    return f"layer {layer}: span {span} piece end {nudge:+d}"


@forges("index.manifest.layer-annotation", "index")
def _layer_annotation(edition: Edition, a: int, b: int, c: int) -> str:
    layers = edition.index_doc["layers"]
    first, second = a % len(layers), (a + 1 + b % (len(layers) - 1)) % len(layers)
    one, other = layers[first]["annotations"], layers[second]["annotations"]
    one[ANNOTATION_LAYER_DIGEST], other[ANNOTATION_LAYER_DIGEST] = (
        other[ANNOTATION_LAYER_DIGEST],
        one[ANNOTATION_LAYER_DIGEST],
    )
    return f"index blobs {first} <-> {second}"


@forges("index.manifest.prefetch", "index")
def _index_prefetch(edition: Edition, a: int, b: int, c: int) -> str:
    edition.index_doc.setdefault("annotations", {})[ANNOTATION_PREFETCH] = hostile_prefetch_paths()
    return "hostile prefetch list"


# referrers


Descriptors = list[dict[str, Any]]
ReferrersEdit = Callable[[Descriptors, Edition, int], Descriptors]


def _referrers(label: str, *modes: str) -> Callable[[ReferrersEdit], ReferrersEdit]:
    """Register an edit of the listed referrers (of every subject) as a forgery class."""

    def register(edit: ReferrersEdit) -> ReferrersEdit:
        def apply(edition: Edition, a: int, b: int, c: int) -> str:
            edition.referrer_edits.append(lambda listed, e: edit(listed, e, a))
            return ""

        forges(label, *modes)(apply)
        return edit

    return register


@_referrers("referrers.bogus-first", "index")
def _bogus_first(listed: Descriptors, edition: Edition, pick: int) -> Descriptors:
    return [bogus_descriptor(pick), *listed]


@_referrers("referrers.bogus-many", "index")
def _bogus_many(listed: Descriptors, edition: Edition, pick: int) -> Descriptors:
    return listed + [bogus_descriptor(pick + i) for i in range(30)]


@_referrers("referrers.foreign-subject", "index")
def _foreign_subject(listed: Descriptors, edition: Edition, pick: int) -> Descriptors:
    foreign = foreign_index_artifact(edition)
    edition.extra_documents[foreign.digest] = foreign
    kind = listed[0].get("artifactType") if listed else None
    return [descriptor_of(foreign.body, foreign.media_type, artifactType=kind), *listed]


@_referrers("referrers.duplicate", *MODES)
def _duplicate(listed: Descriptors, edition: Edition, pick: int) -> Descriptors:
    return listed * 3


@_referrers("referrers.hidden", *MODES)
def _hidden(listed: Descriptors, edition: Edition, pick: int) -> Descriptors:
    return []


@_referrers("referrers.wrong-type", *MODES)
def _wrong_type(listed: Descriptors, edition: Edition, pick: int) -> Descriptors:
    return [{**d, "artifactType": "application/vnd.example.other"} for d in listed]


@forges("referrers.api", *MODES)
def _referrers_api(edition: Edition, a: int, b: int, c: int) -> str:
    edition.referrers_api = True
    return "answered by the referrers API"


# the full-mode twin


@forges("twin.layers.swap", "twin")
def _twin_swap(edition: Edition, a: int, b: int, c: int) -> str:
    count = len(edition.estargz)
    first, second = a % count, (a + 1 + b % (count - 1)) % count
    swap_twin_layers(edition, first, second)
    return f"layers {first} <-> {second}"


@forges("twin.layers.substitute", "twin")
def _twin_substitute(edition: Edition, a: int, b: int, c: int) -> str:
    count = len(edition.estargz)
    into, source = a % count, (a + 1 + b % (count - 1)) % count
    forge_estargz(edition, into, edition.estargz[source])
    return f"layer {into} := layer {source}"


@forges("twin.source", "twin")
def _twin_source(edition: Edition, a: int, b: int, c: int) -> str:
    edition.twin_source = ("", "sha256:" + "0" * 64, sha256_digest(b"x"))[a % 3]
    return f"source {edition.twin_source!r}"


@forges("twin.toc-annotation", "twin")
def _twin_toc_annotation(edition: Edition, a: int, b: int, c: int) -> str:
    layer = a % len(edition.estargz)
    annotations = edition.twin_doc["layers"][layer].setdefault("annotations", {})
    if b % 2:
        annotations.pop(TOC_DIGEST_ANNOTATION, None)
        return f"layer {layer}: no TOC digest"
    annotations[TOC_DIGEST_ANNOTATION] = sha256_digest(b"another toc")
    return f"layer {layer}: another TOC digest"


@forges("twin.size", "twin")
def _twin_size(edition: Edition, a: int, b: int, c: int) -> str:
    layer = a % len(edition.estargz)
    nudge = _NUDGES[b % len(_NUDGES)]
    edition.twin_doc["layers"][layer]["size"] += nudge
    return f"layer {layer}: size {nudge:+d}"


@forges("twin.prefetch", "twin")
def _twin_prefetch(edition: Edition, a: int, b: int, c: int) -> str:
    edition.twin_doc.setdefault("annotations", {})[ANNOTATION_PREFETCH] = hostile_prefetch_paths()
    return "hostile prefetch list"


def _toc_records(
    edition: Edition, start: int, wanted: Callable[[dict[str, Any]], bool], count: int = 1
) -> tuple[int | None, list[dict[str, Any]]]:
    """Twin layers' TOC records, through :func:`_first_layer`."""
    return _first_layer(
        len(edition.estargz), lambda n: toc_entries(edition, n), start, wanted, count
    )


def _toc_edit(edition: Edition, layer: int, target: str, **changes: Any) -> None:
    def edit(records: list[dict[str, Any]]) -> None:
        for record in records:
            if record.get("name") == target:
                record.update(changes)

    edit_toc(edition, layer, edit)


def _has_chunk(record: dict[str, Any]) -> bool:
    return record.get("type") == "reg" and record.get("size", 0) > 0 and "chunkOffset" not in record


@forges("toc.rename", "twin")
def _toc_rename(edition: Edition, a: int, b: int, c: int) -> str:
    layer, records = _toc_records(edition, a, lambda r: r.get("type") == "reg")
    assert layer is not None
    record = records[b % len(records)]
    _toc_edit(edition, layer, record["name"], name=f"forged-{c}")
    return f"layer {layer}: {record['name']} -> forged-{c}"


@forges("toc.mode", "twin")
def _toc_mode(edition: Edition, a: int, b: int, c: int) -> str:
    layer, records = _toc_records(edition, a, lambda r: r.get("type") in ("reg", "dir"))
    assert layer is not None
    record = records[b % len(records)]
    _toc_edit(edition, layer, record["name"], mode=_MODES[c % len(_MODES)])
    return f"layer {layer}: {record['name']} mode {_MODES[c % len(_MODES)]:o}"


@forges("toc.owner", "twin")
def _toc_owner(edition: Edition, a: int, b: int, c: int) -> str:
    layer, records = _toc_records(edition, a, lambda r: True)
    assert layer is not None
    record = records[b % len(records)]
    _toc_edit(edition, layer, record["name"], uid=_IDS[c % len(_IDS)], gid=_IDS[c % len(_IDS)])
    return f"layer {layer}: {record['name']} owner {_IDS[c % len(_IDS)]}"


@forges("toc.chunk-swap", "twin")
def _toc_chunk_swap(edition: Edition, a: int, b: int, c: int) -> str:
    """Two single-chunk files each given the other's chunk (offsets and digests
    included: every chunk still checks out)."""
    layer, records = _toc_records(edition, a, _has_chunk, 2)
    if layer is None:
        return "no two single-chunk files"
    first = records[b % len(records)]
    second = records[(b + 1 + c % (len(records) - 1)) % len(records)]
    keys = ("size", "offset", "innerOffset", "chunkSize", "chunkDigest", "digest")

    def edit(records: list[dict[str, Any]]) -> None:
        one = next(r for r in records if r.get("name") == first["name"])
        two = next(r for r in records if r.get("name") == second["name"])
        for key in keys:
            a_value, b_value = one.pop(key, None), two.pop(key, None)
            if b_value is not None:
                one[key] = b_value
            if a_value is not None:
                two[key] = a_value

    edit_toc(edition, layer, edit)
    return f"layer {layer}: {first['name']} <-> {second['name']}"


@forges("toc.whiteout", "twin")
def _toc_whiteout(edition: Edition, a: int, b: int, c: int) -> str:
    layers = len(edition.estargz)
    top = 1 + a % (layers - 1)
    below = toc_entries(edition, (top - 1 - b % top) % top)
    names = [r["name"].rstrip("/") for r in below if r.get("name")]
    victim = names[c % len(names)]
    parent, _, base = victim.rpartition("/")
    name = f"{parent}/.wh.{base}".lstrip("/")

    def edit(records: list[dict[str, Any]]) -> None:
        records.append({"name": name, "type": "reg", "modtime": "2023-11-14T22:13:20Z"})

    edit_toc(edition, top, edit)
    return f"layer {top}: + {name}"


@forges("toc.drop", "twin")
def _toc_drop(edition: Edition, a: int, b: int, c: int) -> str:
    layer, records = _toc_records(edition, a, lambda r: r.get("type") != "chunk")
    assert layer is not None
    gone = records[b % len(records)]["name"]

    def edit(records: list[dict[str, Any]]) -> None:
        records[:] = [r for r in records if r.get("name") != gone]

    edit_toc(edition, layer, edit)
    return f"layer {layer}: {gone} dropped"


# profiles


ProfileEdit = Callable[[Profile, int], Profile]


def _profile(label: str, *modes: str) -> Callable[[ProfileEdit], ProfileEdit]:
    """Register an edit of the learned profile (of every subject) as a forgery class."""

    def register(edit: ProfileEdit) -> ProfileEdit:
        def apply(edition: Edition, a: int, b: int, c: int) -> str:
            edition.profile_edits.append(lambda profile: edit(profile, a))
            return ""

        forges(label, *modes)(apply)
        return edit

    return register


@_profile("profile.huge-ranges", *MODES)
def _huge_ranges(profile: Profile, pick: int) -> Profile:
    files = tuple(
        dataclasses.replace(f, coverage=((0, 1 << (30 + pick % 12), f.runs),))
        for f in profile.files
    )
    return dataclasses.replace(profile, files=files)


@_profile("profile.many-files", *MODES)
def _many_files(profile: Profile, pick: int) -> Profile:
    start = profile.files[0].first_access
    extra = [
        FileStat(
            profile.layers[i % len(profile.layers)], f"no/such/f{i}", 1, ((0, 4096, 1),), start
        )
        for i in range(3000)
    ]
    return profile_files(profile, extra)


@_profile("profile.every-file", *MODES)
def _every_file(profile: Profile, pick: int) -> Profile:
    """Everything, whole: prefetch that competes with every demand read."""
    start = profile.files[0].first_access
    paths = ("bin/busybox", "big/large.bin", "features/plain.txt", "lower/kept.txt")
    extra = [
        FileStat(layer, path, 1, ((0, 1 << 40, 1),), start)
        for layer in profile.layers
        for path in paths
    ]
    return profile_files(profile, extra)


@_profile("profile.reversed-layers", *MODES)
def _reversed_layers(profile: Profile, pick: int) -> Profile:
    return dataclasses.replace(profile, layers=tuple(reversed(profile.layers)))


@_profile("profile.other-image", *MODES)
def _other_image(profile: Profile, pick: int) -> Profile:
    return dataclasses.replace(profile, image=sha256_digest(b"another image"))
