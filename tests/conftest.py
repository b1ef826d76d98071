"""Test rig: every fixture wraps a real part from `rig/` (registry, containerd, images, link)."""

pytest_plugins = [
    "tests.fixtures.registry",
    "tests.fixtures.containerd",
    "tests.fixtures.images",
    "tests.fixtures.shaped_link",
]
