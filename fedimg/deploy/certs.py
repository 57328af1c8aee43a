"""Development PKI for a Flower federation: TLS certificates and SuperNode keys.

FOR DEVELOPMENT AND TESTING ONLY. A production federation uses certificates
issued by the organisation's own CA and node keys generated on each site.

Files written under ``--out`` and the Flower flags that consume them:

- ``ca.crt``: ``flower-superlink --ssl-ca-certfile`` and, on every site,
  ``flower-supernode --root-certificates`` (and ``root-certificates`` for ``flwr``).
- ``ca.key``: signs server certificates; keep it off the clients.
- ``server.crt`` / ``server.key``: ``flower-superlink --ssl-certfile`` /
  ``--ssl-keyfile`` (unencrypted PKCS8 PEM). Its SANs must list every host
  name or IP address the clients dial.
- ``nodes/<name>.key``: ``flower-supernode --auth-supernode-private-key``
  (OpenSSH private key, ECDSA P-384, read by ``load_ssh_private_key``).
- ``nodes/<name>.pub``: one OpenSSH line ``ecdsa-sha2-nistp384 AAAA... <name>``,
  registered with ``flwr supernode register nodes/<name>.pub`` against a
  SuperLink started with ``--enable-supernode-auth``.

Rerunning reuses an existing CA, server certificate and node keys and only
creates what is missing; ``--force`` regenerates everything (which
invalidates every certificate issued before).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedimg.errors import ConfigError, FedimgError

log = logging.getLogger(__name__)

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
_CURVE = ec.SECP384R1
_HASH = hashes.SHA384
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_DNS_RE = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
_KEY_USAGE_FLAGS = ("digital_signature", "content_commitment", "key_encipherment",
                    "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
                    "encipher_only", "decipher_only")
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class DevPki:
    """Paths of a development PKI written by :func:`create_dev_pki`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]]  # name -> (private key, public key)


def _check_days(days: int) -> None:
    if days < 1:
        raise ConfigError(f"certificate validity days={days} must be >= 1; pass e.g. --days 365")


def _check_free(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"refusing to overwrite existing {', '.join(existing)}; "
            "rerun with --force (overwrite=True) to regenerate, or delete the file(s)"
        )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data``; private keys are created with mode 0o600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # O_CREAT's mode does not apply to a file that already existed
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_usage(*enabled: str) -> x509.KeyUsage:
    return x509.KeyUsage(**{flag: flag in enabled for flag in _KEY_USAGE_FLAGS})


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    fmt = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_RE.match(host):
        raise ConfigError(
            f"host {host!r} is neither an IP address nor a DNS name; pass the bare "
            "name the clients dial, without scheme or port (e.g. --host server.example.org)"
        )
    return x509.DNSName(host)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def create_ca(out_dir: Path, *, common_name: str = "fedimg development CA", days: int = 365,
              overwrite: bool = False) -> tuple[Path, Path]:
    """Create a self-signed CA; return ``(ca.crt, ca.key)``."""
    _check_days(days)
    cert_path, key_path = Path(out_dir) / "ca.crt", Path(out_dir) / "ca.key"
    _check_free([cert_path, key_path], overwrite)
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage("key_cert_sign", "crl_sign"), critical=True)
        .sign(key, _HASH())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    log.info("created CA %s (valid %d days)", cert_path, days)
    return cert_path, key_path


