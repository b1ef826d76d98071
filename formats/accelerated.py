"""Names that tie an image to its accelerated forms in the registry.

The converter writes these and the agent (and the admission webhook) look for them, so
they live in one place: the `_accelerated` tag suffix, the annotations recording where
an accelerated form came from, and the media types of the index-only artifact.
"""

from __future__ import annotations

import json

ACCELERATED_SUFFIX = "_accelerated"

ANNOTATION_SOURCE_DIGEST = "io.acceld.source.digest"
ANNOTATION_MODE = "io.acceld.mode"
ANNOTATION_PREFETCH = "io.acceld.prefetch"
ANNOTATION_LAYER_DIGEST = "io.acceld.layer.digest"
ANNOTATION_CONVERSION = "io.acceld.conversion"

MODE_FULL = "full"
MODE_INDEX = "index"

ARTIFACT_TYPE_INDEX = "application/vnd.acceld.index.v1"
MEDIA_TYPE_LAYER_INDEX = "application/vnd.acceld.layer-index.v1+msgpack"

ARTIFACT_TYPE_PROFILE = "application/vnd.acceld.profile.v1"
MEDIA_TYPE_PROFILE = "application/vnd.acceld.profile.v1+msgpack"
ANNOTATION_PROFILE_KIND = "io.acceld.profile.kind"

EMPTY_JSON = b"{}"


def conversion_format(annotations: dict[str, str]) -> int:
    """The converter format an accelerated form was made by (0: unknown). Registries keep
    every index artifact ever pushed for an image, so after a reconversion by a newer
    converter the agent must pick the newest form, not the first one listed."""
    try:
        settings = json.loads(annotations.get(ANNOTATION_CONVERSION, ""))
    except ValueError:
        return 0
    number = settings.get("format") if isinstance(settings, dict) else None
    return number if type(number) is int else 0


def accelerated_tag(tag: str) -> str:
    """The tag of the accelerated form of ``tag``."""
    return tag + ACCELERATED_SUFFIX


def is_accelerated_tag(tag: str | None) -> bool:
    """Whether ``tag`` already names an accelerated form (never convert those again)."""
    return bool(tag) and tag.endswith(ACCELERATED_SUFFIX)  # type: ignore[union-attr]
