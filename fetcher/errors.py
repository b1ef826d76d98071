"""Typed registry errors.

Callers decide between "fall back to a full pull", "ask for credentials" and "retry
later" by the error's type, so each failure the distribution spec distinguishes gets
its own class, and every message names the registry object it is about.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RegistryError(Exception):
    """Base of every error the registry client raises."""

    message: str
    status: int | None = None
    url: str | None = None
    codes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [self.message]
        if self.status is not None:
            parts.append(f"(HTTP {self.status})")
        if self.codes:
            parts.append(f"[{', '.join(self.codes)}]")
        return " ".join(parts)


class NotFoundError(RegistryError):
    """Repository, manifest, tag or blob does not exist."""


class UnauthorizedError(RegistryError):
    """Authentication failed or is missing (401 after trying the credentials we have)."""


class ForbiddenError(UnauthorizedError):
    """Authenticated, but not allowed to do this (403 / DENIED)."""


class DigestMismatchError(RegistryError):
    """Bytes received do not hash to the digest they were asked for by."""


class UnsupportedMediaTypeError(RegistryError):
    """A manifest or layer of a kind acceld cannot handle (e.g. Docker schema 1)."""


class ManifestError(RegistryError):
    """A manifest or index that is not valid JSON or breaks the OCI image spec."""


class RegistryUnavailableError(RegistryError):
    """The registry kept failing (resets, 5xx, 429, timeouts) until retries ran out."""


class BodyInterruptedError(RegistryUnavailableError):
    """A response body was cut short (the connection reset, closed or timed out while
    it arrived). Readers that resume or retry catch it; elsewhere it ends the call."""


class MalformedResponseError(RegistryError):
    """The registry, or a host it sent the client to, answered with something that is
    not HTTP the client can read (a header line past the parser's limit, say). Not
    retried: a server that answers so is broken, not busy."""


class RegistryNotAllowedError(RegistryError):
    """The registry is not in the configured allow-list; nothing was sent to it."""


class DelegationRefusedError(RegistryError):
    """A registry on a public address sent the client (a blob redirect, a token realm)
    to a loopback, link-local, private or reserved address: not followed, nothing sent
    there (`fetcher.delegation`)."""


class RangeNotSupportedError(RegistryError):
    """The registry ignored a Range request; lazy loading needs ranges."""


class InvalidReferenceError(ValueError):
    """An image reference that does not parse."""


class CredentialsError(ValueError):
    """A credentials file that cannot be read or parsed (never echoes secret values)."""


class ResponseTooLargeError(RegistryError):
    """A response body larger than what it can legitimately be: refused before it is
    held in memory (a hostile or broken registry must not grow the agent's RSS)."""


class HostsConfigError(RegistryError):
    """The node's registry host configuration (containerd's hosts.toml and the files it
    names) cannot be used for a registry: nothing is sent, as containerd sends nothing."""
