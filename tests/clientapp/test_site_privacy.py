"""A deployed site's privacy through the real ClientApp handlers: its ledger and its policy.

Each call gets a fresh Flower ``Context``, as a restarted SuperNode would: what the
site remembers between calls is only what it wrote to its own state dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from PIL import Image

from fedimg.clientapp import app as client_app
from fedimg.clientapp.policy import SitePolicy
from fedimg.clientapp.site import policy_node_config
from fedimg.errors import LedgerError, PolicyRefused
from fedimg.privacy.accounting import epsilon
from fedimg.privacy.site_ledger import ledger_path
from fedimg.resolve import compose_and_check
from fedimg.transport.records import DECLINED_KEY, LEDGER_KEY, METRICS_KEY, config_record

CLASSES = ("Platelets", "RBC", "WBC")
DP_RUN = ["privacy=dp_sgd", "deploy.enabled=true", "data.dataset=bccd_cells",
          "data.image_size=32", "transfer.mode=head", "train.local_steps=2",
          "train.batch_size=8", "rounds=3", "privacy.target_epsilon=4", "weights=none"]


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (folder / name).mkdir()
        for i in range(12):
            pixels = np.clip(rng.normal(60 + 60 * k, 20, (24, 24, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"{i}.png")
    return folder


def _context(data: Path, state: Path, policy: SitePolicy) -> Context:
    node = {"site": "hospital_a", "data-path": str(data), "device": "cpu",
            "state-dir": str(state), "federation": "test-fed", "min-samples": 8,
            **policy_node_config(policy)}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def _message(cfg, kind: str, server_round: int = 0, ledger: dict | None = None) -> Message:
    content = RecordDict({"config": config_record(cfg, server_round=server_round)})
    if ledger is not None:
        content[LEDGER_KEY] = ConfigRecord({"json": json.dumps(ledger)})
    return Message(content=content, message_type=kind, dst_node_id=1)


def _train(cfg, data: Path, state: Path, policy: SitePolicy, server_round: int,
           ledger: dict | None = None) -> RecordDict:
    msg = _message(cfg, MessageType.TRAIN, server_round, ledger)
    return client_app.train(msg, _context(data, state, policy)).content


def _eps(reply: RecordDict) -> float:
    return float(reply[METRICS_KEY]["dp/epsilon"])


def test_epsilon_continues_across_restarts_and_a_shorter_offer_is_ignored(
        site_data: Path, tmp_path: Path) -> None:
    # Arrange
    cfg = compose_and_check("medical", [*DP_RUN, f"output.run_dir={tmp_path / 'run'}"])
    policy = SitePolicy(require_dp=True)
    state = tmp_path / "state"
    # Act: round 1, a "restart" (new context), round 2 while the server offers round 1's
    first = _train(cfg, site_data, state, policy, 1)
    round_1 = json.loads(str(first[LEDGER_KEY]["json"]))
    second = _train(cfg, site_data, state, policy, 2, ledger=round_1)
    # Assert: round 2 continued from the site's own ledger, not from zero or the offer
    stored = json.loads(ledger_path(state, federation="test-fed", site="hospital_a").read_text())
    (history,) = [run["history"] for run in stored["runs"].values()]
    counts, (sigma, q, steps) = round_1["history"]  # the noisy label counts, round 1
    assert steps == 2 and history == [counts, [sigma, q, 4]]  # 2 steps x 2 rounds
    assert _eps(second) == pytest.approx(epsilon([counts, (sigma, q, 4)], round_1["delta"],
                                                 "prv"))
    assert _eps(second) > _eps(first) > 0


def test_a_second_run_adds_to_the_lifetime_spend_and_the_budget_declines(
        site_data: Path, tmp_path: Path) -> None:
    # Arrange: a lifetime budget that one run's two rounds fit, but not a second run's
    state = tmp_path / "state"
    runs = [compose_and_check("medical", [*DP_RUN, f"output.run_dir={tmp_path / f'run{i}'}"])
            for i in (1, 2)]
    probe = _train(runs[0], site_data, tmp_path / "probe", SitePolicy(require_dp=True), 1)
    counts, (sigma, q, _) = json.loads(str(probe[LEDGER_KEY]["json"]))["history"]
    # each run releases its noisy label counts once, then two steps a round
    two_runs = [counts, (sigma, q, 4), counts, (sigma, q, 2)]
    budget = epsilon(two_runs, 1e-5, "prv")  # run 1's two rounds, run 2's first
    policy = SitePolicy(require_dp=True, lifetime_epsilon=budget, lifetime_delta=1e-5)
    # Act
    replies = [_train(runs[0], site_data, state, policy, 1),
               _train(runs[0], site_data, state, policy, 2),
               _train(runs[1], site_data, state, policy, 1),
               _train(runs[1], site_data, state, policy, 2)]
    # Assert: the lifetime spend composes both runs; the fourth round would pass it
    lifetime = [float(r[METRICS_KEY]["dp/lifetime_epsilon"]) for r in replies]
    assert lifetime[2] == pytest.approx(budget, rel=1e-6)
    assert lifetime[1] == pytest.approx(epsilon(two_runs[:2], 1e-5, "prv"))
    declined = replies[3].config_records.get(DECLINED_KEY)
    assert declined is not None and "lifetime privacy budget" in str(declined["reason"])
    assert lifetime[3] == lifetime[2]  # a declined round spends nothing


@pytest.mark.parametrize("overrides, named", [
    (["privacy=none", "deploy.enabled=true"], "privacy.mode=none, but this site requires"),
    ([*DP_RUN, "privacy.seeded_noise=true"], "privacy.seeded_noise=true (policy.never_accept"),
    ([*DP_RUN, "privacy.target_epsilon=50"], "above this site's policy.max_run_epsilon=8"),
    ([*DP_RUN, "train.batch_size=2"], "train.batch_size=2, below this site's policy.min_batch"),
])
def test_a_run_outside_the_site_policy_is_refused_at_discovery(
        site_data: Path, tmp_path: Path, overrides: list[str], named: str) -> None:
    # Arrange
    cfg = compose_and_check("medical", [*overrides, "data.dataset=bccd_cells",
                                        "data.image_size=32"])
    policy = SitePolicy(require_dp=True, max_run_epsilon=8, min_batch_size=4)
    # Act
    with pytest.raises(PolicyRefused) as err:
        client_app.describe(_message(cfg, MessageType.QUERY),
                            _context(site_data, tmp_path, policy))
    # Assert
    assert named in str(err.value) and "site hospital_a refuses this run" in str(err.value)


def test_a_site_budget_is_addressed_by_its_name(site_data: Path, tmp_path: Path) -> None:
    # Arrange: the run gives hospital_a 2 and everyone else 4
    cfg = compose_and_check("medical", [*DP_RUN, "privacy.site_epsilons={hospital_a:2}",
                                        f"output.run_dir={tmp_path / 'run'}"])
    # Act
    reply = _train(cfg, site_data, tmp_path / "state", SitePolicy(), 1)
    # Assert
    assert float(reply[METRICS_KEY]["dp/target_epsilon"]) == 2.0


def test_a_corrupt_or_missing_ledger_of_a_trained_site_stops_it(site_data: Path,
                                                               tmp_path: Path) -> None:
    # Arrange: a site that has trained once
    cfg = compose_and_check("medical", [*DP_RUN, f"output.run_dir={tmp_path / 'run'}"])
    state, policy = tmp_path / "state", SitePolicy(require_dp=True)
    _train(cfg, site_data, state, policy, 1)
    path = ledger_path(state, federation="test-fed", site="hospital_a")
    query = _message(cfg, MessageType.QUERY)
    # Act / Assert: a history edited down by one step (checksum kept), then the file gone
    stored = json.loads(path.read_text())
    (run,) = stored["runs"].values()
    run["history"][-1][2] -= 1
    path.write_text(json.dumps(stored))
    with pytest.raises(LedgerError, match="is corrupt"):
        client_app.describe(query, _context(site_data, state, policy))
    path.unlink()
    with pytest.raises(LedgerError, match="is missing, but .* says it has trained"):
        client_app.describe(query, _context(site_data, state, policy))
