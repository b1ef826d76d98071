"""Profile sharing against the real registry (distribution 2.8, no referrers API, so the
tag-schema index is in play): push/fetch, many concurrent writers (tasks and processes),
a writer with a stale view of the index, compaction and pruning, hostile artifacts."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.digest import sha256_digest
from fetcher import mediatypes as mt
from fetcher.errors import NotFoundError
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient, referrers_tag
from formats.accelerated import ARTIFACT_TYPE_PROFILE, EMPTY_JSON, MEDIA_TYPE_PROFILE
from profiles.format import serialize
from profiles.learn import from_trace, learn
from profiles.registry_sync import (
    PublishPolicy,
    compact,
    fetch_profile,
    push_run_profile,
)
from profiles.trace import FileAccess, Outcome, RunTrace
from rig.images import BuiltImage
from rig.registry import RegistryServer
from tests.fixtures.images import ImagePusher

FAST = PublishPolicy(settle=0.3, check_interval=0.1)
REPO_ROOT = Path(__file__).resolve().parents[1]
START = 1_700_000_000_000_000_000


@dataclass(frozen=True)
class Subject:
    """An image pushed to a repository of its own, so tests never see each other's
    profiles."""

    ref: ImageReference
    digest: str
    layers: tuple[str, ...]


@pytest.fixture
async def subject(image_pusher: ImagePusher, built_busybox: BuiltImage, repo_name: str) -> Subject:
    pushed = await image_pusher.push(built_busybox, repository=repo_name)
    layers = tuple(layer.digest for layer in built_busybox.layers)
    return Subject(ImageReference.parse(pushed.reference), pushed.digest, layers)


def trace_for(digest: str, layers: tuple[str, ...], node: str, index: int) -> RunTrace:
    """A start of the image on ``node``: shared files plus one file only this run read."""
    top = layers[-1]
    accesses = (
        FileAccess(top, "/bin/busybox", ((0, 65536), (index * 4096, index * 4096 + 100)), 1_000),
        FileAccess(top, "/etc/passwd", ((0, 200),), 3_000 + index),
        FileAccess(top, f"/tmp/run-{node}-{index}", ((0, 10),), 9_000),
    )
    sources = frozenset({"fuse"}) if index % 3 == 0 else frozenset({"ebpf"})
    return RunTrace(
        digest, layers, accesses, Outcome.OK, node, sources, "ebpf" in sources, START + index
    )


def client_for(registry: RegistryServer) -> RegistryClient:
    return RegistryClient(plain_http_hosts={registry.host})


async def test_push_then_fetch_round_trip(registry: RegistryServer, subject: Subject) -> None:
    async with client_for(registry) as client:
        assert await fetch_profile(client, subject.ref, subject.digest) is None
        profile = learn([trace_for(subject.digest, subject.layers, "node-a", i) for i in (1, 2)])
        published = await push_run_profile(client, subject.ref, profile, FAST)
        assert await fetch_profile(client, subject.ref, subject.digest) == profile
        listed = await client.referrers(subject.ref, subject.digest, ARTIFACT_TYPE_PROFILE)
        assert [d.digest for d in listed] == [published.digest]
        again = await push_run_profile(client, subject.ref, profile, FAST)
        assert again.digest == published.digest  # a retried push is one artifact
        assert await fetch_profile(client, subject.ref, subject.digest) == profile


async def _push_one(registry: RegistryServer, subject: Subject, node: str, index: int) -> str:
    trace = trace_for(subject.digest, subject.layers, node, index)
    async with client_for(registry) as client:
        published = await push_run_profile(client, subject.ref, from_trace(trace), FAST)
    return published.digest


async def test_concurrent_tasks_lose_no_upload(registry: RegistryServer, subject: Subject) -> None:
    nodes = [(f"node-{i}", i) for i in range(8)]
    digests = await asyncio.gather(*(_push_one(registry, subject, n, i) for n, i in nodes))
    assert len(set(digests)) == 8
    expected = learn([trace_for(subject.digest, subject.layers, n, i) for n, i in nodes])
    async with client_for(registry) as client:
        listed = await client.referrers(subject.ref, subject.digest, ARTIFACT_TYPE_PROFILE)
        assert {d.digest for d in listed} == set(digests)
        merged = await fetch_profile(client, subject.ref, subject.digest)
    assert merged == expected
    assert merged.runs.count == 8


CHILD = """
import asyncio, sys
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from profiles.format import parse
from profiles.registry_sync import PublishPolicy, push_run_profile

