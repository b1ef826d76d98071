"""Pull images into containerd through CRI, exactly as the kubelet does.

Only the CRI path gives a remote snapshotter the labels (`containerd.io/snapshot.ref`,
`cri.image-ref`, `cri.layer-digest`, ...) that lazy pulling needs; `ctr images pull`
fetches every blob first and passes none. Credentials go in the request's AuthConfig,
as kubelet passes image pull secrets.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import grpc

from accelctl.cri import cri_images_pb2 as pb
from fetcher.credentials import CredentialStore
from fetcher.reference import ImageReference

CRI_NAMESPACE = "k8s.io"
"""containerd namespace the CRI plugin keeps its images in (where `ctr` finds them)."""
DEFAULT_CONTAINERD = "/run/containerd/containerd.sock"
"""containerd's socket where its packages put it."""


class CRIError(RuntimeError):
    """containerd's CRI plugin refused or failed the request."""


@dataclass(frozen=True)
class ImageInfo:
    """What CRI reports about a pulled image."""

    image_id: str
    repo_digests: tuple[str, ...]
    size: int


class CRIImageClient:
    """Talks to the CRI ImageService on containerd's socket."""

    def __init__(self, address: str, timeout: float = 600.0) -> None:
        target = address if address.startswith("unix://") else f"unix://{address}"
        self._channel = grpc.insecure_channel(target)
        self._pull = self._method("PullImage", pb.PullImageResponse)
        self._status = self._method("ImageStatus", pb.ImageStatusResponse)
        self._remove = self._method("RemoveImage", pb.RemoveImageResponse)
        self.timeout = timeout

    def _method(self, name: str, response: type[Any]) -> grpc.UnaryUnaryMultiCallable:
        """A client call of ImageService built from the message classes alone (no
        generated servicer code, which would only add unimplemented server stubs)."""
        return self._channel.unary_unary(
            f"/runtime.v1.ImageService/{name}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response.FromString,
        )

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> CRIImageClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pull(self, image: str, credentials: CredentialStore | None = None) -> str:
        """Pull ``image``; returns its image ID (the config digest)."""
        request = pb.PullImageRequest(image=pb.ImageSpec(image=image))
        credential = None
        if credentials is not None:
            credential = credentials.lookup(ImageReference.parse(image).registry)
        if credential is not None:
            request.auth.CopyFrom(
                pb.AuthConfig(
                    username=credential.username,
                    password=credential.password,
                    identity_token=credential.identity_token,
                    registry_token=credential.registry_token,
                    auth=base64.b64encode(
                        f"{credential.username}:{credential.password}".encode()
                    ).decode()
                    if credential.username
                    else "",
                )
            )
        try:
            response = self._pull(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise CRIError(f"CRI pull of {image} failed: {exc.details()}") from None
        return str(response.image_ref)

    def status(self, image: str) -> ImageInfo | None:
        """The pulled image, or None if containerd does not have it."""
        try:
            response = self._status(
                pb.ImageStatusRequest(image=pb.ImageSpec(image=image)), timeout=self.timeout
            )
        except grpc.RpcError as exc:
            raise CRIError(f"CRI image status of {image} failed: {exc.details()}") from None
        if not response.image.id:
            return None
        return ImageInfo(response.image.id, tuple(response.image.repo_digests), response.image.size)

    def remove(self, image: str) -> None:
        """Remove the image from containerd's CRI namespace."""
        try:
            self._remove(
                pb.RemoveImageRequest(image=pb.ImageSpec(image=image)), timeout=self.timeout
            )
        except grpc.RpcError as exc:
            raise CRIError(f"CRI remove of {image} failed: {exc.details()}") from None
