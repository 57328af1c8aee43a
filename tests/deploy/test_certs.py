"""Tests of the development PKI: chain of trust, a real TLS handshake, Flower's key loaders."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedimg.deploy.certs import (
    DevPki,
    create_ca,
    create_dev_pki,
    create_node_keys,
    create_server_cert,
    main,
)
from fedimg.errors import ConfigError

HOSTS = ("localhost", "127.0.0.1", "server.example.org", "::1")


@pytest.fixture()
def pki(tmp_path: Path) -> DevPki:
    return create_dev_pki(tmp_path / "certs", hosts=HOSTS, nodes=["hospital_a", "camera_01"])


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _handshake(pki: DevPki, client_ctx: ssl.SSLContext, hostname: str) -> str:
    """Serve one TLS connection on 127.0.0.1 with server.crt; return the negotiated version."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass  # the client rejected us: that is what the failing case checks

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                assert tls.recv(2) == b"ok"
                return str(tls.version())
    finally:
        thread.join(timeout=10)
        listener.close()


def test_server_cert_is_signed_by_ca_with_exact_sans(pki: DevPki) -> None:
    # Arrange
    ca, server = _load(pki.ca_cert), _load(pki.server_cert)

    # Act
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    server_bc = server.extensions.get_extension_for_class(x509.BasicConstraints).value
    ca_ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value

    # Assert
    ca.public_key().verify(  # raises InvalidSignature if not signed by the CA
        server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm)
    )
    assert server.issuer == ca.subject
    assert sorted(sans.get_values_for_type(x509.DNSName)) == ["localhost", "server.example.org"]
    assert sorted(map(str, sans.get_values_for_type(x509.IPAddress))) == ["127.0.0.1", "::1"]
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca_bc.ca is True and server_bc.ca is False
    assert ca_ku.key_cert_sign and ca_ku.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp384r1"
    assert (server.not_valid_after_utc - server.not_valid_before_utc).days == 365


def test_server_key_is_unencrypted_pkcs8_pem_with_mode_600(pki: DevPki) -> None:
    # Arrange / Act
    text = pki.server_key.read_text()

    # Assert
    assert text.startswith("-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(pki.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.ca_cert.stat().st_mode) == 0o644


def test_tls_handshake_trusts_only_the_dev_ca(pki: DevPki) -> None:
    # Arrange
    trusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    trusting.load_verify_locations(cafile=str(pki.ca_cert))
    untrusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no trust roots at all

    # Act
    by_name = _handshake(pki, trusting, "localhost")
    by_ip = _handshake(pki, trusting, "127.0.0.1")

    # Assert
    assert by_name.startswith("TLSv1.") and by_ip == by_name
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, untrusting, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):  # not in the SANs
        _handshake(pki, trusting, "other.example.org")


def test_node_keys_are_accepted_by_flowers_own_loaders(pki: DevPki) -> None:
    # Arrange
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    key_path, pub_path = pki.node_keys["hospital_a"]
    args = argparse.Namespace(auth_supernode_private_key=str(key_path),
                              auth_supernode_public_key=None)

    # Act: what `flower-supernode --auth-supernode-private-key` and
    # `flwr supernode register` do with the files
    loaded = _try_setup_client_authentication(args)
    registered_pem = try_load_public_key(pub_path)

    # Assert
    assert loaded is not None
    private_key, public_key = loaded
    assert private_key.curve.name == "secp384r1"
    assert registered_pem == public_key_to_bytes(public_key)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    lines = pub_path.read_text().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("ecdsa-sha2-nistp384 AAAA")
    assert lines[0].endswith(" hospital_a")
    assert key_path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert sorted(pki.node_keys) == ["camera_01", "hospital_a"]


def test_rerun_reuses_ca_and_adds_missing_node(pki: DevPki, tmp_path: Path) -> None:
    # Arrange
    before = {p: p.read_bytes() for p in (pki.ca_cert, pki.ca_key, pki.server_cert,
                                          pki.node_keys["hospital_a"][0])}

    # Act
    again = create_dev_pki(tmp_path / "certs", hosts=HOSTS[:2],
                           nodes=["hospital_a", "camera_01", "hospital_b"])

    # Assert
    assert all(path.read_bytes() == data for path, data in before.items())
    assert sorted(again.node_keys) == ["camera_01", "hospital_a", "hospital_b"]
    assert again.node_keys["hospital_b"][1].read_text().startswith("ecdsa-sha2-nistp384 ")