async def main():
    ref, profile = ImageReference.parse(sys.argv[1]), parse(bytes.fromhex(sys.argv[2]))
    print("ready", flush=True)
    sys.stdin.readline()
    async with RegistryClient(plain_http_hosts={ref.registry}) as client:
        policy = PublishPolicy(settle=0.3, check_interval=0.1)
        published = await push_run_profile(client, ref, profile, policy)
    print("pushed", published.digest, flush=True)

asyncio.run(main())
"""


async def _wait_for_line(child: asyncio.subprocess.Process, word: str) -> str:
    assert child.stdout is not None
    async with asyncio.timeout(30):
        while line := (await child.stdout.readline()).decode():
            if line.split(" ")[0].strip() == word:
                return line.strip()
    raise AssertionError(f"child exited without saying {word!r}")


async def test_concurrent_processes_and_tasks_lose_no_upload(
    registry: RegistryServer, subject: Subject, tmp_path: Path
) -> None:
    """3 processes (each its own interpreter and connection pool) and 4 tasks push at the
    same moment; every one of the 7 runs is in the merged profile."""
    proc_traces = [trace_for(subject.digest, subject.layers, f"proc-{i}", i) for i in range(3)]
    task_runs = [(f"task-{i}", 10 + i) for i in range(4)]
    children: list[asyncio.subprocess.Process] = []
    try:
        for index, trace in enumerate(proc_traces):
            children.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    CHILD,
                    str(subject.ref),
                    serialize(from_trace(trace)).hex(),
                    cwd=REPO_ROOT,
                    env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=(tmp_path / f"child-{index}.err").open("wb"),
                )
            )
        for child in children:
            await _wait_for_line(child, "ready")
        for child in children:  # start line: all writers begin together
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            await child.stdin.drain()
        task_digests = await asyncio.gather(
            *(_push_one(registry, subject, n, i) for n, i in task_runs)
        )
        process_digests = [(await _wait_for_line(c, "pushed")).split()[1] for c in children]
        for index, child in enumerate(children):
            err = (tmp_path / f"child-{index}.err").read_text()[-3000:]
            assert await child.wait() == 0, err
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
    expected = learn(
        proc_traces + [trace_for(subject.digest, subject.layers, n, i) for n, i in task_runs]
    )
    async with client_for(registry) as client:
        listed = await client.referrers(subject.ref, subject.digest, ARTIFACT_TYPE_PROFILE)
        assert {d.digest for d in listed} == set(task_digests + process_digests)
        assert await fetch_profile(client, subject.ref, subject.digest) == expected


async def test_stale_index_writer_cannot_drop_a_profile(
    registry: RegistryServer, subject: Subject
) -> None:
    """A writer that read the index before our push keeps writing its old copy back:
    exactly the lost update of concurrent read-modify-write. The entry must survive."""
    seed = from_trace(trace_for(subject.digest, subject.layers, "seed", 1))
    mine = from_trace(trace_for(subject.digest, subject.layers, "mine", 2))
    tag_ref = subject.ref.with_tag(referrers_tag(subject.digest))
    async with client_for(registry) as client, client_for(registry) as stale_client:
        await push_run_profile(client, subject.ref, seed, FAST)
        stale = (await client.get_manifest(tag_ref, accept=mt.OCI_INDEX)).body
        stop = asyncio.Event()
        stale_writes = 0

        async def stale_writer() -> None:
            nonlocal stale_writes
            while not stop.is_set():
                await stale_client.push_manifest(tag_ref, stale, mt.OCI_INDEX)
                stale_writes += 1
                await asyncio.sleep(0.04)

        async def stop_later() -> None:
            await asyncio.sleep(0.8)
            stop.set()

        writer = asyncio.create_task(stale_writer())
        stopper = asyncio.create_task(stop_later())
        try:
            published = await push_run_profile(client, subject.ref, mine, FAST)
        finally:
            stop.set()
            await writer
            stopper.cancel()
        assert stale_writes >= 10
        assert published.repairs >= 1  # the stale writer did drop our entry...
        merged = await fetch_profile(client, subject.ref, subject.digest)  # ...and it is back
        assert merged == learn(
            [trace_for(subject.digest, subject.layers, n, i) for n, i in (("seed", 1), ("mine", 2))]
        )


async def test_compaction_keeps_every_run(registry: RegistryServer, subject: Subject) -> None:
    traces = [trace_for(subject.digest, subject.layers, f"node-{i}", i) for i in range(6)]
    async with client_for(registry) as client:

        async def push(trace: RunTrace) -> str:
            return (await push_run_profile(client, subject.ref, from_trace(trace), FAST)).digest

        leaves = await asyncio.gather(*(push(t) for t in traces[:4]))
        first = await compact(client, subject.ref, subject.digest, policy=FAST)
        assert first.merged == 4 and first.deleted == ()
        assert await fetch_profile(client, subject.ref, subject.digest) == learn(traces[:4])

        # Compact again (pruning what the first compaction absorbed) while two more runs
        # are being pushed: whatever the interleaving, every run counts exactly once.
        second, *_ = await asyncio.gather(
            compact(client, subject.ref, subject.digest, prune_grace=0, policy=FAST),
            push(traces[4]),
            push(traces[5]),
        )
        assert set(second.deleted) == set(leaves)
        for digest in leaves:
            with pytest.raises(NotFoundError):
                await client.get_manifest(subject.ref.with_digest(digest))
        assert await fetch_profile(client, subject.ref, subject.digest) == learn(traces)

        # Further compactions prune what the earlier ones absorbed, down to one artifact.
        for _ in range(4):
            await compact(client, subject.ref, subject.digest, prune_grace=0, policy=FAST)
            assert await fetch_profile(client, subject.ref, subject.digest) == learn(traces)
            listed = await client.referrers(subject.ref, subject.digest, ARTIFACT_TYPE_PROFILE)
            if len(listed) == 1:
                break
    assert len(listed) == 1
    assert listed[0].digest not in [*leaves, first.digest]


async def _push_raw_artifact(client: RegistryClient, subject: Subject, blob: bytes) -> str:
    fetched = await client.get_manifest(subject.ref.with_digest(subject.digest))
    await client.push_blob(subject.ref, blob)
    await client.push_blob(subject.ref, EMPTY_JSON)
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE_PROFILE,
        "config": {"mediaType": mt.OCI_EMPTY, "digest": sha256_digest(EMPTY_JSON), "size": 2},
        "layers": [
            {"mediaType": MEDIA_TYPE_PROFILE, "digest": sha256_digest(blob), "size": len(blob)}
        ],
        "subject": {
            "mediaType": fetched.media_type,
            "digest": fetched.digest,
            "size": len(fetched.body),
        },
    }
    return await client.push_referrer(subject.ref, json.dumps(doc).encode(), mt.OCI_MANIFEST)


async def test_hostile_artifacts_are_ignored(registry: RegistryServer, subject: Subject) -> None:
    good = from_trace(trace_for(subject.digest, subject.layers, "good", 1))
    foreign = from_trace(
        trace_for("sha256:" + "9" * 64, subject.layers, "elsewhere", 2)
    )  # a valid profile, but of another image
    async with client_for(registry) as client:
        await _push_raw_artifact(client, subject, b"not a profile at all")
        await _push_raw_artifact(client, subject, serialize(good)[:-5])
        await _push_raw_artifact(client, subject, serialize(foreign))
        await push_run_profile(client, subject.ref, good, FAST)
        listed = await client.referrers(subject.ref, subject.digest, ARTIFACT_TYPE_PROFILE)
        assert len(listed) == 4
        assert await fetch_profile(client, subject.ref, subject.digest) == good
