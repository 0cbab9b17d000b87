"""The vault's CA and the ``appliance`` / ``process-server`` commands on real files."""

from __future__ import annotations

import json
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from siterecovery.adapters.transport.config import load_settings
from siterecovery.control.certificates import VaultCA, use_process_server, write_bundle
from siterecovery.control.vault import create_vault
from siterecovery.errors import InvalidInput

pytestmark = pytest.mark.integration


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_the_ca_is_created_once_with_a_private_key_only_the_owner_reads(tmp_path: Path) -> None:
    ca = VaultCA.load_or_create(tmp_path, "lab")
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    again = VaultCA.load_or_create(tmp_path, "lab")
    assert again.cert == ca.cert  # loaded, not replaced


def test_issued_certificates_chain_to_the_ca_and_carry_their_role(tmp_path: Path) -> None:
    ca = VaultCA.load_or_create(tmp_path / "vault", "lab")
    ps = ca.issue("ps1", "process-server", hosts=["10.0.0.5", "ps1.example.org"])
    agent = ca.issue("vault-lab", "agent")
    pc = x509.load_pem_x509_certificate(ps.cert_pem)
    ac = x509.load_pem_x509_certificate(agent.cert_pem)
    assert list(pc.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    assert list(ac.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    san = pc.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "ps1.example.org" in san.get_values_for_type(x509.DNSName)
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    pc.verify_directly_issued_by(ca.cert)
    ac.verify_directly_issued_by(ca.cert)
    bundle = write_bundle(tmp_path / "b", ps)
    assert mode(bundle.key) == 0o600
    assert (tmp_path / "vault" / "ca" / "issued" / f"{ps.serial:x}.pem").exists()
    # The standard library accepts the bundle as a TLS server identity.
    ssl.create_default_context().load_cert_chain(bundle.cert, bundle.key)


@pytest.mark.parametrize(("name", "hosts"), [("bad name", []), ("ps1", ["with space"]), ("ps1", [""])])
def test_bad_names_and_hosts_are_refused(tmp_path: Path, name: str, hosts: list[str]) -> None:
    ca = VaultCA.load_or_create(tmp_path, "lab")
    with pytest.raises(InvalidInput):
        ca.issue(name, "process-server", hosts=hosts)


def test_use_process_server_validates_before_it_writes(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="bandwidth"):
        use_process_server(tmp_path, "lab", "10.0.0.5:9443", bandwidth="fast")
    assert load_settings(tmp_path) is None and not (tmp_path / "agent").exists()
    use_process_server(tmp_path, "lab", "10.0.0.5", bandwidth="100,08:00-18:00=10")
    settings = load_settings(tmp_path)
    assert settings is not None and settings.agent == "vault-lab" and settings.data == "10.0.0.5"
    assert mode(tmp_path / "agent" / "key.pem") == 0o600


def cli(vault: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "siterecovery"), "--vault", str(vault), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_register_run_status_and_back_to_embedded(tmp_path: Path) -> None:
    vault = create_vault(tmp_path / "vault", "lab")
    vault.close()
    root = tmp_path / "vault"
    r = cli(
        root, "appliance", "register", "ps1", "--out", str(tmp_path / "ps"), "--host", "127.0.0.1", "--json"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["role"] == "process-server"
    r = cli(root, "appliance", "register", "ps1", "--out", str(tmp_path / "x"), "--role", "gateway")
    assert r.returncode == 2 and "role 'gateway' is not allowed" in r.stderr

    data, control = free_port(), free_port()
    assert (
        cli(root, "appliance", "use", f"127.0.0.1:{data}", "--control", f"127.0.0.1:{control}").returncode
        == 0
    )
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "siterecovery"),
            "--vault",
            str(root),
            "process-server",
            "run",
            "--certs",
            str(tmp_path / "ps"),
            "--spool",
            str(tmp_path / "spool"),
            "--spool-limit",
            "64M",
            "--host",
            "127.0.0.1",
            "--data-port",
            str(data),
            "--control-port",
            str(control),
        ],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "ps.log", "w"),  # noqa: SIM115 (the child owns it)
        text=True,
    )
    try:
        assert server.stdout is not None
        assert "process server listening" in server.stdout.readline()
        r = cli(root, "appliance", "status", "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["mode"] == "process-server" and st["name"] == "ps1" and st["spool"]["state"] == "ok"
        r = cli(root, "process-server", "status", f"127.0.0.1:{control}", "--certs", str(root / "agent"))
        assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    finally:
        server.terminate()
        assert server.wait(30) == 0
    r = cli(root, "appliance", "status")
    assert r.returncode == 12 and "cannot reach the process server" in r.stderr
    assert cli(root, "appliance", "embedded").returncode == 0
    r = cli(root, "appliance", "status", "--json")
    assert json.loads(r.stdout) == {"mode": "embedded"}
