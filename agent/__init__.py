"""The node agent: daemon, containerd proxy snapshotter and the FUSE file system."""