def _load_ca(ca_cert: Path, ca_key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        key = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(
            f"cannot load CA {ca_cert} / {ca_key}: {err}; rerun with --force to create a new CA"
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(f"{ca_key} is not the EC private key of {ca_cert}; rerun with --force")
    return cert, key


def create_server_cert(out_dir: Path, *, ca_cert: Path, ca_key: Path,
                       hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365,
                       overwrite: bool = False) -> tuple[Path, Path]:
    """Create the SuperLink's TLS certificate, signed by the CA; return (crt, key) paths."""
    _check_days(days)
    if not hosts:
        raise ConfigError("hosts is empty; pass every name/IP the clients dial (--host localhost)")
    sans = [_san(h) for h in dict.fromkeys(hosts)]
    cert_path, key_path = Path(out_dir) / "server.crt", Path(out_dir) / "server.key"
    _check_free([cert_path, key_path], overwrite)
    authority, authority_key = _load_ca(ca_cert, ca_key)
    key = ec.generate_private_key(_CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    ski = authority.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        _builder(subject, authority.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage("digital_signature"), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(authority_key, _HASH())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    log.info("created server certificate %s for %s", cert_path, ", ".join(dict.fromkeys(hosts)))
    return cert_path, key_path


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"node name {name!r} is invalid; use letters, digits, '_', '.', '-' "
            "starting with a letter or digit (e.g. hospital_a)"
        )


def create_node_keys(out_dir: Path, names: Sequence[str], *,
                     overwrite: bool = False) -> dict[str, tuple[Path, Path]]:
    """Create ECDSA P-384 SuperNode auth keys ``out_dir/nodes/<name>.key/.pub``."""
    for name in names:
        _check_name(name)
    pairs = {n: (Path(out_dir) / "nodes" / f"{n}.key", Path(out_dir) / "nodes" / f"{n}.pub")
             for n in names}
    _check_free([p for pair in pairs.values() for p in pair], overwrite)
    for name, (key_path, pub_path) in pairs.items():
        key = ec.generate_private_key(_CURVE())
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        _write(key_path, private, private=True)
        _write(pub_path, public + f" {name}\n".encode(), private=False)
        log.info("created node key %s (register with: flwr supernode register %s)",
                 key_path, pub_path)
    return pairs


def _existing_pair(first: Path, second: Path) -> bool:
    """True if both files exist, False if neither; ConfigError for half a pair."""
    if first.exists() != second.exists():
        present, missing = (first, second) if first.exists() else (second, first)
        raise ConfigError(
            f"{present} exists but {missing} is missing; restore it, or rerun with --force"
        )
    return first.exists()


def _check_covers(server_cert: Path, hosts: Sequence[str]) -> None:
    """Raise ConfigError if an existing server certificate lacks some of ``hosts``."""
    cert = x509.load_pem_x509_certificate(server_cert.read_bytes())
    try:
        sans = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = []
    missing = [h for h in hosts if _san(h) not in sans]
    if missing:
        raise ConfigError(
            f"existing {server_cert} does not cover host(s) {missing}; pass the same --host "
            "values as before, or delete server.crt and server.key to re-issue them from "
            "the same CA (or --force to regenerate everything)"
        )


def create_dev_pki(out_dir: Path, *, hosts: Sequence[str] = DEFAULT_HOSTS,
                   nodes: Sequence[str] = (), days: int = 365, overwrite: bool = False) -> DevPki:
    """Create the missing parts of a development PKI; reuse existing ones unless ``overwrite``."""
    _check_days(days)  # validate every input before writing anything
    for name in nodes:
        _check_name(name)
    for host in hosts:
        _san(host)
    out = Path(out_dir)
    ca_cert, ca_key = out / "ca.crt", out / "ca.key"
    if not overwrite and _existing_pair(ca_cert, ca_key):
        _load_ca(ca_cert, ca_key)
        log.info("reusing CA %s", ca_cert)
    else:
        create_ca(out, days=days, overwrite=overwrite)
    server_cert, server_key = out / "server.crt", out / "server.key"
    if not overwrite and _existing_pair(server_cert, server_key):
        _check_covers(server_cert, hosts)
        log.info("reusing server certificate %s", server_cert)
    else:
        create_server_cert(out, ca_cert=ca_cert, ca_key=ca_key, hosts=hosts, days=days,
                           overwrite=overwrite)
    node_keys: dict[str, tuple[Path, Path]] = {}
    missing = []
    for name in dict.fromkeys(nodes):
        pair = (out / "nodes" / f"{name}.key", out / "nodes" / f"{name}.pub")
        if not overwrite and _existing_pair(*pair):
            log.info("reusing node key %s", pair[0])
            node_keys[name] = pair
        else:
            missing.append(name)
    node_keys.update(create_node_keys(out, missing, overwrite=overwrite))
    return DevPki(ca_cert, ca_key, server_cert, server_key, node_keys)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m fedimg.deploy.certs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--host", action="append", help="SAN host/IP (repeat); "
                        f"default {' '.join(DEFAULT_HOSTS)}")
    parser.add_argument("--node", action="append", default=[], help="site name (repeat)")
    parser.add_argument("--days", type=int, default=365, help="validity in days")
    parser.add_argument("--force", action="store_true", help="regenerate every file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        pki = create_dev_pki(args.out, hosts=args.host or DEFAULT_HOSTS, nodes=args.node,
                             days=args.days, overwrite=args.force)
    except FedimgError as err:
        log.error("%s", err)
        return err.exit_code
    log.info("flower-superlink --ssl-ca-certfile %s --ssl-certfile %s --ssl-keyfile %s "
             "--enable-supernode-auth", pki.ca_cert, pki.server_cert, pki.server_key)
    log.info("flower-supernode --root-certificates %s --auth-supernode-private-key "
             "%s/<name>.key", pki.ca_cert, Path(args.out) / "nodes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
