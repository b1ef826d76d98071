"""Registry connection options shared by every accelctl command that talks to a registry.

Each reaches registries as the node's containerd does: through the hosts.toml files
under its ``config_path`` (`fetcher.hosts_config`), from --hosts-dir or ACCELD_HOSTS_DIR.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from fetcher.credentials import CredentialStore
from fetcher.hosts_config import DEFAULT_HOSTS_DIR, HOSTS_DIR_ENV
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
    """Add the credential options, --plain-http and --hosts-dir to a command that talks
    to a registry."""
    func = click.option(
        "--hosts-dir",
        envvar=HOSTS_DIR_ENV,
        default=DEFAULT_HOSTS_DIR,
        show_default=True,
        help="containerd's registry config_path: hosts.toml per registry (CA, client"
        " certificates, mirrors); ':' between roots, empty for none.",
    )(func)
    func = click.option(
        "--plain-http",
        multiple=True,
        metavar="HOST:PORT",
        help="Registry reached over plain HTTP (loopback hosts always are).",
    )(func)
    return credential_options(func)


def make_client(
    docker_config: Path | None,
    pull_secret: tuple[Path, ...],
    plain_http: tuple[str, ...],
    hosts_dir: str,
) -> RegistryClient:
    """A RegistryClient with the credentials and registry hosts the options name."""
    store = CredentialStore.from_files(docker_config, pull_secret)
    return RegistryClient(
        credentials=store, plain_http_hosts=frozenset(plain_http), hosts_dir=hosts_dir
    )
