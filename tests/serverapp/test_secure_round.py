"""SecAgg+ through fedimg's round loop and real client filter: exact sums, dropouts, secrecy.

The federation is in-process (:class:`tests.support.secure_grid.ModGrid`): every message
goes through :func:`fedimg.clientapp.secure.secure_aggregation_mod` with a scripted
training handler, so the server's stages, the client's checks and the cryptography are
the real ones, and every message the server receives is kept.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedimg.clientapp.secure import REFUSED_CODE, STATE_KEY, secure_aggregation_mod
from fedimg.privacy import secagg_keys
from fedimg.privacy.client_dp import client_level_ledger
from fedimg.privacy.distributed_dp import wrap_distributed_dp
from fedimg.privacy.secagg import HEADER, SecAggPlan, mask
from fedimg.resolve import compose_and_check
from fedimg.transport.records import SECAGG_KEY, SECAGG_VECTOR_KEY, config_record
from tests.support.offline_grid import fedavg, offline_loop
from tests.support.secure_grid import ModGrid

SIZES = {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}


def _federation(seed: int = 0, sizes: dict[int, int] = SIZES):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    start = {"w": rng.normal(size=(40, 25)).astype(np.float32),
             "b": rng.normal(size=25).astype(np.float32)}
    updates = {n: ({k: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32)
                    for k, v in start.items()}, size) for n, size in sizes.items()}
    return start, updates


def _run(overrides: list[str], start, updates, *, kill_at=None, strategy=None):  # type: ignore[no-untyped-def]
    cfg = compose_and_check("medical", [f"clients={len(updates)}", "rounds=1",
                                        "fl.fraction_evaluate=0", "fl.timeout_s=0.5", "secagg.timeout_s=0.5",
                                        "fl.on_too_few=skip", *overrides])
    grid = ModGrid(updates, kill_at=kill_at)
    reference = {k: torch.from_numpy(v) for k, v in start.items()}
    loop = offline_loop(cfg, grid, reference=reference, train_config=config_record(cfg),
                        strategy=strategy)
    loop.setup.checks.expected_sizes = {n - 1: s for n, (_, s) in updates.items()}
    return loop.train(1, random.Random(0)), grid, cfg


def _fedavg(updates, nodes):  # type: ignore[no-untyped-def]
    total = sum(updates[n][1] for n in nodes)
    return {k: sum(updates[n][1] * updates[n][0][k].astype(np.float64) for n in nodes) / total
            for k in updates[nodes[0]][0]}


def _bound(result, updates, nodes) -> float:  # type: ignore[no-untyped-def]
    """Dequantisation error of the weighted mean: m steps x W / sum(n), plus float32."""
    step = result.train_metrics["secagg/step"]
    return len(nodes) * step * max(s for _, s in updates.values()) / \
        sum(updates[n][1] for n in nodes) + 4e-7


@pytest.mark.parametrize(("dropped", "clip"), [((), 1.0), ((3,), 0.5), ((2, 4), 4.0)])
def test_secure_sum_equals_fedavg_of_the_survivors(dropped: tuple[int, ...], clip: float
                                                   ) -> None:
    start, updates = _federation()
    result, grid, _ = _run(["fl.secure_aggregation=secaggplus", f"secagg.clip_range={clip}"],
                           start, updates,
                           kill_at={n: "collect" for n in dropped})
    survivors = [n for n in updates if n not in dropped]
    expected = _fedavg(updates, survivors)
    assert not result.skipped and result.train_metrics["secagg/contributors"] == len(survivors)
    for key, value in expected.items():
        error = np.abs(result.state_dict[key].numpy() - value).max()
        assert error <= _bound(result, updates, survivors)
    assert sorted(grid.trained) == survivors  # the dropped ones had shared their keys
    statuses = {e.partition_id + 1: e.status for e in result.exchanges}
    assert statuses == {n: ("timeout" if n in dropped else "ok") for n in updates}
    # the weighted metric is FedAvg's over the survivors (train/loss = examples here)
    sizes = [updates[n][1] for n in survivors]
    assert result.train_metrics["train/loss"] == pytest.approx(
        sum(s * s for s in sizes) / sum(sizes))


def test_a_contributor_lost_at_unmask_still_counts() -> None:
    start, updates = _federation()
    result, _, _ = _run(["fl.secure_aggregation=secaggplus"], start, updates,
                        kill_at={5: "unmask"})
    expected = _fedavg(updates, list(updates))
    assert np.abs(result.state_dict["w"].numpy() - expected["w"]).max() <= \
        _bound(result, updates, list(updates))


def test_below_the_threshold_the_round_is_short() -> None:
    start, updates = _federation()
    result, _, _ = _run(["fl.secure_aggregation=secaggplus"], start, updates,
                        kill_at={1: "collect", 2: "collect", 3: "collect"})
    assert result.skipped  # threshold 3 of 5, 2 survived: fl.on_too_few=skip keeps the model
    assert np.array_equal(result.state_dict["w"].numpy(), start["w"])


def test_the_server_never_holds_both_secrets_of_a_client() -> None:
    start, updates = _federation()
    result, grid, _ = _run(["fl.secure_aggregation=secaggplus"], start, updates,
                           kill_at={3: "collect"})
    seeds: dict[int, int] = {}
    keys: dict[int, int] = {}
    vectors = {}
    for reply in grid.received:
        content = reply.content
        if SECAGG_VECTOR_KEY in content.array_records:
            vectors[reply.metadata.src_node_id] = content[SECAGG_VECTOR_KEY]["masked"].numpy()
        answer = content.config_records.get(SECAGG_KEY)
        if answer is not None and "shares" in answer:
            alive = set(vectors)
            for owner in answer["nodes"]:
                book = seeds if owner in alive else keys
                book[owner] = book.get(owner, 0) + 1
    assert set(seeds) == {1, 2, 4, 5} and set(keys) == {3}  # never both for one client
    assert 3 not in vectors  # the dropped client's update never left it
    # what the server can strip from client 1's vector (its self mask) leaves noise:
    plan = SecAggPlan.from_record(secagg_keys.ClientKeys.from_json(
        str(grid.contexts[1].state.config_records[STATE_KEY]["json"])).plan)
    own = secagg_keys.own_seed(secagg_keys.ClientKeys.from_json(
        str(grid.contexts[1].state.config_records[STATE_KEY]["json"])))
    stripped = (vectors[1].astype(np.uint64) - mask(own, plan)) & np.uint64(plan.modulus - 1)
    delta = (updates[1][0]["b"] - start["b"]) * updates[1][1] / 50  # (n / W) update, b first
    signed = stripped.astype(np.float64)[HEADER:HEADER + 25]
    # uncorrelated: the masks come from fresh keys each run, so this is a statistical
    # bound; for 25 values |r| > 0.75 has probability 2e-5 (|r| > 0.5 had 1%, and failed)
    assert abs(np.corrcoef(signed, delta)[0, 1]) < 0.75
    assert stripped[0] != updates[1][1]  # not even the example count shows


def _mod(grid: ModGrid, node: int, request: dict) -> Message:  # type: ignore[type-arg]
    msg = Message(RecordDict({SECAGG_KEY: ConfigRecord(request)}), dst_node_id=node,
                  message_type="train")
    return secure_aggregation_mod(msg, grid.contexts[node], grid._train)


def test_a_stage_out_of_order_or_unknown_is_refused() -> None:
    _, updates = _federation()
    grid = ModGrid(updates)
    for request in ({"stage": "unmask", "round": 1, "survived": [1], "dropped": []},
                    {"stage": "leak", "round": 1}):
        reply = _mod(grid, 1, request)
        assert reply.has_error() and reply.error.code == REFUSED_CODE


def test_a_plan_weaker_than_the_clients_own_is_refused() -> None:
    cfg = compose_and_check("medical", ["clients=5", "fl.secure_aggregation=secaggplus"])
    _, updates = _federation()
    grid = ModGrid(updates)
    weak = {"sampled": 5, "shares": 5, "threshold": 2, "modulus_bits": 32, "clip": 1.0,
            "scale": 214_748_362, "max_weight": 50, "noise_std": 0.0,
            "bound": 1_073_741_815, "dim": 1025}
    import json

    msg = Message(RecordDict({"config": config_record(cfg), SECAGG_KEY: ConfigRecord(
        {"stage": "setup", "round": 1, "plan-json": json.dumps(weak)})}),
        dst_node_id=1, message_type="train")
    reply = secure_aggregation_mod(msg, grid.contexts[1], grid._train)
    assert reply.has_error() and "differs from this client's" in reply.error.reason


def test_distributed_dp_noise_and_epsilon() -> None:
    start, updates = _federation(sizes={n: 30 for n in range(1, 6)})
    overrides = ["privacy=distributed_dp", "privacy.target_epsilon=50",
                 "privacy.clipping_norm=100"]  # the updates stay unclipped here
    cfg = compose_and_check("medical", ["clients=5", "rounds=1", *overrides])
    strategy = wrap_distributed_dp(fedavg(), cfg)
    result, _, _ = _run(overrides, start, updates, strategy=strategy)
    plan_std = strategy.privacy_report()  # the ledger: one release, as client_dp's
    ledger = client_level_ledger(cfg)
    ledger.record(1)
    assert plan_std["dp/epsilon"] == pytest.approx(ledger.spent())
    assert plan_std["dp/releases"] == 1.0
    # the mean's noise: 5 clients x N_Z(0, s^2) each, s = sigma (K + sqrt d) / sqrt(4)
    sigma = ledger.noise_multiplier
    step = result.train_metrics["secagg/step"]
    scale = 100 / step
    expected_std = sigma * (scale + np.sqrt(1025)) / 2 * np.sqrt(5) * step / 5
    noise = result.state_dict["w"].numpy() - _fedavg(updates, list(updates))["w"]
    assert noise.std() == pytest.approx(expected_std, rel=0.1)


def _recovered(grid: ModGrid, vector: np.ndarray, target: int, colluders: list[int],
               plan: SecAggPlan) -> np.ndarray:
    """Client ``target``'s contribution as a server holding its vector, its seed (revealed
    at unmask) and the mask-key shares of ``colluders`` could compute it."""
    def state(n: int) -> secagg_keys.ClientKeys:
        return secagg_keys.ClientKeys.from_json(
            str(grid.contexts[n].state.config_records[STATE_KEY]["json"]))

    mine = state(target)
    shares = [secagg_keys._unb64(state(n).key_shares[str(target)]) for n in colluders]
    try:
        secret = secagg_keys.rebuild(shares, len(shares))
    except ValueError:  # too few shares: Shamir's combine gives garbage or fails
        secret = b"\0" * 32
    out = (vector.astype(np.uint64) - mask(secagg_keys.own_seed(mine), plan))
    for peer in mine.masked_with:
        try:
            seed = secagg_keys.mask_seed(secret, secagg_keys._unb64(mine.neighbour_keys[str(peer)][0]))
        except ValueError:
            seed = b"\0" * 32
        out = out - mask(seed, plan) if target > peer else out + mask(seed, plan)
    return out & np.uint64(plan.modulus - 1)


def test_only_threshold_colluders_could_unmask_one_client() -> None:
    start, updates = _federation()
    _, grid, _ = _run(["fl.secure_aggregation=secaggplus"], start, updates)
    vector = next(r.content[SECAGG_VECTOR_KEY]["masked"].numpy() for r in grid.received
                  if r.metadata.src_node_id == 1 and SECAGG_VECTOR_KEY in r.content.array_records)
    keys = secagg_keys.ClientKeys.from_json(
        str(grid.contexts[1].state.config_records[STATE_KEY]["json"]))
    plan = SecAggPlan.from_record(keys.plan)
    weight = int(updates[1][1])
    # with t = 3 colluding neighbours' key shares, client 1's header comes out exactly
    exposed = _recovered(grid, vector, 1, [2, 3, 4], plan)
    assert [int(v) for v in exposed[:HEADER]] == [weight, 1, 0]
    body = exposed[HEADER:].astype(np.int64)
    body = np.where(body >= plan.modulus // 2, body - plan.modulus, body) * plan.step
    delta = np.concatenate([(updates[1][0][k] - start[k]).ravel() for k in ("b", "w")])
    assert np.abs(body - delta * weight / 50).max() <= plan.step + 1e-7  # (n / W) update
    # with t - 1 = 2 it does not: the masks stay on
    hidden = _recovered(grid, vector, 1, [2, 3], plan)
    assert [int(v) for v in hidden[:HEADER]] != [weight, 1, 0]


class _Hostile(ModGrid):
    """Node 4 addresses shares outside its neighbourhood; node 2 sends a short vector."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            content, node = reply.content, reply.metadata.src_node_id
            if reply.has_error():
                continue
            answer = content.config_records.get(SECAGG_KEY)
            if node == 4 and answer is not None and "recipients" in answer:
                answer["recipients"] = [99] * len(list(answer["recipients"]))
            if node == 2 and SECAGG_VECTOR_KEY in content.array_records:
                from flwr.app import Array, ArrayRecord

                content[SECAGG_VECTOR_KEY] = ArrayRecord({"masked": Array(np.zeros(7, np.uint32))})
        return replies


