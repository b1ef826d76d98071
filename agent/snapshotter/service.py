"""The gRPC face of the snapshotter: `containerd.services.snapshots.v1.Snapshots`.

Translates between containerd's messages and `Snapshotter`, and snapshot errors into
the status codes containerd's errdefs map back to its error classes. The namespace
containerd sends (metadata ``containerd-namespace``) is only logged: containerd's
metadata layer already puts it into every key and name it hands a proxy snapshotter
(``<namespace>/<n>/<key>``), so keys are stored exactly as they arrive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from agent.snapshotter.errors import SnapshotError
from agent.snapshotter.metastore import Info
from agent.snapshotter.overlay import Mount
from agent.snapshotter.proto import mount_pb2
from agent.snapshotter.proto import snapshots_pb2 as pb
from agent.snapshotter.snapshotter import Snapshotter
from common.logging import get_logger

log = get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Snapshots"].full_name
"""``containerd.services.snapshots.v1.Snapshots``: the prefix of every method path."""
NAMESPACE_METADATA = "containerd-namespace"
LIST_BATCH = 100
"""Infos per List message: containerd streams in batches too, to stay far below 4 MiB."""


class SnapshotsService:
    """One method per RPC; each maps snapshot errors to their gRPC status."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter

    async def Prepare(
        self, request: pb.PrepareSnapshotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PrepareSnapshotResponse:
        _log_call(context, "prepare", key=request.key, parent=request.parent)
        mounts = await self.snapshotter.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    async def View(
        self, request: pb.ViewSnapshotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ViewSnapshotResponse:
        _log_call(context, "view", key=request.key, parent=request.parent)
        mounts = await self.snapshotter.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    async def Mounts(
        self, request: pb.MountsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=_mounts(await self.snapshotter.mounts(request.key)))

    async def Commit(
        self, request: pb.CommitSnapshotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        _log_call(context, "commit", key=request.key, name=request.name)
        await self.snapshotter.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    async def Remove(
        self, request: pb.RemoveSnapshotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        _log_call(context, "remove", key=request.key)
        await self.snapshotter.remove(request.key)
        return empty_pb2.Empty()

    async def Stat(
        self, request: pb.StatSnapshotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=_info(await self.snapshotter.stat(request.key)))

    async def Update(
        self, request: pb.UpdateSnapshotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths)
        _log_call(context, "update", name=request.info.name, paths=paths)
        info = await self.snapshotter.update(request.info.name, dict(request.info.labels), paths)
        return pb.UpdateSnapshotResponse(info=_info(info))

    async def List(
        self, request: pb.ListSnapshotsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ListSnapshotsResponse]:
        batch: list[pb.Info] = []
        try:
            async for info in self.snapshotter.walk(list(request.filters)):
                batch.append(_info(info))
                if len(batch) == LIST_BATCH:
                    yield pb.ListSnapshotsResponse(info=batch)
                    batch = []
        except SnapshotError as exc:
            await context.abort(exc.code, str(exc))
        if batch:
            yield pb.ListSnapshotsResponse(info=batch)

    async def Usage(
        self, request: pb.UsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UsageResponse:
        size, inodes = await self.snapshotter.usage(request.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    async def Cleanup(
        self, request: pb.CleanupRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        _log_call(context, "cleanup")
        await self.snapshotter.cleanup()
        return empty_pb2.Empty()


_UNARY_METHODS: dict[str, tuple[type[Any], type[Any]]] = {
    "Prepare": (pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse),
    "View": (pb.ViewSnapshotRequest, pb.ViewSnapshotResponse),
    "Mounts": (pb.MountsRequest, pb.MountsResponse),
    "Commit": (pb.CommitSnapshotRequest, empty_pb2.Empty),
    "Remove": (pb.RemoveSnapshotRequest, empty_pb2.Empty),
    "Stat": (pb.StatSnapshotRequest, pb.StatSnapshotResponse),
    "Update": (pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse),
    "Usage": (pb.UsageRequest, pb.UsageResponse),
    "Cleanup": (pb.CleanupRequest, empty_pb2.Empty),
}


def rpc_handler(service: SnapshotsService) -> grpc.GenericRpcHandler:
    """The handler that routes ``/containerd.services.snapshots.v1.Snapshots/*`` to ``service``.

    Built from the message classes rather than generated service stubs, so every
    method is type-checked here and nothing untyped is generated.
    """
    handlers: dict[str, grpc.RpcMethodHandler] = {
        name: grpc.unary_unary_rpc_method_handler(
            _with_status(getattr(service, name)),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, (request, response) in _UNARY_METHODS.items()
    }
    handlers["List"] = grpc.unary_stream_rpc_method_handler(
        service.List,
        request_deserializer=pb.ListSnapshotsRequest.FromString,
        response_serializer=pb.ListSnapshotsResponse.SerializeToString,
    )
    for name in pb.DESCRIPTOR.services_by_name["Snapshots"].methods_by_name:
        assert name in handlers, f"RPC {name} has no handler"
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _with_status(
    method: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await method(request, context)
        except SnapshotError as exc:
            log.debug("snapshotter.refused", code=exc.code.name, error=str(exc))
            await context.abort(exc.code, str(exc))
        except Exception as exc:
            # containerd sees UNKNOWN either way; the traceback is for the operator.
            log.exception("snapshotter.failed", method=method.__name__)
            await context.abort(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")

    return call


def _log_call(context: grpc.aio.ServicerContext[Any, Any], rpc: str, **fields: object) -> None:
    metadata = dict(context.invocation_metadata() or ())
    log.debug(f"snapshotter.{rpc}", namespace=metadata.get(NAMESPACE_METADATA), **fields)


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=mount.type, source=mount.source, options=mount.options)
        for mount in mounts
    ]


def _timestamp(nanoseconds: int) -> Timestamp:
    seconds, nanos = divmod(nanoseconds, 1_000_000_000)
    return Timestamp(seconds=seconds, nanos=nanos)


def _info(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=info.kind.name,
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=info.labels,
    )
