"""The mutating admission webhook that moves opted-in pods onto accelerated images.

Kept beside accelctl because it is an operator-side service that talks to registries,
like the convert-server; the manifests that deploy it live in `packaging/`.
"""
