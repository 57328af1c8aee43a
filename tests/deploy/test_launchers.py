"""Tests of fedimg-client and fedimg-server without a network: commands, supervision, config.

Supervised children are small Python scripts that print what flower-supernode
prints in each situation (its exit status is 1 for every error; the Flower exit
code, e.g. 305, is only in its log) and count their starts in a file.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from fedimg.deploy import client, server
from fedimg.deploy.certs import create_dev_pki
from fedimg.deploy.client import (
    EXIT_GAVE_UP,
    EXIT_UNREGISTERED,
    supernode_command,
    supervise,
    warn_if_key_exposed,
)
from fedimg.deploy.client import (
    main as client_main,
)
from fedimg.deploy.processes import private_dir, write_secret
from fedimg.deploy.flwr_cli import app_dir, register_key, run_config, write_connection
from fedimg.deploy.server import (
    ServerConfig,
    load_server_config,
    superexec_command,
    superlink_command,
)
from fedimg.deploy.server import (
    main as server_main,
)
from fedimg.deploy.site import ReconnectPolicy, load_site_config, node_config

UNREGISTERED = ("Exit Code: 305\\nFailed to initialize the connection to the SuperLink.\\n"
                "[code: 2004] Failed to activate SuperNode.")
TLS = "SSL/TLS handshake error detected.\\nExit Code: 305\\n[SSL: CERTIFICATE_VERIFY_FAILED]"
CONNECTED = "SuperNode ID: 4177791998279087346"
STOP_PARENT = "STOP"  # the child sends SIGTERM to the daemon, like systemctl stop


def _child(tmp_path: Path, script: list[tuple[str, int | str]]) -> list[str]:
    """A command whose n-th start prints ``script[n][0]`` and exits ``script[n][1]``."""
    counter = tmp_path / "starts"
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        counter = Path({str(counter)!r})
        n = len(counter.read_text()) if counter.exists() else 0
        counter.write_text("x" * (n + 1))
        text, code = {script!r}[min(n, {len(script) - 1})]
        print(text, flush=True)
        if code == {STOP_PARENT!r}:
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(30)
        sys.exit(code)
    """)
    return [sys.executable, "-c", code]


def _starts(tmp_path: Path) -> int:
    return len((tmp_path / "starts").read_text())


def _site_yaml(tmp_path: Path, data: Path, extra: str = "") -> Path:
    (tmp_path / "ca.crt").write_text("CA")
    (tmp_path / "node.key").write_text("KEY")
    path = tmp_path / "site.yaml"
    path.write_text(f"name: hospital_a\nsuperlink: 127.0.0.1:9692\nca_certificate: ca.crt\n"
                    f"private_key: node.key\ndata: {data}\ndevice: cpu\n"
                    f"state_dir: {tmp_path / 'state'}\n{extra}")
    return path


# --- fedimg-client ---------------------------------------------------------------------

def test_supernode_command_uses_tls_auth_and_the_node_config(tmp_path: Path) -> None:
    # Arrange
    site = load_site_config(_site_yaml(tmp_path, tmp_path / "data",
                                       "limits: {num_threads: 2}\nport: 9694\nwarm: false\n"))
    # Act: a warm: false site ignores the secret (Flower's subprocess isolation would)
    command = supernode_command(site, secret_file=tmp_path / "superexec.secret")
    # Assert
    assert Path(command[0]).name == "flower-supernode"
    assert command[1:] == [
        "--superlink", "127.0.0.1:9692",
        "--root-certificates", str(tmp_path / "ca.crt"),
        "--auth-supernode-private-key", str(tmp_path / "node.key"),
        "--node-config", node_config(site),
        "--port", "9694"]
    assert node_config(site).startswith(f'site="hospital_a" data-path="{tmp_path / "data"}" '
                                        'device="cpu" num-threads=2 min-samples=16')
    assert "--insecure" not in command and "--superexec-auth-secret-file" not in command


def test_a_private_key_readable_by_others_is_warned_about(tmp_path: Path, caplog) -> None:
    site = load_site_config(_site_yaml(tmp_path, tmp_path / "data"))
    site.private_key.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert warn_if_key_exposed(site) is True
    assert "chmod 600" in caplog.text and "644" in caplog.text
    site.private_key.chmod(0o600)
    assert warn_if_key_exposed(site) is False