def test_hostile_stage_replies_are_rejected_and_the_rest_summed() -> None:
    start, updates = _federation()
    cfg = compose_and_check("medical", ["clients=5", "rounds=1", "fl.fraction_evaluate=0",
                                        "fl.timeout_s=0.5", "secagg.timeout_s=0.5",
                                        "fl.secure_aggregation=secaggplus"])
    grid = _Hostile(updates)
    loop = offline_loop(cfg, grid, reference={k: torch.from_numpy(v) for k, v in start.items()},
                        train_config=config_record(cfg))
    loop.setup.checks.expected_sizes = {n - 1: s for n, (_, s) in updates.items()}
    result = loop.train(1, random.Random(0))
    statuses = {e.partition_id + 1: e.status for e in result.exchanges}
    assert statuses == {1: "ok", 2: "rejected", 3: "ok", 4: "rejected", 5: "ok"}
    expected = _fedavg(updates, [1, 3, 5])
    assert np.abs(result.state_dict["w"].numpy() - expected["w"]).max() <= \
        _bound(result, updates, [1, 3, 5])


class _Scripted(ModGrid):
    """Replies rewritten by ``edit(node, content)`` before the server sees them."""

    def __init__(self, updates, edit) -> None:  # type: ignore[no-untyped-def]
        super().__init__(updates)
        self.edit = edit

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            answer = None if reply.has_error() else reply.content.config_records.get(SECAGG_KEY)
            if answer is not None:
                self.edit(reply.metadata.src_node_id, answer)
        return replies


