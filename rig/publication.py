"""An image and its accelerated forms, published afresh for each adversarial example.

`Converted` is an image and both accelerated forms exactly as our converter pushed them
into the real registry, plus a learned profile. An `Edition` re-publishes all of it for
one test example under a fresh image identity: the image manifest gains an annotation
naming the example, so its digest, and with it every artifact that refers to it, is
new, and nothing an agent remembers about one example (manifests by digest, lookups
shared per image) answers for the next. It also carries the example's forgeries
(`rig.forgery`): each document is recomputed from the one below it, so a forged index
blob or TOC changes the digests that name it all the way up, as a publisher's would.
`Edition.staging` turns it into what `rig.hostile_registry` serves.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.digest import sha256_digest
from fetcher import mediatypes as mt
from fetcher.manifest import ImageManifest, parse_manifest
from fetcher.reference import ImageReference
from fetcher.registry import RegistryClient, referrers_tag
from formats.accelerated import (
    ANNOTATION_LAYER_DIGEST,
    ANNOTATION_SOURCE_DIGEST,
    ARTIFACT_TYPE_INDEX,
    ARTIFACT_TYPE_PROFILE,
    MEDIA_TYPE_LAYER_INDEX,
    accelerated_tag,
)
from formats.estargz_toc import (
    FOOTER_SIZE,
    parse_footer,
)
from profiles.format import Profile, serialize
from rig.hostile_registry import Document, Fault, Staging

EXAMPLE_ANNOTATION = "io.acceld.rig.example"
"""Names the example an edition was published for (its only difference from the image)."""
_BLOB_CAP = 256 << 20
_OCTETS = "application/octet-stream"


@dataclass(frozen=True)
class Converted:
    """An image and its accelerated forms as the converter pushed them (the honest state)."""

    repository: str
    """The real registry's repository they are in."""
    tag: str
    image: bytes
    """The image manifest."""
    layers: tuple[bytes, ...]
    """The image's layer blobs, bottom first."""
    index_artifact: bytes
    """The index-only artifact manifest (subject: the image)."""
    index_blobs: tuple[bytes, ...]
    """Its per-layer index blobs, in the image's layer order."""
    twin: bytes
    """The full-mode twin manifest (`<tag>_accelerated`)."""
    estargz: tuple[bytes, ...]
    """The twin's eStargz layer blobs, bottom first."""
    profile_artifact: bytes
    """A profile artifact manifest, the template for every subject's."""
    profile: Profile
    """A learned profile of the image (image and layers are replaced per subject)."""

    def manifest(self, body: bytes) -> ImageManifest:
        parsed = parse_manifest(body, mt.OCI_MANIFEST)
        assert isinstance(parsed, ImageManifest)
        return parsed


