"""The vault's certificate authority: who may talk to whom on the data and control ports.

Agents and process servers authenticate each other with TLS client and server certificates
issued by the vault (mutual TLS). The CA lives in the vault directory::

    <vault>/ca/ca.pem     CA certificate (EC P-256, self-signed, 10 years)
    <vault>/ca/ca.key     its private key, PKCS#8 PEM, mode 0600, never leaves the vault
    <vault>/ca/issued/<serial hex>.pem   every certificate issued (an audit trail)

Issued certificates (EC P-256, ``days`` long, 825 by default) carry the name as subject common
name and as a DNS subject alternative name, plus:

================  ===================================  =========================================
role              extended key usage                   subject alternative names
================  ===================================  =========================================
``process-server``  serverAuth, clientAuth               the name, and every ``--host`` (DNS names
                                                       and IP addresses the agents connect to)
``agent``         clientAuth                           the name
================  ===================================  =========================================

TLS checks the extended key usage, so an agent's certificate cannot serve as a process server,
and the agent checks the process server's host name against its alternative names.

A bundle written for an appliance (``write_bundle``) is a directory with ``cert.pem``,
``key.pem`` (0600) and ``ca.pem``: everything one end of a connection needs.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from siterecovery.control.vault import check_name
from siterecovery.durable import write_atomic
from siterecovery.errors import InvalidInput, NotFound, VaultError

Role = Literal["process-server", "agent"]
ROLES: tuple[Role, ...] = ("process-server", "agent")
CA_DIR = "ca"
CA_DAYS = 3650
DEFAULT_DAYS = 825


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key and the CA certificate that signed it (PEM)."""

    name: str
    role: Role
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    serial: int


@dataclass(frozen=True)
class Bundle:
    """Paths of a certificate bundle directory (see the module docstring)."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def at(cls, directory: Path) -> Bundle:
        from siterecovery.adapters.transport import bundle_paths

        return cls(*bundle_paths(directory))

    def check(self) -> Bundle:
        for p in (self.cert, self.key, self.ca):
            if not p.is_file():
                raise NotFound(
                    kind="certificate file",
                    name=str(p),
                    hint=" Issue the bundle with 'siterecovery appliance register NAME --out DIR'.",
                )
        return self


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class VaultCA:
    """The vault's certificate authority (see the module docstring)."""

    def __init__(self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.directory = directory
        self.cert = cert
        self.key = key

    @classmethod
    def load_or_create(cls, vault_root: Path, vault_name: str) -> VaultCA:
        """The vault's CA, created on first use."""
        directory = Path(vault_root) / CA_DIR
        if (directory / "ca.key").exists():
            return cls.load(vault_root)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "siterecovery"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"siterecovery vault {vault_name} CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        # The key first: a crash in between leaves no certificate without its key.
        write_atomic(
            directory / "ca.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            mode=0o600,
        )
        write_atomic(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, cert, key)

    @classmethod
    def load(cls, vault_root: Path) -> VaultCA:
        directory = Path(vault_root) / CA_DIR
        try:
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        except FileNotFoundError as err:
            raise NotFound(
                kind="vault certificate authority",
                name=str(directory),
                hint=" It is created by the first 'siterecovery appliance register'.",
            ) from err
        except ValueError as err:
            raise VaultError(
                f"the vault's CA in {directory} is damaged ({err}); restore it from backup."
            ) from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise VaultError(f"the vault's CA key in {directory} is not an EC key; restore it from backup.")
        return cls(directory, cert, key)

    @property
    def ca_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, name: str, role: Role, hosts: list[str] | None = None, days: int = DEFAULT_DAYS
    ) -> Issued:
        """A new key and certificate for ``name`` in ``role`` (see the module docstring)."""
        check_name("appliance" if role == "process-server" else "agent", name)
        if role not in ROLES:
            raise InvalidInput(f"certificate role {role!r} is not allowed; use one of {', '.join(ROLES)}.")
        if not 1 <= days <= 3650:
            raise InvalidInput(f"certificate lifetime {days} days is not allowed: use 1..3650.")
        alt: list[x509.GeneralName] = [x509.DNSName(name)]
        for host in hosts or []:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                if not host or any(c.isspace() for c in host):
                    raise InvalidInput(f"host {host!r} is neither an IP address nor a DNS name.") from None
                alt.append(x509.DNSName(host))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role == "process-server":
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "siterecovery"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        issued_dir = self.directory / "issued"
        issued_dir.mkdir(exist_ok=True)
        write_atomic(issued_dir / f"{serial:x}.pem", cert_pem)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Issued(name, role, cert_pem, key_pem, self.ca_pem, serial)


def write_bundle(directory: Path, issued: Issued) -> Bundle:
    """Write ``cert.pem``, ``key.pem`` (0600) and ``ca.pem`` into ``directory`` (created 0700)."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    bundle = Bundle.at(directory)
    write_atomic(bundle.key, issued.key_pem, mode=0o600)
    write_atomic(bundle.cert, issued.cert_pem)
    write_atomic(bundle.ca, issued.ca_pem)
    return bundle


def use_process_server(
    vault_root: Path,
    vault_name: str,
    data: str,
    *,
    control: str | None = None,
    bandwidth: str | None = None,
    flush_timeout_s: float = 120.0,
) -> dict[str, str | None]:
    """Make the vault's agents replicate through the process server at ``data``: issue the
    vault's agent certificate (into ``<vault>/agent``) and write the settings file."""
    from siterecovery.adapters.transport.config import RemoteSettings, save_settings

    agent = f"vault-{vault_name}"
    settings = RemoteSettings(
        data=data,
        agent=agent,
        certs="agent",
        control=control,
        bandwidth=bandwidth,
        flush_timeout_s=flush_timeout_s,
    )  # validated before anything is written
    ca = VaultCA.load_or_create(vault_root, vault_name)
    write_bundle(Path(vault_root) / "agent", ca.issue(agent, "agent"))
    path = save_settings(vault_root, settings)
    return {"settings": str(path), "agent": agent, "data": data, "control": control, "bandwidth": bandwidth}
