"""The FUSE file system: one mount per node, one read-only sub-tree per lazy layer."""
