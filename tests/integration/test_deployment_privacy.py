"""Each site owns its privacy, in a real localhost federation (TLS, node auth, proxy).

Three site daemons with DP policies join a real SuperLink through the product's
launchers. The tests kill a site's SuperNode with SIGKILL in the middle of its DP
round, spend across two runs, exhaust one site's lifetime budget, submit runs the
sites' policies refuse, and kill and resume a deployed run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from site_images import write_site_images

from fedimg.deploy.certs import create_dev_pki
from fedimg.deploy.localhost import LocalFederation, free_port, site_yaml
from fedimg.privacy.accounting import epsilon
from fedimg.privacy.site_ledger import ledger_path

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("flower-superlink") is None,
                                 reason="Flower's deployment CLIs are not installed")]

CLASSES = ("Platelets", "RBC", "WBC")
SITES = ("hospital_a", "hospital_b", "hospital_c")
BASE = ["scenario=medical", "data.dataset=bccd_cells", "data.image_size=32",
        "transfer.mode=head", "output.progress=false", "fl.central_eval=false",
        "fl.fraction_evaluate=0", "fl.min_evaluate_clients=0",  # training is what is tested
        "fl.timeout_s=240", "fl.round_retries=0"]
DP = [*BASE, "privacy=dp_sgd", "train.local_steps=40", "train.batch_size=8",
      "privacy.target_epsilon=6", "clients=3"]
LIFETIME_DELTA = 1e-5


def _policy(lifetime_epsilon: float = 1000.0) -> str:
    return ("policy: {require_dp: true, max_run_epsilon: 8, lifetime_epsilon: "
            f"{lifetime_epsilon}, lifetime_delta: {LIFETIME_DELTA}}}\n")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("privacy_federation")
    fed = LocalFederation(root, connection="fedimg-privacy")
    create_dev_pki(root / "pki", nodes=list(SITES))
    (root / "keys").mkdir()
    for name in SITES:
        shutil.copy(root / "pki" / "nodes" / f"{name}.pub", root / "keys")
        # equal sizes, so equal sigma and q at every site
        write_site_images(root / "data" / name, classes=CLASSES, per_class=12, seed=0)
    try:
        fed.superlink(pki=root / "pki", keys=root / "keys")
        for name in SITES:
            fed.daemon(name, _site(fed, name))
        yield fed
    finally:
        fed.stop_all()


def _site(fed: LocalFederation, name: str, *, lifetime_epsilon: float = 1000.0) -> Path:
    pki = fed.root / "pki"
    return site_yaml(fed.root / f"{name}.yaml", name=name, superlink=fed.address,
                     ca=pki / "ca.crt", key=pki / "nodes" / f"{name}.key",
                     data=fed.root / "data" / name, classes=CLASSES, port=free_port(),
                     state_dir=fed.root / "state" / name,
                     extra="federation: privacy-test\n" + _policy(lifetime_epsilon))


def _lifetime(fed: LocalFederation, name: str) -> float:
    history = [h for run in _ledger(fed, name)["runs"].values() for h in run["history"]]
    return epsilon(history, LIFETIME_DELTA, "prv")


def _client(run_dir: Path, name: str) -> str:
    sites = _results(run_dir)["data"]["sites"]
    return next(cid for cid, site in sites.items() if site["name"] == name)


def _rounds_sent(run_dir: Path, name: str) -> list[int]:
    """The rounds in which site ``name``'s update reached the server."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cid = _client(run_dir, name)
    return [r["round"] for r in records if cid in r.get("clients", {})
            and "train" in r["clients"][cid] and "train_status" not in r["clients"][cid]]


