"""Registry connection options shared by every accelctl command that talks to a registry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from fetcher.credentials import CredentialStore
from fetcher.registry import RegistryClient

F = TypeVar("F", bound=Callable[..., Any])


def credential_options(func: F) -> F:
    """Add --docker-config and --pull-secret (registry credentials) to a command."""
    func = click.option(
        "--pull-secret",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="A kubernetes.io/dockerconfigjson secret (YAML/JSON or mounted file).",
    )(func)
    return click.option(
        "--docker-config",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Docker config.json with registry credentials (default: ~/.docker/config.json).",
    )(func)


def registry_options(func: F) -> F:
    """Add the credential options and --plain-http to a command that talks to a registry."""
    func = click.option(
        "--plain-http",
        multiple=True,
        metavar="HOST:PORT",
        help="Registry reached over plain HTTP (loopback hosts always are).",
    )(func)
    return credential_options(func)


def make_client(
    docker_config: Path | None, pull_secret: tuple[Path, ...], plain_http: tuple[str, ...]
) -> RegistryClient:
    """A RegistryClient with the credentials the options name."""
    store = CredentialStore.from_files(docker_config, pull_secret)
    return RegistryClient(credentials=store, plain_http_hosts=frozenset(plain_http))
