"""The coordinator's front door: nginx forwards only the Fleet API to the SuperLink.

Flower 1.41's ``flower-superlink`` serves three APIs over one HTTPS port: the Fleet
API (``/v1/fleet/...``, what SuperNodes dial), the Control API (``/v1/control/...``,
what ``flwr run`` and ``flwr supernode register`` use; not authenticated in the
open-source build) and the Runtime API (``/v1/runtime/...``, ServerApp processes).
``fedimg-server superlink`` therefore binds the SuperLink to ``127.0.0.1:<internal
port>`` and puts nginx on the sites' ``host:port``:

* TLS there with the SuperLink's own ``server.crt`` / ``server.key``;
* ``POST /v1/fleet/<method>`` (:data:`FLEET_PATH`: the 12 methods of Flower's
  ``FleetHttpClient``) goes over HTTPS/1.1 to the loopback SuperLink, whose
  certificate nginx checks against ``ca.crt`` under a DNS name of the certificate
  (:func:`upstream_name`). Every request header is kept (the node-auth headers
  ``flwr-public-key``, ``flwr-signature``, ``flwr-timestamp`` and Flower's version
  headers included), bodies stream both ways, up to :data:`MAX_BODY`, with
  :data:`TIMEOUT_S` timeouts;
* every other path or method (``/v1/control/``, ``/v1/runtime/``, ``/docs``,
  ``/health``, ``GET /v1/fleet/...``) is answered 403, and nginx logs each refusal
  ("access forbidden by rule") to its stderr, i.e. the launcher's log.

nginx runs in the foreground (``daemon off``) as a child of the launcher, in its own
process group, with ``-p`` a private runtime dir that holds its config, pid file and
temp dirs; errors go to stderr. It needs no privileges; run as root, its workers
drop to ``nobody``.
"""

from __future__ import annotations

import ctypes
import grp
import logging
import os
import pwd
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedimg.errors import ConfigError

log = logging.getLogger(__name__)

FLEET_PATH = r"^/v1/fleet/[a-z0-9-]+$"  # nginx matches it on the normalised URI
MAX_BODY = "1g"  # Flower sends model arrays in 5 MB objects; whole messages stay far below
TIMEOUT_S = 300
INSTALL = "apt-get install nginx-light"
_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ProxySettings:
    """What nginx needs: where to listen, where the SuperLink is, TLS files, its own dir."""

    listen_host: str  # the sites' address (0.0.0.0, a public IP, or 127.0.0.1 on one host)
    listen_port: int
    upstream_port: int  # the SuperLink on 127.0.0.1
    certificate: Path  # server.crt: nginx's own and the one it checks upstream
    private_key: Path
    ca_certificate: Path
    runtime_dir: Path  # private (0700): nginx.conf, nginx.pid, temp dirs
    upstream_name: str = "localhost"  # a DNS name in server.crt (see upstream_name())

    @property
    def prefix(self) -> Path:
        return self.runtime_dir / "nginx"

    @property
    def config_path(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


def nginx_binary() -> str:
    """The nginx executable (PATH, then /usr/sbin); a ConfigError saying how to install it."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ConfigError(f"nginx is not installed; fedimg-server superlink runs it in front "
                          f"of the SuperLink so that sites reach only the Fleet API. Fix: "
                          f"{INSTALL} (or put nginx on PATH).")
    return found


def certificate_names(certificate: Path) -> tuple[list[str], list[str]]:
    """The DNS names and the IP addresses in ``certificate``'s subject alternative names."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(certificate.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise ConfigError(f"server certificate {certificate} cannot be read for its names "
                          f"({exc}). Fix: point certs at a folder with a PEM server.crt "
                          "(fedimg-server certs --out DIR --host ...).") from exc
    return (sans.get_values_for_type(x509.DNSName),
            [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)])


def upstream_name(certificate: Path) -> str:
    """A DNS name of ``certificate`` for ``proxy_ssl_name`` (``localhost`` if listed).

    nginx checks the upstream's name with ``X509_check_host``, which matches DNS
    names only: ``proxy_ssl_name 127.0.0.1`` fails ("upstream SSL certificate does
    not match") even when the certificate lists that IP address.
    """
    names = [n for n in certificate_names(certificate)[0] if not n.startswith("*.")]
    if not names:
        raise ConfigError(f"server certificate {certificate} names no DNS host, and nginx "
                          "checks the loopback SuperLink by DNS name. Fix: reissue it with "
                          "one, e.g. fedimg-server certs --out DIR --host <server name> "
                          "--host localhost --host 127.0.0.1 --force.")
    return "localhost" if "localhost" in names else names[0]


