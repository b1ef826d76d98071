"""Certificates for the rig's TLS and token-signing needs.

The registry's token service signs JWTs with a key whose certificate is the registry's
root bundle, and the admission webhook tests serve HTTPS; both want a fresh P-256 key
per run so nothing issued in one run is accepted in another. Registries served over
HTTPS with a private CA (and requiring client certificates) want a `RigCA` that issues
server and client certificates: a CA no system trust store holds, as on a real node
whose registry's CA is configured in containerd's hosts.toml.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _alternative_names(
    dns_names: Sequence[str], ip_addresses: Sequence[str]
) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    return names + [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def write_self_signed(
    key_path: Path,
    cert_path: Path,
    common_name: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    days: int = 30,
) -> None:
    """Write a new P-256 key (0600) and a self-signed CA certificate for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = _builder(common_name, name, key.public_key(), days).add_extension(
        x509.BasicConstraints(ca=True, path_length=None), critical=True
    )
    alternative = _alternative_names(dns_names, ip_addresses)
    if alternative:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    _write_key(key, key_path)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class IssuedPair:
    """A certificate and its key, as files."""

    cert: Path
    key: Path


class RigCA:
    """A private CA in ``directory`` (``ca.pem``, ``ca.key``) that issues certificates."""

    def __init__(self, directory: Path, name: str = "acceld rig CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.cert_path = directory / "ca.pem"
        key_path = directory / "ca.key"
        write_self_signed(key_path, self.cert_path, name)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._key = key
        self._cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    def issue(
        self,
        name: str,
        *,
        client: bool = False,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        days: int = 30,
    ) -> IssuedPair:
        """A server certificate for the names and addresses given, or (``client``) one a
        server that requires client certificates accepts; written as ``<name>.pem/.key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            _builder(name, self._cert.subject, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        alternative = _alternative_names(dns_names, ip_addresses)
        if alternative:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(alternative), critical=False
            )
        pair = IssuedPair(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        pair.cert.write_bytes(
            builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        )
        _write_key(key, pair.key)
        return pair