def test_rerun_with_new_host_refuses_to_reuse_server_cert(pki: DevPki, tmp_path: Path) -> None:
    # Arrange / Act / Assert
    with pytest.raises(ConfigError, match="new.example.org"):
        create_dev_pki(tmp_path / "certs", hosts=["new.example.org"])


def test_force_regenerates_the_ca(pki: DevPki, tmp_path: Path) -> None:
    # Arrange
    old_ca = pki.ca_cert.read_bytes()

    # Act
    create_dev_pki(tmp_path / "certs", hosts=HOSTS, overwrite=True)

    # Assert
    assert pki.ca_cert.read_bytes() != old_ca
    _load(pki.ca_cert).public_key().verify(
        _load(pki.server_cert).signature, _load(pki.server_cert).tbs_certificate_bytes,
        ec.ECDSA(_load(pki.server_cert).signature_hash_algorithm),
    )


def test_existing_files_are_not_overwritten(pki: DevPki, tmp_path: Path) -> None:
    # Arrange
    out = tmp_path / "certs"
    ca_before = pki.ca_cert.read_bytes()

    # Act / Assert
    with pytest.raises(ConfigError, match=r"ca\.crt.*--force"):
        create_ca(out)
    with pytest.raises(ConfigError, match=r"server\.crt.*--force"):
        create_server_cert(out, ca_cert=pki.ca_cert, ca_key=pki.ca_key)
    with pytest.raises(ConfigError, match=r"hospital_a\.key.*--force"):
        create_node_keys(out, ["hospital_a"])
    assert pki.ca_cert.read_bytes() == ca_before
    create_ca(out, overwrite=True)
    assert pki.ca_cert.read_bytes() != ca_before


@pytest.mark.parametrize("bad", ["../evil", "-dash", "has space", "", "a/b"])
def test_bad_node_name_is_rejected_by_name(tmp_path: Path, bad: str) -> None:
    # Arrange / Act / Assert
    with pytest.raises(ConfigError, match="node name") as info:
        create_node_keys(tmp_path, [bad])
    assert repr(bad) in str(info.value)
    assert not (tmp_path / "nodes").exists()


@pytest.mark.parametrize("bad", ["https://server", "server:9092", "bad host"])
def test_bad_host_is_rejected_by_name(tmp_path: Path, bad: str) -> None:
    # Arrange
    ca_cert, ca_key = create_ca(tmp_path)

    # Act / Assert
    with pytest.raises(ConfigError, match="--host") as info:
        create_server_cert(tmp_path, ca_cert=ca_cert, ca_key=ca_key, hosts=[bad])
    assert repr(bad) in str(info.value)


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    # Arrange / Act
    with pytest.raises(ConfigError):
        create_dev_pki(tmp_path, nodes=["hospital_a", "bad name"])

    # Assert
    assert list(tmp_path.iterdir()) == []


def test_half_a_ca_pair_is_an_error(tmp_path: Path) -> None:
    # Arrange
    create_ca(tmp_path)
    (tmp_path / "ca.key").unlink()

    # Act / Assert
    with pytest.raises(ConfigError, match=r"ca\.key is missing"):
        create_dev_pki(tmp_path)


def test_main_end_to_end(tmp_path: Path) -> None:
    # Arrange
    out = tmp_path / "server" / "certs"
    argv = ["--out", str(out), "--host", "localhost", "--host", "127.0.0.1",
            "--node", "hospital_a", "--node", "hospital_b", "--days", "30"]

    # Act
    code = main(argv)
    second = main([*argv, "--node", "camera_01"])
    bad = main(["--out", str(out), "--node", "bad name"])
    refused = main(["--out", str(out), "--host", "elsewhere.org"])

    # Assert
    assert (code, second, bad, refused) == (0, 0, 2, 2)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["ca.crt", "ca.key", "nodes/camera_01.key", "nodes/camera_01.pub",
                     "nodes/hospital_a.key", "nodes/hospital_a.pub", "nodes/hospital_b.key",
                     "nodes/hospital_b.pub", "server.crt", "server.key"]
    ca = _load(out / "ca.crt")
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == 30
