"""``prefetch`` and ``profiles`` are separate settings: the image's own prefetch list is
fetched ahead with learned profiles off, and nothing is with prefetch off and no
profile. (Both used to be one switch: ``profiles: false`` also dropped the list.)"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from converter.convert import ConvertOptions, convert_image
from converter.prefetch import PrefetchList
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient
from rig.agent_process import AgentProcess
from rig.containerd import ACCELD_SNAPSHOTTER
from rig.images import build_image, push_image
from tests.test_profiles_e2e import _prefetch_bytes, app_image_spec


@pytest.fixture
async def listed_image(registry, tmp_path):
    """An index-only image whose converter list names /app/a.bin."""
    built = build_image(app_image_spec(), tmp_path / "layout", "v1")
    reference = f"{registry.host}/rig/listed-{uuid.uuid4().hex[:8]}:v1"
    options = ConvertOptions(
        mode="index", span=1 << 20, prefetch=PrefetchList.parse_lines(["/app/a.bin"])
    )
    async with RegistryClient() as client:
        await push_image(client, reference, built)
        await convert_image(client, ImageReference.parse(reference), options)
    return reference


def _prefetched_after_pull(tmp_path, containerd_factory, reference, **settings) -> float:
    agent = AgentProcess(
        tmp_path,
        settings={"background_fill": False, "record_profiles": False, **settings},
    ).start()
    try:
        node = containerd_factory(snapshotter=ACCELD_SNAPSHOTTER, acceld_socket=agent.socket)
        node.cri_pull_image(reference)
        deadline = time.monotonic() + 5
        while _prefetch_bytes(agent) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        return _prefetch_bytes(agent)
    finally:
        agent.stop()


@pytest.mark.parametrize(
    ("prefetch", "profiles", "fetches"),
    [(True, False, True), (False, True, False)],
    ids=["list-without-profiles", "profiles-without-list"],
)
async def test_the_images_list_is_prefetched_by_the_prefetch_setting_alone(
    listed_image, tmp_path, containerd_factory, prefetch, profiles, fetches
):
    """The image has a converter list and no profile: what is fetched ahead follows
    ``prefetch`` whatever ``profiles`` says."""
    fetched = await asyncio.to_thread(
        _prefetched_after_pull,
        tmp_path / "node",
        containerd_factory,
        listed_image,
        prefetch=prefetch,
        profiles=profiles,
    )
    assert (fetched > 0) is fetches, fetched
