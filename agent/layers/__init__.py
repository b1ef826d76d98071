"""Lazy layers: how a file read maps to verified chunks of a layer blob in a registry."""