def _last_train(run_dir: Path, name: str) -> dict:
    """Site ``name``'s entry in the last round whose update of it reached the server."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cid = _client(run_dir, name)
    return next(r["clients"][cid] for r in reversed(records) if "train" in
                r.get("clients", {}).get(cid, {}))


def _epsilon_of_rounds(history: list, rounds: int, delta: float) -> float:
    """ε of ``history`` (one run of a site) with its DP-SGD steps cut to ``rounds`` rounds."""
    releases = [h for h in history if h[1] == 1]  # the label-count release, once a run
    sigma, q = next(h[:2] for h in history if h[1] < 1)
    return epsilon([*releases, [sigma, q, 40 * rounds]], delta, "prv")


def _ledger(fed: LocalFederation, name: str) -> dict:
    path = ledger_path(fed.root / "state" / name, federation="privacy-test", site=name)
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def _steps(fed: LocalFederation, name: str) -> int:
    """Noisy DP-SGD steps on record at site ``name``, over every run."""
    return sum(int(h[2]) for run in _ledger(fed, name)["runs"].values()
               for h in run["history"] if h[1] < 1)  # q = 1: the label-count release


def _supernode_pid(fed: LocalFederation, name: str) -> int:
    text = (fed.root / f"{name}.yaml").read_text()
    port = next(line.split(":")[1].strip() for line in text.splitlines()
                if line.startswith("port:"))
    out = subprocess.run(["pgrep", "-f", f"flower-supernode.*--port {port}"],
                         capture_output=True, text=True).stdout.split()
    assert out, f"no SuperNode of {name} running"
    return int(out[0])


def _kill_mid_round(fed: LocalFederation, name: str, *, rounds_before: int) -> None:
    """SIGKILL site ``name``'s SuperNode once its next round is written ahead (training)."""
    deadline = time.monotonic() + 300
    while _steps(fed, name) <= 40 * rounds_before:
        assert time.monotonic() < deadline, "the site never started its round"
        time.sleep(0.05)
    os.kill(_supernode_pid(fed, name), signal.SIGKILL)


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_a_killed_dp_site_never_spends_less_and_a_second_run_continues(federation) -> None:
    # Arrange: a 3-round DP run, submitted in the background
    fed = federation
    proc = fed.submit([*DP, "rounds=3"])
    # Act: kill hospital_a's SuperNode during its second round
    _kill_mid_round(fed, "hospital_a", rounds_before=1)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    run_dir = fed.run_dir(out)
    # Assert: the rounds whose update left the site, plus the killed one, are on record
    sent = _rounds_sent(run_dir, "hospital_a")
    assert 1 in sent and 2 not in sent
    assert _steps(fed, "hospital_a") == 40 * (len(sent) + 1)
    assert _rounds_sent(run_dir, "hospital_b") == [1, 2, 3]
    assert _steps(fed, "hospital_b") == 3 * 40  # the uninterrupted site
    run_a = next(iter(_ledger(fed, "hospital_a")["runs"].values()))
    run_b = next(iter(_ledger(fed, "hospital_b")["runs"].values()))
    spent_a = epsilon(run_a["history"], run_a["delta"], "prv")
    # equal data, so equal σ and q: a's ε is the uninterrupted b's for the rounds a sent,
    # plus the killed round, never less
    assert spent_a == pytest.approx(
        _epsilon_of_rounds(run_b["history"], len(sent) + 1, run_b["delta"]), rel=1e-9)
    assert spent_a > _epsilon_of_rounds(run_b["history"], len(sent), run_b["delta"])
    if sent[-1] == 3:  # it came back in time for round 3: its report is the full spend
        last = _last_train(run_dir, "hospital_a")["train"]
        assert last["dp/epsilon"] == pytest.approx(spent_a, rel=1e-9)
    # Act: a second run on the same sites
    second, run_dir = fed.run([*DP, "rounds=1"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # Assert: the site's lifetime spend composes both runs, as it reported it
    assert _steps(fed, "hospital_a") == 40 * (len(sent) + 1) + 40
    reported = _last_train(run_dir, "hospital_a")["train"]["dp/lifetime_epsilon"]
    assert reported == pytest.approx(_lifetime(fed, "hospital_a"), rel=1e-9)
    assert reported > epsilon(run_a["history"], LIFETIME_DELTA, "prv")


def test_a_secure_round_survives_a_site_killed_after_sharing_keys(federation) -> None:
    # Arrange: DP-SGD under SecAgg+ at three sites; hospital_b will die mid-protocol
    fed = federation
    sent = "Sending: train message"  # the SuperNode's line for each reply it sends
    before = fed.output("hospital_b").count(sent)
    proc = fed.submit([*DP, "rounds=1", "fl.secure_aggregation=secaggplus", "fl.timeout_s=90"])
    # Act: SIGKILL its SuperNode once its second reply (the encrypted key shares) left
    deadline = time.monotonic() + 300
    while fed.output("hospital_b").count(sent) < before + 2:
        assert time.monotonic() < deadline, "hospital_b never shared its keys"
        time.sleep(0.05)
    os.kill(_supernode_pid(fed, "hospital_b"), signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    # Assert: the round released the sum of the two survivors, and never b's update
    assert proc.returncode == 0, out[-3000:]
    run_dir = fed.run_dir(out)
    record = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
    assert record["secagg/contributors"] == 2 and record["fleet/ok"] == 2
    assert _rounds_sent(run_dir, "hospital_b") == []
    for stage in ("setup", "share_keys", "collect", "unmask"):
        assert record[f"secagg/{stage}_bytes"] > 0


def test_a_site_past_its_lifetime_budget_declines_and_the_run_goes_on(federation) -> None:
    # Arrange: hospital_c lowers its lifetime budget to what it has spent (+0.01)
    fed = federation
    fed.stop("hospital_c")
    fed.daemon("hospital_c", _site(fed, "hospital_c",
                                   lifetime_epsilon=_lifetime(fed, "hospital_c") + 0.01))
    before = _steps(fed, "hospital_c")
    # Act
    proc, run_dir = fed.run([*DP, "rounds=1"])
    # Assert: it declined with its reason; the other two trained and were aggregated
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = _last_train(run_dir, "hospital_c")["train_status"]
    assert "lifetime privacy budget" in status and _steps(fed, "hospital_c") == before
    assert _results(run_dir)["final"]["fleet/ok"] == 2


def test_runs_outside_the_sites_policy_are_refused_at_discovery(federation) -> None:
    # Act
    none, _ = federation.run([*BASE, "rounds=1", "clients=3", "privacy=none"])
    seeded, _ = federation.run([*DP, "rounds=1", "privacy.seeded_noise=true"])
    # Assert: both end before round 1, naming the setting and the site's rule
    for proc, named in ((none, "privacy.mode=none, but this site requires DP-SGD"),
                        (seeded, "privacy.seeded_noise=true (policy.never_accept")):
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and named in text, text[-3000:]
        assert "round 1" not in text.lower().split("refuses")[0][-200:]