def test_a_warm_site_runs_the_supernode_under_the_warm_executor(tmp_path: Path) -> None:
    # Arrange
    site = load_site_config(_site_yaml(tmp_path, tmp_path / "data", "port: 9694\n"))
    secret = tmp_path / "runtime" / "superexec.secret"
    # Act
    command = supernode_command(site, secret_file=secret)
    # Assert: the executor serves the SuperNode's local Runtime API, signing AcquireTask
    # with the secret the SuperNode checks; the SuperNode runs no executor of its own.
    assert command[1:7] == ["-m", "fedimg.deploy.warm", "--runtime-api-address",
                            "127.0.0.1:9694", "--superexec-auth-secret-file", str(secret)]
    inner = command[command.index("--") + 1:]
    assert Path(inner[0]).name == "flower-supernode"
    assert inner[-4:] == ["--isolation", "process", "--superexec-auth-secret-file",
                          str(secret)]
    assert "--insecure" not in inner


def test_a_secret_is_32_fresh_bytes_only_its_owner_can_read(tmp_path: Path) -> None:
    # Act
    with private_dir(tmp_path / "state", prefix="unused-") as runtime:
        first = write_secret(runtime).read_bytes()
        path = write_secret(runtime)
        modes = (runtime.stat().st_mode & 0o777, path.stat().st_mode & 0o777)
        second = path.read_bytes()
    # Assert: state_dir/runtime, 0700; the file 0600; a new secret per start; removed after
    assert runtime == tmp_path / "state" / "runtime" and modes == (0o700, 0o600)
    assert len(first) == len(second) == 32 and first != second
    assert not runtime.exists()


def test_without_a_state_dir_the_secret_lies_in_a_private_temp_dir() -> None:
    with private_dir(None, prefix="fedimg-test-") as runtime:
        assert runtime.name.startswith("fedimg-test-")
        assert runtime.stat().st_mode & 0o777 == 0o700
    assert not runtime.exists()


def test_unregistered_node_exits_10_after_one_start(tmp_path: Path) -> None:
    # Arrange
    command = _child(tmp_path, [(UNREGISTERED, 1)])
    # Act
    code = supervise(command, reconnect=ReconnectPolicy(backoff_s=0, activation_grace_s=0))
    # Assert
    assert code == EXIT_UNREGISTERED == 10 and _starts(tmp_path) == 1


def test_a_refused_activation_is_retried_for_the_grace_period(tmp_path: Path) -> None:
    # Arrange: a node Flower still counts as online is refused like an unknown key.
    command = _child(tmp_path, [(UNREGISTERED, 1)] * 50)
    # Act
    started = time.monotonic()
    code = supervise(command, reconnect=ReconnectPolicy(backoff_s=0.2, activation_grace_s=1.0))
    # Assert: restarted until the refusal had lasted 1 s, then believed.
    assert code == EXIT_UNREGISTERED and _starts(tmp_path) >= 3
    assert time.monotonic() - started >= 1.0


def test_tls_rejection_exits_2_after_one_start(tmp_path: Path) -> None:
    # Arrange
    command = _child(tmp_path, [(TLS, 1)])
    # Act
    code = supervise(command, reconnect=ReconnectPolicy(backoff_s=0))
    # Assert
    assert code == 2 and _starts(tmp_path) == 1


def test_exits_are_restarted_until_sigterm_stops_the_daemon(tmp_path: Path) -> None:
    # Arrange: a crash, then the clean exit Flower makes after a SuperLink restart
    command = _child(tmp_path, [("crash", 1), ("SuperNode terminated gracefully.", 0),
                                ("running", STOP_PARENT)])
    # Act
    code = supervise(command, reconnect=ReconnectPolicy(backoff_s=0))
    # Assert
    assert code == 0 and _starts(tmp_path) == 3


def test_unregistered_after_a_connection_is_retried(tmp_path: Path) -> None:
    # Arrange: connected, the SuperLink restarts, the key is not re-registered yet
    command = _child(tmp_path, [(CONNECTED, 0), (UNREGISTERED, 1), ("running", STOP_PARENT)])
    # Act
    code = supervise(command, reconnect=ReconnectPolicy(backoff_s=0))
    # Assert
    assert code == 0 and _starts(tmp_path) == 3


