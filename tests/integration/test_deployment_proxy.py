"""Only the coordinator submits runs: a real SuperLink behind nginx, on localhost.

The product's launcher (``python -m fedimg.server superlink``) starts Flower's
SuperLink on loopback with TLS, node authentication and a SuperExec secret, its
``flower-superexec``, and nginx on the sites' address. One warm site daemon joins
through nginx and trains a 1-round run; the flwr CLI is refused at the sites'
address and served on loopback; an unsigned ``AcquireTask`` is refused by the
SuperLink and by the site's SuperNode.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from site_images import write_site_images

from fedimg.deploy.certs import create_dev_pki
from fedimg.deploy.localhost import LocalFederation, free_port, site_yaml
from fedimg.deploy.flwr_cli import app_dir, run_config, write_connection

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("flower-superlink") is None,
                                 reason="Flower's deployment CLIs are not installed"),
              pytest.mark.skipif(shutil.which("nginx") is None
                                 and not Path("/usr/sbin/nginx").exists(),
                                 reason="nginx is not installed (apt-get install nginx-light)")]

CLASSES = ("Platelets", "RBC", "WBC")
RUN = ["scenario=medical", "data.dataset=bccd_cells", "data.image_size=32", "rounds=1",
       "clients=1", "fl.min_train_clients=1", "fl.min_evaluate_clients=1", "transfer.mode=head",
       "fl.central_eval=false", "output.progress=false"]
PUBLIC = "fedimg-proxy-public"  # a connection aimed at the sites' address (nginx)


@pytest.fixture(scope="module")
def site_port() -> int:
    """The site's SuperNode Runtime API port (its warm executor polls it)."""
    return free_port()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory,
               site_port: int) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("proxy_federation")
    fed = LocalFederation(root, connection="fedimg-proxy")
    pki = create_dev_pki(root / "pki", nodes=["hospital_a"])
    (root / "keys").mkdir()
    shutil.copy(root / "pki" / "nodes" / "hospital_a.pub", root / "keys")
    write_site_images(root / "data", classes=CLASSES, per_class=12, seed=0)
    try:
        fed.superlink(pki=root / "pki", keys=root / "keys")
        write_connection(PUBLIC, address=fed.address, root_certificates=pki.ca_cert,
                         home=root / "flwr_home")
        fed.daemon("hospital_a", site_yaml(
            root / "hospital_a.yaml", name="hospital_a", superlink=fed.address,
            ca=pki.ca_cert, key=root / "pki" / "nodes" / "hospital_a.key", data=root / "data",
            classes=CLASSES, port=site_port, state_dir=root / "state"))
        yield fed
    finally:
        fed.stop_all()


def test_the_site_joins_through_nginx_and_a_round_completes(federation) -> None:
    # Arrange: the site dials nginx's port, not the SuperLink's
    assert federation.address != federation.internal_address
    assert f"--superlink {federation.address}" in federation.output("hospital_a")
    # Act
    proc, run_dir = federation.run(RUN)
    # Assert: our flower-superexec launched the ServerApp; the round went through nginx
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final"]["round"] == 1 and results["final"]["fleet/ok"] == 1
    assert [s["name"] for s in results["data"]["sites"].values()] == ["hospital_a"]


def _flwr_ls(federation: LocalFederation, connection: str) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", "ls", connection, "--format", "json"], env=federation.env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_flwr_is_refused_at_the_sites_address_and_served_on_loopback(federation) -> None:
    # Act
    public, loopback = _flwr_ls(federation, PUBLIC), _flwr_ls(federation, federation.connection)
    # Assert
    assert loopback.returncode == 0, loopback.stdout + loopback.stderr
    assert json.loads(loopback.stdout[loopback.stdout.find("{"):])["success"] is True
    assert public.returncode != 0 or '"success": false' in public.stdout, public.stdout
    assert "403" in public.stdout + public.stderr
    assert "access forbidden by rule" in federation.output("server")  # nginx logged it


def _runs(federation: LocalFederation) -> list:
    listed = _flwr_ls(federation, federation.connection)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return json.loads(listed.stdout[listed.stdout.find("{"):])["runs"]


def test_flwr_run_at_the_sites_address_is_refused_and_starts_nothing(federation) -> None:
    # Arrange: the command fedimg-server run submits, aimed at nginx instead of loopback
    before = len(_runs(federation))
    command = ["flwr", "run", str(app_dir()), PUBLIC, "--run-config",
               run_config("medical", RUN[1:])]
    # Act
    proc = subprocess.run(command, cwd=app_dir(), env=federation.env, capture_output=True,
                          text=True, timeout=300, check=False)
    # Assert: refused by nginx (403), and the SuperLink knows no new run
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "403" in proc.stdout + proc.stderr
    assert len(_runs(federation)) == before


def test_the_control_api_is_not_reachable_through_nginx(federation) -> None:
    # Arrange
    ca = str(federation.root / "pki" / "ca.crt")
    # Act: the request `flwr run` makes, at each address
    with httpx.Client(verify=ca, timeout=30) as client:
        answers = {address: client.post(f"https://{address}/v1/control/list-runs",
                                        headers={"content-type": "application/protobuf"},
                                        content=b"").status_code
                   for address in (federation.address, federation.internal_address)}
    # Assert
    assert answers == {federation.address: 403, federation.internal_address: 200}


def _acquire_unsigned(address: str, *, ca: str | None) -> int:
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=ca is None, root_certificates=ca,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])
    try:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-serverapp",
                                                                    "flwr-clientapp"]))
    except httpx.HTTPStatusError as exc:
        return exc.response.status_code
    finally:
        client.close()
    return 200


def test_an_unsigned_acquire_task_is_refused_by_superlink_and_supernode(federation,
                                                                        site_port) -> None:
    # Act: another local process tries to take tasks without the per-start secret
    superlink = _acquire_unsigned(federation.internal_address,
                                  ca=str(federation.root / "pki" / "ca.crt"))
    supernode = _acquire_unsigned(f"127.0.0.1:{site_port}", ca=None)
    # Assert: Flower's RUNTIME_AUTHENTICATION_FAILED (API error 1008) is HTTP 401
    assert (superlink, supernode) == (401, 401)