async def load_converted(
    client: RegistryClient, source: ImageReference, twin: ImageReference, profile: Profile
) -> Converted:
    """Read what the converter pushed for ``source`` (index-only artifact through its
    referrers) and ``twin`` (a full-mode twin of the same image) from the registry.
    ``profile`` must already be pushed as a referrer of ``source`` (its manifest is
    kept as the template for every subject's)."""
    image = await client.get_manifest(source)
    assert isinstance(image.parsed, ImageManifest)
    layers = [await client.get_blob(source, d.digest, _BLOB_CAP) for d in image.parsed.layers]
    found = await client.referrers(source, image.digest, ARTIFACT_TYPE_INDEX)
    artifact = await client.get_manifest(source.with_digest(found[0].digest))
    assert isinstance(artifact.parsed, ImageManifest)
    by_layer = {
        d.annotations[ANNOTATION_LAYER_DIGEST]: await client.get_blob(source, d.digest, _BLOB_CAP)
        for d in artifact.parsed.layers
    }
    twin_manifest = await client.get_manifest(twin)
    assert isinstance(twin_manifest.parsed, ImageManifest)
    estargz = [
        await client.get_blob(twin, d.digest, _BLOB_CAP) for d in twin_manifest.parsed.layers
    ]
    profiles = await client.referrers(source, image.digest, ARTIFACT_TYPE_PROFILE)
    profile_artifact = await client.get_manifest(source.with_digest(profiles[0].digest))
    return Converted(
        repository=source.repository,
        tag=source.tag or "latest",
        image=image.body,
        layers=tuple(layers),
        index_artifact=artifact.body,
        index_blobs=tuple(by_layer[d.digest] for d in image.parsed.layers),
        twin=twin_manifest.body,
        estargz=tuple(estargz),
        profile_artifact=profile_artifact.body,
        profile=profile,
    )


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def descriptor_of(body: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
    """The OCI descriptor of ``body``, with ``extra`` fields."""
    return {"mediaType": media_type, "digest": sha256_digest(body), "size": len(body), **extra}


@dataclass
class Edition:
    """One example's publication of a `Converted` image, and the example's forgeries.

    ``accelerated`` says what `<tag>_accelerated` names: ``twin`` (the full-mode twin)
    or ``index`` (the index-only artifact, as the converter leaves it in index mode, so
    that discovery finds no twin and goes on to the referrers).
    """

    converted: Converted
    example: int
    accelerated: str = "twin"
    index_doc: dict[str, Any] = field(init=False)
    index_blobs: list[bytes] = field(init=False)
    twin_doc: dict[str, Any] = field(init=False)
    estargz: list[bytes] = field(init=False)
    """The twin's layer blobs, position by position (forged ones are served by the
    hostile registry, the converter's by upstream)."""
    twin_source: str | None = None
    """The source digest the twin claims (None: the edition's image, as it should)."""
    profile_edits: list[Callable[[Profile], Profile]] = field(default_factory=list)
    referrer_edits: list[Callable[[list[dict[str, Any]], Edition], list[dict[str, Any]]]] = field(
        default_factory=list
    )
    referrers_api: bool = False
    """Answer the referrers API (else only the tag-schema index, as distribution 2.8)."""
    extra_documents: dict[str, Document] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index_doc = json.loads(self.converted.index_artifact)
        self.index_blobs = list(self.converted.index_blobs)
        self.twin_doc = json.loads(self.converted.twin)
        self.estargz = list(self.converted.estargz)

    # -- the documents, each recomputed from the one below it --------------------------

    @property
    def image(self) -> bytes:
        doc = json.loads(self.converted.image)
        doc.setdefault("annotations", {})[EXAMPLE_ANNOTATION] = str(self.example)
        return _json(doc)

    @property
    def image_digest(self) -> str:
        return sha256_digest(self.image)

    def _subject(self, body: bytes) -> dict[str, Any]:
        return descriptor_of(body, mt.OCI_MANIFEST)

    @property
    def index_artifact(self) -> bytes:
        doc = copy.deepcopy(self.index_doc)
        doc["subject"] = self._subject(self.image)
        doc.setdefault("annotations", {})[ANNOTATION_SOURCE_DIGEST] = self.image_digest
        for layer, blob in zip(doc["layers"], self.index_blobs, strict=False):
            layer.update(digest=sha256_digest(blob), size=len(blob))
        return _json(doc)

    @property
    def twin(self) -> bytes:
        doc = copy.deepcopy(self.twin_doc)
        doc.setdefault("annotations", {})[ANNOTATION_SOURCE_DIGEST] = (
            self.twin_source if self.twin_source is not None else self.image_digest
        )
        return _json(doc)

    def profile_blob(self, subject: bytes) -> bytes:
        # Read as published, not validated: the subject may be a forged twin whose
        # other fields (a layer's size) no longer pass our parser.
        profile = self.converted.profile
        layers = tuple(d["digest"] for d in json.loads(subject)["layers"])
        position = {old: new for old, new in zip(profile.layers, layers, strict=True)}
        profile = dataclasses.replace(
            profile,
            image=sha256_digest(subject),
            layers=layers,
            files=tuple(dataclasses.replace(f, layer=position[f.layer]) for f in profile.files),
        )
        for edit in self.profile_edits:
            profile = edit(profile)
        return serialize(profile)

    def profile_artifact(self, subject: bytes) -> bytes:
        doc = json.loads(self.converted.profile_artifact)
        doc["subject"] = self._subject(subject)
        doc["layers"][0].update(
            descriptor_of(self.profile_blob(subject), doc["layers"][0]["mediaType"])
        )
        return _json(doc)

    def referrers(self, subject: bytes) -> list[dict[str, Any]]:
        """The descriptors the referrers of ``subject`` list (before forged edits)."""
        profile = descriptor_of(
            self.profile_artifact(subject), mt.OCI_MANIFEST, artifactType=ARTIFACT_TYPE_PROFILE
        )
        profile["annotations"] = json.loads(self.converted.profile_artifact).get("annotations", {})
        if subject != self.image:
            return [profile]
        index = descriptor_of(
            self.index_artifact, mt.OCI_MANIFEST, artifactType=ARTIFACT_TYPE_INDEX
        )
        index["annotations"] = self.index_doc.get("annotations", {})
        return [index, profile]

    def staging(self, faults: list[Fault]) -> Staging:
        """Everything this edition publishes, as the hostile registry serves it."""
        converted = self.converted
        staging = Staging(upstream=converted.repository, faults=faults)
        image = Document(self.image, mt.OCI_MANIFEST, "image")
        index = Document(self.index_artifact, mt.OCI_MANIFEST, "index")
        twin = Document(self.twin, mt.OCI_MANIFEST, "twin")
        tag = converted.tag
        staging.tags[tag] = image
        staging.tags[accelerated_tag(tag)] = twin if self.accelerated == "twin" else index
        for document in (image, index, twin, *self.extra_documents.values()):
            staging.documents[document.digest] = document
        for number, blob in enumerate(self.index_blobs):
            document = Document(blob, MEDIA_TYPE_LAYER_INDEX, f"index-blob{number}")
            staging.documents[document.digest] = document
        for subject in (image, twin):
            artifact = Document(self.profile_artifact(subject.body), mt.OCI_MANIFEST, "profile")
            profile = Document(self.profile_blob(subject.body), _OCTETS, "profile-blob")
            staging.documents[artifact.digest] = artifact
            staging.documents[profile.digest] = profile
            listed = self.referrers(subject.body)
            for edit in self.referrer_edits:
                listed = edit(listed, self)
            body = _json({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": listed})
            referrers = Document(body, mt.OCI_INDEX, "referrers")
            staging.tags[referrers_tag(subject.digest)] = referrers
            if self.referrers_api:
                staging.referrers_api[subject.digest] = referrers
        for number, layer in enumerate(converted.manifest(converted.image).layers):
            staging.roles[layer.digest] = f"layer{number}"
        honest = {sha256_digest(blob) for blob in converted.estargz}
        for number, blob in enumerate(self.estargz):
            digest = sha256_digest(blob)
            staging.roles.setdefault(digest, f"estargz{number}")
            toc_offset = parse_footer(blob[-FOOTER_SIZE:], len(blob))
            staging.toc_offsets[digest] = (toc_offset, len(blob))
            if digest not in honest:
                staging.documents[digest] = Document(blob, mt.OCI_LAYER_GZIP, f"estargz{number}")
        for body in (converted.image, converted.twin):
            staging.roles[converted.manifest(body).config.digest] = "config"
        return staging
