"""The on-disk chunk cache on real filesystems: atomic writes, restarts, eviction, full disk.

The full-disk case uses a real 1 MiB tmpfs mounted for the test, so ENOSPC comes from
the kernel, not from a stand-in.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
from pathlib import Path

import pytest

from fetcher.chunk_cache import BLOCK, CacheFullError, ChunkCache, charged_size
from fetcher.memory_budget import MemoryBudget


def _digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


LAYER_A, LAYER_B, LAYER_C, LAYER_D = (_digest(x) for x in "abcd")


def test_put_read_and_accounting(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", max_bytes=1 << 20)
    data = os.urandom(5000)
    path = cache.put(LAYER_A, "c0001", data)
    assert path.read_bytes() == data
    assert cache.path(LAYER_A, "c0001") == path
    assert cache.read(LAYER_A, "c0001", 100, 50) == data[100:150]
    assert cache.read(LAYER_A, "c0001", 4990, 100) == data[4990:]
    assert cache.load(LAYER_A, "c0001") == data
    assert cache.size() == charged_size(5000) == 2 * BLOCK
    assert cache.read(LAYER_A, "c0002", 0, 10) is None
    assert cache.path(LAYER_B, "c0001") is None
    cache.put(LAYER_A, "c0001", data)  # already cached: no double charge
    stats = cache.stats()
    assert (stats.bytes, stats.layers, stats.chunks) == (2 * BLOCK, 1, 1)
    assert (stats.hits, stats.misses) == (3, 1)


@pytest.mark.parametrize("key", ["", "../escape", ".hidden", "a/b", "x" * 300])
def test_unsafe_keys_are_refused(tmp_path: Path, key: str) -> None:
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    with pytest.raises(ValueError):
        cache.put(LAYER_A, key, b"data")
    assert _files_under(tmp_path) == []


def test_bad_digest_is_refused(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    with pytest.raises(ValueError):
        cache.put("sha256:../../etc", "c1", b"data")


def test_cache_survives_a_new_instance_on_the_same_root(tmp_path: Path) -> None:
    first = ChunkCache(tmp_path, max_bytes=1 << 20)
    chunks = {(LAYER_A, "c1"): os.urandom(100), (LAYER_B, "c7"): os.urandom(9000)}
    for (digest, key), data in chunks.items():
        first.put(digest, key, data)
    second = ChunkCache(tmp_path, max_bytes=1 << 20)
    assert second.size() == first.size() == BLOCK + charged_size(9000)
    assert second.stats().layers == 2
    for (digest, key), data in chunks.items():
        assert second.load(digest, key) == data


def test_torn_temporary_files_are_never_served_and_are_removed(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    good = os.urandom(3000)
    chunk_path = cache.put(LAYER_A, "c1", good)
    size = cache.size()
    # What a crash mid-put or mid-eviction leaves behind, written by hand.
    (cache.tmp_dir / "0123456789abcdef").write_bytes(good[:1000])
    grave = cache.tmp_dir / "evicted-feed"
    grave.mkdir()
    (grave / "c9").write_bytes(b"half an eviction")
    stray = chunk_path.parent / ".c2.partial"
    stray.write_bytes(good[:10])

    reopened = ChunkCache(tmp_path, max_bytes=1 << 20)
    assert list(reopened.tmp_dir.iterdir()) == []
    assert not stray.exists()
    assert reopened.path(LAYER_A, "c2") is None
    assert reopened.size() == size
    assert reopened.load(LAYER_A, "c1") == good
    assert _files_under(tmp_path) == [chunk_path]


def _on_disk(root: Path, digest: str, key: str) -> bool:
    """Looks at the file itself: asking the cache would count as a use and change the LRU."""
    return (root / "sha256" / digest.split(":")[1] / key).is_file()


def test_eviction_is_lru_over_unpinned_layers_and_honours_the_cap(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, max_bytes=7 * BLOCK)
    cache.pin(LAYER_A)
    for layer in (LAYER_A, LAYER_B, LAYER_C):
        cache.put(layer, "c1", os.urandom(BLOCK))
        cache.put(layer, "c2", os.urandom(BLOCK))
    assert cache.size() == 6 * BLOCK
    assert cache.read(LAYER_B, "c1", 0, 1) is not None  # B is now used more recently than C

    cache.put(LAYER_D, "c1", os.urandom(BLOCK))
    cache.put(LAYER_D, "c2", os.urandom(BLOCK))  # 8 blocks > 7: the LRU unpinned layer goes
    assert not _on_disk(tmp_path, LAYER_C, "c1") and not _on_disk(tmp_path, LAYER_C, "c2")
    assert cache.path(LAYER_C, "c1") is None
    for layer in (LAYER_A, LAYER_B, LAYER_D):
        assert _on_disk(tmp_path, layer, "c1") and _on_disk(tmp_path, layer, "c2")
    assert cache.size() == 6 * BLOCK <= cache.max_bytes
    assert not (tmp_path / "sha256" / LAYER_C.split(":")[1]).exists()

    cache.max_bytes = 4 * BLOCK
    assert cache.evict() == 2 * BLOCK  # A is the oldest but pinned: B goes
    assert _on_disk(tmp_path, LAYER_A, "c1") and not _on_disk(tmp_path, LAYER_B, "c1")
    cache.unpin(LAYER_A)
    cache.max_bytes = 2 * BLOCK
    assert cache.evict() == 2 * BLOCK
    assert not _on_disk(tmp_path, LAYER_A, "c1") and _on_disk(tmp_path, LAYER_D, "c1")
    stats = cache.stats()
    assert (stats.evicted_layers, stats.evicted_bytes, stats.pinned_layers) == (3, 6 * BLOCK, 0)
    with pytest.raises(ValueError):
        cache.unpin(LAYER_A)


def test_the_cap_evicts_unpinned_layers_first_then_pinned_ones(tmp_path: Path) -> None:
    """Images stay pulled (their layers pinned) long after their containers exit: a cap
    that spared pinned layers would be no cap. Unpinned layers go first, then the
    oldest pinned ones; their data is fetched again when read."""
    cache = ChunkCache(tmp_path, max_bytes=4 * BLOCK)
    cache.pin(LAYER_A)
    cache.put(LAYER_A, "c1", os.urandom(BLOCK))
    cache.put(LAYER_A, "c2", os.urandom(BLOCK))
    cache.put(LAYER_C, "c1", os.urandom(BLOCK))
    cache.pin(LAYER_B)
    cache.put(LAYER_B, "c1", os.urandom(BLOCK))
    cache.put(LAYER_B, "c2", os.urandom(BLOCK))
    assert cache.path(LAYER_C, "c1") is None  # unpinned, although newer than A
    assert cache.path(LAYER_A, "c1") is not None
    cache.put(LAYER_B, "c3", os.urandom(BLOCK))
    assert cache.path(LAYER_A, "c1") is None  # then the oldest pinned layer
    assert cache.size() <= 4 * BLOCK


def test_one_layer_bigger_than_the_cap_keeps_its_newest_chunks(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, max_bytes=3 * BLOCK)
    cache.pin(LAYER_A)
    for n in range(1, 6):
        cache.put(LAYER_A, f"c{n}", os.urandom(BLOCK))
    kept = [n for n in range(1, 6) if cache.path(LAYER_A, f"c{n}") is not None]
    assert kept == [3, 4, 5]
    assert cache.size() == 3 * BLOCK


def test_concurrent_puts_and_evictions_keep_accounting_true_to_disk(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, max_bytes=40 * BLOCK)
    layers = [_digest(f"layer{i}") for i in range(6)]

    def writer(worker: int) -> None:
        for n in range(30):
            cache.put(layers[(worker + n) % len(layers)], f"w{worker}-{n}", os.urandom(BLOCK))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    on_disk = [p for p in _files_under(tmp_path) if p.parent != cache.tmp_dir]
    assert cache.size() == len(on_disk) * BLOCK
    assert cache.size() <= 40 * BLOCK + BLOCK * len(threads)
    assert ChunkCache(tmp_path, max_bytes=40 * BLOCK).size() == cache.size()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A real 1 MiB tmpfs, so the kernel itself answers ENOSPC."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_full_filesystem_raises_cache_full_and_leaves_nothing_partial(tiny_tmpfs: Path) -> None:
    cache = ChunkCache(tiny_tmpfs / "cache", max_bytes=64 << 20)
    first = os.urandom(512 << 10)
    cache.put(LAYER_A, "c1", first)
    cache.pin(LAYER_A)
    before = _files_under(tiny_tmpfs)

    with pytest.raises(CacheFullError) as caught:
        cache.put(LAYER_B, "big", os.urandom(2 << 20))  # larger than the filesystem
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(CacheFullError):
        cache.put(LAYER_B, "c1", os.urandom(700 << 10))  # would fit only without pinned A
    assert _files_under(tiny_tmpfs) == before
    assert cache.size() == charged_size(len(first))
    assert cache.path(LAYER_B, "c1") is None

    cache.unpin(LAYER_A)
    second = os.urandom(700 << 10)
    cache.put(LAYER_B, "c1", second)  # ENOSPC again, now A can be evicted to make room
    assert cache.path(LAYER_A, "c1") is None
    assert cache.load(LAYER_B, "c1") == second
    assert cache.size() == charged_size(len(second))
    assert list(cache.tmp_dir.iterdir()) == []


def test_chunks_a_full_disk_refuses_are_kept_in_the_shared_memory_budget(
    tiny_tmpfs: Path,
) -> None:
    memory = MemoryBudget(3 << 20)
    cache = ChunkCache(tiny_tmpfs / "cache", max_bytes=64 << 20, memory=memory)
    chunks = [os.urandom(2 << 20) for _ in range(2)]  # each larger than the filesystem
    for key, data in zip(("c0", "c1"), chunks, strict=True):
        with pytest.raises(CacheFullError):
            cache.put(LAYER_B, key, data)
    # Both do not fit in the budget: the older one made room for the newer.
    assert cache.load(LAYER_B, "c0") is None
    assert cache.load(LAYER_B, "c1") == chunks[1]
    assert memory.used == 2 << 20
    # What another buffer charged is not the spill's to take.
    assert memory.try_charge(1 << 20)
    with pytest.raises(CacheFullError):
        cache.put(LAYER_B, "c2", chunks[0])
    assert cache.load(LAYER_B, "c1") is None and cache.load(LAYER_B, "c2") == chunks[0]
    assert memory.used == 3 << 20


def test_no_rename_crosses_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cross-directory rename waits for the file system's rename lock, which an
    overlayfs copy-up holds while it waits for a FUSE answer: the cache must never make
    one (publishing, evicting layers, dropping a big layer's chunks)."""
    renames: list[tuple[Path, Path]] = []
    real_rename = os.rename

    def recording_rename(src: str | Path, dst: str | Path) -> None:
        renames.append((Path(src), Path(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", recording_rename)
    cache = ChunkCache(tmp_path, max_bytes=6 * BLOCK)
    for layer in (LAYER_A, LAYER_B, LAYER_C):
        for i in range(3):
            cache.put(layer, f"c{i}", os.urandom(BLOCK))
    for i in range(10):  # one layer bigger than the cap gives up its oldest chunks
        cache.put(LAYER_D, f"c{i}", os.urandom(BLOCK))
    assert cache.stats().evicted_layers >= 2
    assert renames, "eviction renames layer directories aside"
    assert [(s, d) for s, d in renames if s.parent != d.parent] == []
    assert cache.size() <= 6 * BLOCK


def test_reads_never_wait_for_a_chunk_being_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put stuck in the kernel while publishing (as behind a copy-up's rename lock)
    must not hold up reads, which the FUSE handlers make on the agent's event loop."""
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    cached = os.urandom(1000)
    cache.put(LAYER_A, "c1", cached)
    entered, release = threading.Event(), threading.Event()
    real_link = os.link

    def stuck_link(src: str | Path, dst: str | Path) -> None:
        entered.set()
        release.wait(30)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", stuck_link)
    writer = threading.Thread(target=cache.put, args=(LAYER_A, "c2", b"x" * 100))
    writer.start()
    try:
        assert entered.wait(10)
        answers: list[object] = []
        reader = threading.Thread(
            target=lambda: answers.extend(
                [
                    cache.read(LAYER_A, "c1", 0, 1000),
                    cache.load(LAYER_A, "c1"),
                    cache.contains(LAYER_A, "c2"),
                    cache.stats().chunks,
                ]
            )
        )
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "a read waited for the stuck publication"
        assert answers == [cached, cached, False, 1]
    finally:
        release.set()
        writer.join(10)
    assert cache.load(LAYER_A, "c2") == b"x" * 100


def test_a_symlinked_tmp_is_removed_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    root = tmp_path / "cache"
    root.mkdir()
    (root / "tmp").symlink_to(victim)
    cache = ChunkCache(root, max_bytes=1 << 20)
    assert (victim / "precious").read_text() == "keep me"
    assert cache.tmp_dir.is_dir() and not cache.tmp_dir.is_symlink()
    cache.put(LAYER_A, "c1", b"data")
    assert cache.load(LAYER_A, "c1") == b"data"


def test_an_existing_root_is_made_private(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)
    ChunkCache(root, max_bytes=1 << 20)
    assert root.stat().st_mode & 0o777 == 0o700


def test_entries_the_cache_did_not_write_are_left_alone(tmp_path: Path) -> None:
    """Stray directories, files and symlinks under the root neither stop the cache from
    opening nor get followed, served or deleted."""
    first = ChunkCache(tmp_path, max_bytes=1 << 20)
    first.put(LAYER_A, "c1", b"good")
    layer_dir = first.path(LAYER_A, "c1").parent  # type: ignore[union-attr]
    (layer_dir / ".stray-dir").mkdir()
    (layer_dir / ".stray-dir" / "inside").write_text("x")
    (layer_dir / "a-dir-named-like-a-chunk").mkdir()
    (tmp_path / "sha256" / "stray-file").write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c1").write_text("not a chunk")
    (tmp_path / "sha256" / LAYER_B.split(":")[1]).symlink_to(elsewhere)

    second = ChunkCache(tmp_path, max_bytes=1 << 20)
    assert second.load(LAYER_A, "c1") == b"good"
    assert second.load(LAYER_B, "c1") is None
    assert (layer_dir / ".stray-dir" / "inside").exists()
    assert (elsewhere / "c1").read_text() == "not a chunk"


def test_a_chunk_replaced_by_a_symlink_is_a_miss(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", max_bytes=1 << 20)
    chunk = cache.put(LAYER_A, "c1", b"good")
    secret = tmp_path / "secret"
    secret.write_text("node secret")
    chunk.unlink()
    chunk.symlink_to(secret)
    assert cache.read(LAYER_A, "c1", 0, 100) is None
    assert cache.load(LAYER_A, "c1") is None