def worker_user() -> str | None:
    """``user`` for nginx's workers: ``nobody <its group>`` when run as root, else None."""
    if os.geteuid() != 0:
        return None
    nobody = pwd.getpwnam("nobody")
    return f"nobody {grp.getgrgid(nobody.pw_gid).gr_name}"


def _main_block(settings: ProxySettings, user: str | None) -> list[str]:
    temp = [f"    {kind}_temp_path {settings.prefix / 'temp' / kind};" for kind in _TEMP_DIRS]
    return [*([f"user {user};"] if user else []),
            "worker_processes 1;",
            f"pid {settings.prefix / 'nginx.pid'};",
            "error_log stderr warn;",
            "events { worker_connections 1024; }",
            "http {",
            "    access_log off;",
            "    server_tokens off;",
            "    underscores_in_headers on;",
            *temp,
            f"    client_max_body_size {MAX_BODY};",
            f"    client_body_timeout {TIMEOUT_S}s;",
            f"    send_timeout {TIMEOUT_S}s;",
            "    upstream fedimg_superlink {",
            f"        server 127.0.0.1:{settings.upstream_port};",
            "        keepalive 16;",
            "    }"]


def _server_block(settings: ProxySettings) -> list[str]:
    return ["    server {",
            f"        listen {settings.listen} ssl;",
            f"        ssl_certificate {settings.certificate};",
            f"        ssl_certificate_key {settings.private_key};",
            "        ssl_protocols TLSv1.2 TLSv1.3;",
            f"        location ~ {FLEET_PATH} {{",
            "            limit_except POST { deny all; }",
            "            proxy_pass https://fedimg_superlink$uri;",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            proxy_set_header Host $http_host;",
            "            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
            "            proxy_set_header X-Forwarded-Proto https;",
            "            proxy_request_buffering off;",
            "            proxy_buffering off;",
            "            proxy_connect_timeout 10s;",
            f"            proxy_send_timeout {TIMEOUT_S}s;",
            f"            proxy_read_timeout {TIMEOUT_S}s;",
            "            proxy_ssl_verify on;",
            f"            proxy_ssl_trusted_certificate {settings.ca_certificate};",
            "            proxy_ssl_verify_depth 4;",
            f"            proxy_ssl_name {settings.upstream_name};",
            "            proxy_ssl_server_name on;",
            "            proxy_ssl_session_reuse on;",
            "        }",
            "        location / { deny all; }",
            "    }"]


def nginx_config(settings: ProxySettings, *, user: str | None = None) -> str:
    """The whole ``nginx.conf``: the Fleet API forwarded, everything else denied."""
    return "\n".join([*_main_block(settings, user), *_server_block(settings), "}", ""])


def write_config(settings: ProxySettings) -> Path:
    """Write ``nginx.conf`` (and its temp dirs) under ``settings.prefix``; return its path."""
    user = worker_user()
    (settings.prefix / "temp").mkdir(parents=True, exist_ok=True)
    if user:  # workers (nobody) must reach their temp dirs; nothing secret lies on the way
        for folder in (settings.runtime_dir, settings.prefix, settings.prefix / "temp"):
            folder.chmod(0o711)
    settings.config_path.write_text(nginx_config(settings, user=user), encoding="utf-8")
    return settings.config_path


def nginx_command(settings: ProxySettings, *, test: bool = False) -> list[str]:
    """``nginx`` in the foreground with our prefix and config (``-t``: check it only)."""
    command = [nginx_binary(), "-p", f"{settings.prefix}/", "-c", str(settings.config_path),
               "-e", "stderr", "-g", "daemon off;"]
    return command + (["-t", "-q"] if test else [])


def check_config(settings: ProxySettings) -> Path:
    """Write the config and run ``nginx -t`` on it; a ConfigError with nginx's words."""
    path = write_config(settings)
    proc = subprocess.run(nginx_command(settings, test=True), capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"nginx refused the generated config {path}: "
                          f"{(proc.stderr or proc.stdout).strip()}. Fix: check the certs "
                          "folder and that the public host:port can be bound.")
    return path


def _die_with_parent() -> None:
    """In the child: SIGTERM it when the launcher dies, even by SIGKILL (Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def start_proxy(settings: ProxySettings) -> subprocess.Popen:
    """Check the config, then start nginx in its own process group; stderr is ours."""
    check_config(settings)
    command = nginx_command(settings)
    log.info("starting nginx on %s (Fleet API only) -> 127.0.0.1:%d", settings.listen,
             settings.upstream_port)
    return subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)
