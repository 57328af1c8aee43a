"""The coordinator's nginx: only the Fleet API is forwarded, everything else is refused.

The config tests read the generated ``nginx.conf``; ``nginx -t`` checks it for real;
the process test puts a real nginx in front of a small HTTPS upstream (the dev PKI's
server certificate, like the SuperLink's) and sends it real requests.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from fedimg.deploy import proxy
from fedimg.deploy.certs import DevPki, create_dev_pki
from fedimg.deploy.processes import private_dir
from fedimg.deploy.localhost import free_port
from fedimg.deploy.proxy import (
    ProxySettings,
    check_config,
    nginx_binary,
    nginx_config,
    start_proxy,
    upstream_name,
)
from fedimg.errors import ConfigError


def _have_nginx() -> bool:
    try:
        nginx_binary()
    except ConfigError:
        return False
    return True


needs_nginx = pytest.mark.skipif(not _have_nginx(),
                                 reason="nginx is not installed (apt-get install nginx-light)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return create_dev_pki(tmp_path_factory.mktemp("pki"))  # SANs: localhost, 127.0.0.1


def _settings(pki: DevPki, runtime: Path, *, port: int = 9092,
              upstream: int = 9093) -> ProxySettings:
    return ProxySettings(listen_host="127.0.0.1", listen_port=port, upstream_port=upstream,
                         certificate=pki.server_cert, private_key=pki.server_key,
                         ca_certificate=pki.ca_cert, runtime_dir=runtime,
                         upstream_name=upstream_name(pki.server_cert))


def _locations(config: str) -> dict[str, str]:
    """``location`` pattern -> the text after it (up to the next one), from an nginx.conf."""
    parts = config.split("        location ")[1:]
    return dict(part.split(" {", 1) for part in parts)


# --- the generated config ------------------------------------------------------------

def test_only_the_fleet_location_is_proxied_and_the_rest_is_denied(pki: DevPki,
                                                                  tmp_path: Path) -> None:
    # Arrange
    settings = _settings(pki, tmp_path)
    # Act
    config = nginx_config(settings)
    locations = _locations(config)
    # Assert
    assert list(locations) == [r"~ ^/v1/fleet/[a-z0-9-]+$", "/"]
    fleet = locations[r"~ ^/v1/fleet/[a-z0-9-]+$"]
    assert config.count("proxy_pass") == 1 and "proxy_pass https://fedimg_superlink$uri;" in fleet
    assert "limit_except POST { deny all; }" in fleet
    assert locations["/"].split("}")[0].strip() == "deny all;"
    assert "server 127.0.0.1:9093;" in config and "listen 127.0.0.1:9092 ssl;" in config


def test_the_upstream_is_checked_against_the_ca_under_a_dns_name(pki: DevPki,
                                                                 tmp_path: Path) -> None:
    # Act
    config = nginx_config(_settings(pki, tmp_path))
    # Assert
    for line in ("proxy_ssl_verify on;", f"proxy_ssl_trusted_certificate {pki.ca_cert};",
                 "proxy_ssl_name localhost;", "proxy_http_version 1.1;",
                 f"ssl_certificate {pki.server_cert};", "client_max_body_size 1g;",
                 "proxy_read_timeout 300s;", "proxy_request_buffering off;"):
        assert line in config, line
    assert "proxy_set_header" in config and "proxy_pass_request_headers off" not in config


def test_pid_and_temp_paths_lie_under_the_runtime_dir_and_no_user_unless_root(
        pki: DevPki, tmp_path: Path) -> None:
    # Arrange
    settings = _settings(pki, tmp_path / "run")
    # Act
    plain, as_root = nginx_config(settings), nginx_config(settings, user="nobody nogroup")
    # Assert
    paths = re.findall(r"^\s*(?:pid|\w+_temp_path) (\S+);", plain, flags=re.M)
    assert len(paths) == 6 and all(p.startswith(f"{tmp_path / 'run' / 'nginx'}/") for p in paths)
    assert "error_log stderr" in plain and "daemon" not in plain
    assert "user " not in plain and as_root.startswith("user nobody nogroup;\n")


def test_the_upstream_name_is_a_dns_name_of_the_certificate(tmp_path: Path) -> None:
    # Arrange
    named = create_dev_pki(tmp_path / "named", hosts=["fl.example.org", "127.0.0.1"])
    ip_only = create_dev_pki(tmp_path / "ip", hosts=["127.0.0.1"])
    # Act / Assert
    assert upstream_name(named.server_cert) == "fl.example.org"
    with pytest.raises(ConfigError, match="names no DNS host.*--host localhost"):
        upstream_name(ip_only.server_cert)


def test_a_missing_nginx_is_one_line_saying_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange
    monkeypatch.setattr(proxy.shutil, "which", lambda *args, **kwargs: None)
    # Act
    with pytest.raises(ConfigError) as caught:
        nginx_binary()
    # Assert
    message = str(caught.value)
    assert "\n" not in message and "nginx is not installed" in message
    assert "apt-get install nginx-light" in message


@needs_nginx
def test_nginx_accepts_the_generated_config(pki: DevPki) -> None:
    # Arrange
    with private_dir(None, prefix="fedimg-test-proxy-") as runtime:
        settings = _settings(pki, runtime, port=free_port(), upstream=free_port())
        # Act
        path = check_config(settings)
        # Assert: `nginx -t -c` on the very file
        proc = subprocess.run([nginx_binary(), "-t", "-p", f"{settings.prefix}/", "-c",
                               str(path), "-e", "stderr"], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        assert "test is successful" in proc.stderr


@needs_nginx
def test_a_config_nginx_refuses_is_a_config_error(pki: DevPki, tmp_path: Path) -> None:
    # Arrange: a key file that is not a key
    (tmp_path / "bad.key").write_text("not a key\n")
    with private_dir(None, prefix="fedimg-test-proxy-") as runtime:
        settings = replace(_settings(pki, runtime), private_key=tmp_path / "bad.key")
        # Act / Assert
        with pytest.raises(ConfigError, match="nginx refused the generated config"):
            check_config(settings)


# --- a real nginx in front of a small HTTPS upstream ---------------------------------

class _Echo(BaseHTTPRequestHandler):
    """Answers every request with what it got: method, path, headers, body length."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        received = len(self.rfile.read(length)) if length else 0
        body = json.dumps({"method": self.command, "path": self.path, "bytes": received,
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def proxied(pki: DevPki) -> Iterator[str]:
    """nginx on 127.0.0.1:<port> before an HTTPS echo server; yields nginx's base URL."""
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    upstream.socket = context.wrap_socket(upstream.socket, server_side=True)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    with private_dir(None, prefix="fedimg-test-proxy-") as runtime:
        port = free_port()
        nginx = start_proxy(_settings(pki, runtime, port=port,
                                      upstream=upstream.server_address[1]))
        try:
            _wait_for(f"https://127.0.0.1:{port}", pki, nginx)
            yield f"https://127.0.0.1:{port}"
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)
            upstream.shutdown()


def _wait_for(url: str, pki: DevPki, nginx: subprocess.Popen) -> None:
    for _ in range(100):
        assert nginx.poll() is None, "nginx exited"
        try:
            httpx.get(url, verify=str(pki.ca_cert), timeout=1)
            return
        except httpx.HTTPError:
            threading.Event().wait(0.05)
    raise AssertionError(f"nginx did not answer on {url}")


@needs_nginx
def test_fleet_requests_pass_with_their_headers_and_body(proxied: str, pki: DevPki) -> None:
    # Arrange: what a SuperNode sends (node-auth headers), and a 20 MiB model update
    headers = {"content-type": "application/protobuf", "flwr-public-key": "cHVi",
               "flwr-signature": "c2ln", "flwr-timestamp": "2026-01-01T00:00:00+00:00"}
    body = b"\x07" * (20 * 2**20)
    # Act
    with httpx.Client(verify=str(pki.ca_cert), timeout=30) as client:
        pulled = client.post(f"{proxied}/v1/fleet/pull-messages", headers=headers, content=b"")
        pushed = client.post(f"{proxied}/v1/fleet/push-object", headers=headers, content=body)
    # Assert
    assert pulled.status_code == 200 and pushed.status_code == 200
    seen = pulled.json()
    assert seen["method"] == "POST" and seen["path"] == "/v1/fleet/pull-messages"
    assert {k: seen["headers"][k] for k in headers} == headers
    assert pushed.json()["bytes"] == 20_971_520


@needs_nginx
@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/runtime/acquire-task"),
    ("GET", "/docs"),
    ("GET", "/health"),
    ("GET", "/v1/fleet/pull-messages"),  # the Fleet API is POST only
    ("POST", "/v1/fleet/../control/start-run"),
    ("POST", "/v1/fleet/%2e%2e/control/start-run"),
    ("POST", "/v1/fleet/..%2Fcontrol/start-run"),
    ("POST", "/v1/fleetx/pull-messages"),
])
def test_everything_else_is_refused_with_403(proxied: str, pki: DevPki, method: str,
                                             path: str) -> None:
    # Act: the raw path, as sent (httpx would normalise "..")
    with httpx.Client(verify=str(pki.ca_cert), timeout=10) as client:
        request = client.build_request(method, proxied)
        request.url = request.url.copy_with(raw_path=path.encode())
        response = client.send(request)
    # Assert: nginx answers; the upstream never sees it
    assert response.status_code == 403
    assert "application/json" not in response.headers.get("content-type", "")
