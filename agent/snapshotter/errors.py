"""Snapshot errors, each carrying the gRPC status code containerd's errdefs expects.

containerd turns the status code back into its error class (`errdefs.FromGRPC`) and
acts on the class: ALREADY_EXISTS during a Prepare is the remote-snapshot handshake,
NOT_FOUND on Stat means "unpack this layer", FAILED_PRECONDITION on Remove means
"children first". The code is therefore part of the API; the message is for humans.
"""

from __future__ import annotations

import grpc


class SnapshotError(Exception):
    """Base class: a request the snapshotter refuses, with the code to refuse it with."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(SnapshotError):
    """A malformed request: empty key, oversized label, unknown update field, bad filter."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(SnapshotError):
    """The key, name or parent does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(SnapshotError):
    """The key or name is taken, or a remote snapshot for the layer is already there."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(SnapshotError):
    """The snapshot exists but is of the wrong kind or still has children."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(SnapshotError):
    """A remote layer under the snapshot is not served now (not restored after a restart)."""

    code = grpc.StatusCode.UNAVAILABLE
