"""The one place the acceld version is read from (the installed package metadata)."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("acceld")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0+source"
