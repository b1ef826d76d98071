"""Which learned profiles the bench registry lists for an image, set on purpose.

The bench registry is cached across invocations, and the agent uses every profile it
finds for an image: a benchmark must say which profiles exist when each run starts.
The registry keeps referrers in the tag-schema index (``sha256-<digest>``), and that
index is what lists them: an artifact dropped from it is found by no reader (the
agent's `profiles.registry_sync.fetch_profile` included) but stays stored by digest,
so it can be listed again. That is how the new-version scenario hides a version's
own profile for its inherited runs and shows it for its own-profile runs, without
learning it anew each time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

from fetcher import mediatypes as mt
from fetcher.errors import NotFoundError
from fetcher.manifest import Descriptor, ImageIndex
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient, referrers_tag
from formats.accelerated import ARTIFACT_TYPE_PROFILE
from profiles.format import Profile
from profiles.registry_sync import fetch_profile


class LearnError(RuntimeError):
    """A recorded start produced no profile in the registry in time, or a profile is
    still found after it was unlisted."""


async def list_profiles(
    registry_host: str, reference: str, profiles: Sequence[Descriptor]
) -> list[Descriptor]:
    """Make ``profiles`` the profile artifacts listed for ``reference``'s manifest, other
    referrers (the index-only artifact) untouched; returns those listed before."""
    ref = ImageReference.parse(reference)
    async with RegistryClient(plain_http_hosts={registry_host}) as client:
        digest = (await client.resolve(ref)).manifest_digest
        index_ref = ref.with_tag(referrers_tag(digest))
        try:
            fetched = await client.get_manifest(index_ref, accept=mt.OCI_INDEX)
        except NotFoundError:
            fetched = None
        listed = (
            list(fetched.parsed.manifests)
            if fetched is not None and isinstance(fetched.parsed, ImageIndex)
            else []
        )
        before = [d for d in listed if d.artifact_type == ARTIFACT_TYPE_PROFILE]
        if [d.digest for d in before] != [d.digest for d in profiles]:
            kept = [d for d in listed if d.artifact_type != ARTIFACT_TYPE_PROFILE]
            index = {
                "schemaVersion": 2,
                "mediaType": mt.OCI_INDEX,
                "manifests": [d.to_json() for d in [*kept, *profiles]],
            }
            body = json.dumps(index, separators=(",", ":")).encode()
            await client.push_manifest(index_ref, body, mt.OCI_INDEX)
        if not profiles and await fetch_profile(client, ref, digest) is not None:
            raise LearnError(f"{reference}: a learned profile is still found after unlisting")
    return before


async def forget_profiles(registry_host: str, reference: str) -> int:
    """Unlist every learned profile of ``reference``'s manifest; returns how many.

    Without this, a profile run would use whatever earlier runs (and earlier code)
    learned.
    """
    return len(await list_profiles(registry_host, reference, ()))


async def wait_for_profile(
    registry_host: str, reference: str, runs: int, timeout: float
) -> Profile:
    """Poll the registry until ``reference``'s learned profile holds ``runs`` runs.

    The agent pushes a recorded start only after its trace window closes (a quiet
    period after the start), so the profile appears seconds after readiness.
    """
    ref = ImageReference.parse(reference)
    deadline = time.monotonic() + timeout
    async with RegistryClient(plain_http_hosts={registry_host}) as client:
        digest = (await client.resolve(ref)).manifest_digest
        while True:
            found = await fetch_profile(client, ref, digest)
            if found is not None and found.runs.count >= runs:
                return found
            if time.monotonic() > deadline:
                have = found.runs.count if found else 0
                raise LearnError(f"{reference}: profile has {have} run(s), wanted {runs}")
            await asyncio.sleep(0.5)
