"""A client for the CRI image service (runtime.v1), the kubelet's way of pulling."""
