"""The containerd proxy snapshotter: overlayfs snapshots, plus lazily served remote layers.

containerd reaches it over gRPC (`containerd.services.snapshots.v1.Snapshots`) as a
`proxy_plugins` entry of type `snapshot`. Snapshots behave exactly like those of
containerd's own overlayfs snapshotter; layers that the remote-layer hook can serve
lazily are committed without containerd downloading them.
"""