def test_gives_up_after_max_wait(tmp_path: Path) -> None:
    # Arrange
    command = _child(tmp_path, [("Connection refused", 1)])
    # Act
    code = supervise(command, reconnect=ReconnectPolicy(max_wait_s=0.5, backoff_s=0.2))
    # Assert
    assert code == EXIT_GAVE_UP == 11 and 1 <= _starts(tmp_path) <= 3


def test_flower_giving_up_after_max_wait_time_is_final(tmp_path: Path) -> None:
    # Arrange: flower-supernode --max-wait-time ran out (the daemon passes max_wait_s)
    command = _child(tmp_path, [(CONNECTED + "\\nGiving up reconnection after 60.1 seconds", 1)])
    # Act
    code = supervise(command, reconnect=ReconnectPolicy(max_wait_s=60, backoff_s=0))
    # Assert
    assert code == EXIT_GAVE_UP and _starts(tmp_path) == 1


def _image_folder(root: Path, classes: list[str], per_class: int = 20) -> Path:
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (40 * k, 5 * i, 100)).save(root / name / f"{i:02d}.png")
    return root


def _only(program: str, calls: list[list[str]], real: Callable, result: object = None
          ) -> Callable:
    """A stand-in for subprocess.run/Popen that records (not runs) ``program``'s calls."""
    def fake(command: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(command, list) and Path(command[0]).name == program:
            calls.append(command)
            return result
        return real(command, *args, **kwargs)  # e.g. torch probing the CPU at import
    return fake


@pytest.fixture()
def no_supernode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[list[str]]:
    """Record (not run) flower-supernode starts; keep the decode cache in tmp_path."""
    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", _only("flower-supernode", started, subprocess.Popen))
    monkeypatch.setenv("FEDIMG_CACHE", str(tmp_path / "cache"))
    return started


def test_check_on_valid_data_returns_0_without_starting(tmp_path: Path,
                                                         no_supernode: list[list[str]]) -> None:
    # Arrange
    data = _image_folder(tmp_path / "data", ["a", "b", "c"])
    site = _site_yaml(tmp_path, data, "classes: [a, b, c]\n")
    # Act
    code = client_main(["--site", str(site), "--check"])
    # Assert
    assert code == 0 and no_supernode == []


def test_check_on_a_corrupt_png_returns_3_naming_it(tmp_path: Path,
                                                    no_supernode: list[list[str]],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    # Arrange
    data = _image_folder(tmp_path / "data", ["a", "b", "c"])
    (data / "b" / "07.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    site = _site_yaml(tmp_path, data, "classes: [a, b, c]\n")
    # Act
    with caplog.at_level(logging.ERROR):
        code = client_main(["--site", str(site), "--check"])
    # Assert
    assert code == 3 and no_supernode == []
    assert "b/07.png" in caplog.text


def test_bad_site_config_returns_2(tmp_path: Path, no_supernode: list[list[str]]) -> None:
    # Arrange
    site = _site_yaml(tmp_path, tmp_path / "data", "devcie: cpu\n")
    # Act
    code = client_main(["--site", str(site), "--check"])
    # Assert
    assert code == 2 and no_supernode == []


@pytest.mark.parametrize("warm", [True, False])
def test_the_daemon_makes_a_secret_for_a_warm_site_only(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        warm: bool) -> None:
    # Arrange: record the supervised command and what the secret file held meanwhile
    seen: dict[str, object] = {}

    def fake_supervise(command: list[str], **kwargs: object) -> int:
        flag = "--superexec-auth-secret-file"
        path = Path(command[command.index(flag) + 1]) if flag in command else None
        seen.update(command=command, path=path, mode=path and path.stat().st_mode & 0o777,
                    size=path and len(path.read_bytes()))
        return 0

    monkeypatch.setattr(client, "supervise", fake_supervise)
    monkeypatch.setenv("FEDIMG_CACHE", str(tmp_path / "cache"))
    data = _image_folder(tmp_path / "data", ["a", "b", "c"])
    site = _site_yaml(tmp_path, data, f"classes: [a, b, c]\nwarm: {str(warm).lower()}\n")
    # Act
    with caplog.at_level(logging.INFO):
        code = client_main(["--site", str(site)])
    # Assert
    assert code == 0
    if warm:  # under state_dir/runtime, 0600, 32 bytes, passed to both processes; removed
        assert seen["path"] == tmp_path / "state" / "runtime" / "superexec.secret"
        assert (seen["mode"], seen["size"]) == (0o600, 32)
        assert seen["command"].count("--superexec-auth-secret-file") == 2
        assert not seen["path"].exists()
    else:
        assert seen["path"] is None
        assert caplog.text.count("ignores a SuperExec secret") == 1


# --- fedimg-server ---------------------------------------------------------------------

def test_superlink_command_listens_on_loopback_with_tls_node_auth_and_a_secret(
        tmp_path: Path) -> None:
    # Arrange
    create_dev_pki(tmp_path)
    cfg = ServerConfig(certs=tmp_path, host="0.0.0.0", port=9692)
    # Act
    command = superlink_command(cfg, secret_file=tmp_path / "superexec.secret")
    # Assert: the sites' 0.0.0.0:9692 is nginx's; the SuperLink takes 127.0.0.1:9693
    assert Path(command[0]).name == "flower-superlink"
    assert command[1:] == [
        "--ssl-ca-certfile", str(tmp_path / "ca.crt"),
        "--ssl-certfile", str(tmp_path / "server.crt"),
        "--ssl-keyfile", str(tmp_path / "server.key"),
        "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", "9693",
        "--isolation", "process", "--superexec-auth-secret-file",
        str(tmp_path / "superexec.secret")]


def test_superexec_command_runs_serverapps_for_the_loopback_superlink(tmp_path: Path) -> None:
    # Arrange
    cfg = ServerConfig(certs=tmp_path, port=9692, internal_port=9700)
    # Act
    command = superexec_command(cfg, secret_file=tmp_path / "s")
    # Assert: TLS to the Runtime API, signed AcquireTask, no uv sync, dies with us
    assert Path(command[0]).name == "flower-superexec"
    assert command[1:] == ["--runtime-api-address", "127.0.0.1:9700",
                           "--root-certificates", str(tmp_path / "ca.crt"),
                           "--executor", "subprocess",
                           "--superexec-auth-secret-file", str(tmp_path / "s"),
                           "--parent-pid", str(os.getpid())]
    assert "--allow-runtime-dependency-installation" not in command


@pytest.mark.parametrize(("port", "internal", "cli", "expected"), [
    (9092, None, None, ("127.0.0.1:9093", "0.0.0.0:9092", "127.0.0.1:9093")),
    (9092, 9500, None, ("127.0.0.1:9500", "0.0.0.0:9092", "127.0.0.1:9500")),
    (9092, 9500, "localhost:9500", ("127.0.0.1:9500", "0.0.0.0:9092", "localhost:9500")),
])
def test_the_sites_dial_nginx_and_flwr_dials_the_loopback_superlink(
        tmp_path: Path, port: int, internal: int | None, cli: str | None,
        expected: tuple[str, str, str]) -> None:
    # Act
    cfg = server.checked(ServerConfig(certs=tmp_path, port=port, internal_port=internal,
                                      cli_address=cli), where="test")
    # Assert: (SuperLink, sites, flwr CLI)
    assert (cfg.internal_address, cfg.public_address, cfg.address) == expected


@pytest.mark.parametrize(("fields", "match"), [
    ({"internal_port": 9092}, "internal_port 9092 equals port"),
    ({"cli_address": "127.0.0.1:9092"}, "refuses the Control API.*127.0.0.1:9093"),
    ({"internal_port": 70000}, "outside 1..65535"),
])
def test_ports_that_would_collide_or_dial_the_proxy_are_refused(
        tmp_path: Path, fields: dict, match: str) -> None:
    with pytest.raises(server.ConfigError, match=match):
        server.checked(ServerConfig(certs=tmp_path, port=9092, **fields), where="test")


def test_internal_port_is_read_from_the_server_yaml(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "server.yaml"
    path.write_text("certs: certs\nport: 9092\ninternal_port: 9193\n")
    # Act
    cfg = load_server_config(path)
    # Assert
    assert (cfg.loopback_port, cfg.address) == (9193, "127.0.0.1:9193")


def test_a_server_certificate_without_127_0_0_1_is_refused_before_starting(
        tmp_path: Path) -> None:
    # Arrange: the SuperExec, ServerApps and flwr dial 127.0.0.1 with TLS
    create_dev_pki(tmp_path, hosts=["fl.example.org"])
    cfg = ServerConfig(certs=tmp_path)
    # Act / Assert
    with pytest.raises(server.ConfigError, match="does not name 127.0.0.1.*--host 127.0.0.1"):
        superlink_command(cfg, secret_file=tmp_path / "s")


def test_connection_update_keeps_other_tables_and_replaces_ours(tmp_path: Path) -> None:
    # Arrange: what `flwr config list` writes, plus an old fedimg entry
    (tmp_path / "config.toml").write_text(textwrap.dedent("""\
        [superlink]
        default = "local"

        [superlink.local]
        address = ":local:"

        [superlink.fedimg]
        address = "10.0.0.1:9092"
        root-certificates = "/old/ca.crt"
        insecure = true

        [superlink.supergrid]
        address = "api.flower.ai"
        """))
    # Act
    path = write_connection("fedimg", address="127.0.0.1:9692",
                            root_certificates=tmp_path / "ca.crt", home=tmp_path)
    # Assert
    links = tomllib.loads(path.read_text())["superlink"]
    assert links == {"default": "local", "local": {"address": ":local:"},
                     "supergrid": {"address": "api.flower.ai"},
                     "fedimg": {"address": "127.0.0.1:9692",
                                "root-certificates": str(tmp_path / "ca.crt")}}


def test_connection_is_created_in_a_new_flwr_home(tmp_path: Path) -> None:
    # Act
    path = write_connection("fedimg", address="127.0.0.1:9692",
                            root_certificates=tmp_path / "ca.crt", home=tmp_path / "home")
    # Assert
    assert tomllib.loads(path.read_text()) == {"superlink": {"fedimg": {
        "address": "127.0.0.1:9692", "root-certificates": str(tmp_path / "ca.crt")}}}


# flwr 1.41's answers to `flwr supernode register KEY CONN --format json` (exit status 0).
REGISTERED = {"success": True, "node-id": 4072684089028123098}
DUPLICATE = {"success": False, "error-message": (
    "Using SuperLink: fedimg (127.0.0.1:9641)\n\n[code: 23] Public key already in use.")}


@pytest.mark.parametrize(("reply", "expected"), [(REGISTERED, "4072684089028123098"),
                                                 (DUPLICATE, None)])
def test_registration_tolerates_a_key_registered_before(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path, reply: dict,
                                                        expected: str | None) -> None:
    # Arrange
    calls: list[list[str]] = []
    answer = SimpleNamespace(returncode=0, stdout=json.dumps(reply), stderr="")
    monkeypatch.setattr(subprocess, "run", _only("flwr", calls, subprocess.run, answer))
    key = tmp_path / "a.pub"
    key.write_text("ecdsa-sha2-nistp384 AAAA a\n")
    # Act
    node_id = register_key(key, connection="fedimg")
    # Assert
    assert node_id == expected
    assert calls[0][1:] == ["supernode", "register", str(key), "fedimg", "--format", "json"]


def test_run_with_an_unknown_key_returns_2_before_calling_flwr(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Arrange
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", _only("flwr", calls, subprocess.run))
    # Act
    code = server_main(["run", "scenario=medical", "rounds=2", "trian.lr=0.1",
                        "--runs-dir", str(tmp_path)])
    # Assert
    assert code == 2 and calls == []


def test_run_submits_the_validated_config_to_flwr(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Arrange
    calls: list[list[str]] = []
    done = subprocess.CompletedProcess(["flwr"], 7)
    monkeypatch.setattr(subprocess, "run", _only("flwr", calls, subprocess.run, done))
    run_dir = tmp_path / "r1"
    # Act
    code = server_main(["run", "scenario=medical", "rounds=2", f"output.run_dir={run_dir}",
                        "--connection", "fedimg"])
    # Assert
    (command,) = calls
    assert code == 7 and capsys.readouterr().out.endswith(f"run directory: {run_dir}\n")
    assert command[1:] == ["run", str(app_dir()), "fedimg", "--stream", "--run-config",
                           (f'scenario="medical" overrides="deploy.enabled=true rounds=2 '
                            f'output.run_dir={run_dir}"')]


def test_run_config_refuses_double_quotes() -> None:
    # Act / Assert
    with pytest.raises(server.ConfigError, match="contain '\"'"):
        run_config("medical", ['description="a b"'])