def _scripted_round(edit):  # type: ignore[no-untyped-def]
    start, updates = _federation()
    cfg = compose_and_check("medical", ["clients=5", "rounds=1", "fl.fraction_evaluate=0",
                                        "fl.timeout_s=0.5", "secagg.timeout_s=0.5",
                                        "fl.on_too_few=skip", "fl.secure_aggregation=secaggplus"])
    loop = offline_loop(cfg, _Scripted(updates, edit), train_config=config_record(cfg),
                        reference={k: torch.from_numpy(v) for k, v in start.items()})
    loop.setup.checks.expected_sizes = {n - 1: s for n, (_, s) in updates.items()}
    return loop.train(1, random.Random(0)), start, updates


def test_an_int_where_bytes_belong_is_rejected_not_allocated() -> None:
    def edit(node: int, answer: ConfigRecord) -> None:
        if node == 5 and "public-keys" in answer:
            answer["public-keys"] = [10**12, 10**12]  # bytes(10**12) would be 1 TB

    result, start, updates = _scripted_round(edit)
    statuses = {e.partition_id + 1: e.status for e in result.exchanges}
    assert statuses[5] == "rejected" and not result.skipped
    expected = _fedavg(updates, [1, 2, 3, 4])
    assert np.abs(result.state_dict["w"].numpy() - expected["w"]).max() <= \
        _bound(result, updates, [1, 2, 3, 4])


def test_bogus_shares_release_nothing_and_stop_nothing() -> None:
    def edit(node: int, answer: ConfigRecord) -> None:
        if node == 2 and "shares" in answer:
            answer["shares"] = [b"\x01\x00\x00\x00" + b"\x07" * 48] * len(list(answer["shares"]))

    result, start, _ = _scripted_round(edit)  # no exception reaches the loop
    assert result.skipped and np.array_equal(result.state_dict["w"].numpy(), start["w"])
