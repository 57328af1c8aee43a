"""Finding the clients before round 1: partitions held to their sizes, sites numbered by name."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from offline_grid import OfflineGrid

from fedimg.data import ClientPartition
from fedimg.errors import DataError, FedimgError
from fedimg.serverapp.discovery import assign_partitions, discover_sites
from fedimg.serverapp.validation import UpdateChecks
from fedimg.transport.grid import Transport
from fedimg.clientapp.site import SiteOptions, site_options
from fedimg.transport.records import (
    CLASS_COUNTS_KEY,
    SITE_KEY,
    counts_record,
    client_of_node,
    partitions_from_record,
    partitions_record,
)


class _Sites(OfflineGrid):
    """Nodes answering the describe query as deployed sites: node id -> (name, train, classes)
    or (name, train, classes, class counts).

    A train size of None leaves ``num-train`` out of the reply (a malformed one).
    """

    def __init__(self, sites: dict[int, tuple[str, int | None, int] | str]) -> None:
        self.sites = sites
        self.node_ids = list(sites)

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        replies = []
        for m in messages:
            site = self.sites[m.metadata.dst_node_id]
            if isinstance(site, str):  # the site's ClientApp raised
                reply = Message(Error(code=0, reason=f"DataError: {site}"), reply_to=m)
            else:
                name, n_train, classes, *counts = site
                sizes = {"num-train": n_train} if n_train is not None else {}
                content = RecordDict({
                    "metrics": MetricRecord({"partition-id": 0, **sizes,
                                             "num-val": 2, "num-classes": classes}),
                    SITE_KEY: ConfigRecord({"name": name})})
                if counts:  # train.class_weighting=federated: its class counts too
                    content[CLASS_COUNTS_KEY] = counts_record(np.array(counts[0]))
                reply = Message(content, reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            replies.append(reply)
        return replies


def _discover(sites: dict, num_sites: int | None = None
              ) -> tuple[Transport, UpdateChecks, dict]:
    transport, checks = Transport(_Sites(sites)), UpdateChecks({"w": torch.zeros(1)})
    found = discover_sites(transport, checks, content=RecordDict(), timeout=5,
                           connect_timeout=1, num_sites=num_sites or len(sites), num_classes=3)
    return transport, checks, found


def test_sites_are_numbered_by_name_and_held_to_their_reported_sizes() -> None:
    # Arrange: node ids in another order than the names.
    sites = {70: ("hospital_b", 40, 3), 50: ("hospital_a", 30, 3), 90: ("camera_01", 12, 3)}
    # Act
    transport, checks, found = _discover(sites)
    # Assert
    assert [found[i]["name"] for i in range(3)] == ["camera_01", "hospital_a", "hospital_b"]
    assert transport.node_to_partition == {90: 0, 50: 1, 70: 2}
    assert checks.expected_sizes == {0: 12, 1: 30, 2: 40}
    assert checks.expected_val_sizes == {0: 2, 1: 2, 2: 2}
    assert set(found[0]) == {"name", "num_train", "num_val", "num_classes"}  # no paths
    assert transport.node_ids() == [90, 50, 70]
    # A node that connects after discovery has no size to be held to: left out.
    transport.grid.node_ids.append(99)
    assert transport.node_ids() == [90, 50, 70]


@pytest.mark.parametrize("sites, message", [
    ({1: ("a", 10, 3), 2: "RBC/broken.png: cannot identify image file"}, "RBC/broken.png"),
    ({1: ("a", 10, 3), 2: ("b", 10, 5)}, "b: 5 classes, the run has 3"),
    ({1: ("a", 10, 3), 2: ("a", 10, 3)}, "site name 'a' is used by several nodes"),
    ({1: ("a", 10, 3), 2: ("b", None, 3)}, r"node 2 \(b\): malformed reply \('num-train'\)"),
])
def test_a_site_that_does_not_fit_stops_the_run_before_round_one(sites, message) -> None:
    with pytest.raises(FedimgError, match=message):
        _discover(sites)


def test_each_sites_class_counts_are_kept_when_it_sends_them() -> None:
    transport, _, found = _discover({5: ("b", 4, 3, [1, 0, 3]), 6: ("a", 2, 3, [2, 0, 0])})
    assert [found[i]["class_counts"] for i in range(2)] == [[2, 0, 0], [1, 0, 3]]


def test_counts_that_do_not_add_up_stop_the_run_naming_the_site() -> None:
    with pytest.raises(FedimgError, match=r"node 6 \(a\): malformed reply \(class counts add "
                                          "up to 3, but the site reports 2"):
        _discover({5: ("b", 4, 3, [1, 0, 3]), 6: ("a", 2, 3, [2, 1, 0])})


def test_too_few_sites_connected_names_the_fix() -> None:
    with pytest.raises(FedimgError, match="start the missing site daemons"):
        _discover({1: ("a", 10, 3)}, num_sites=2)


class _Silent(OfflineGrid):
    """Simulated nodes that fail the test if they are sent anything before round 1."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        raise AssertionError("simulated clients must not be queried before round 1")

    def push_messages(self, messages) -> Iterable[str]:
        raise AssertionError("simulated clients must not be queried before round 1")


def test_simulated_clients_are_numbered_from_the_partitions_without_a_query() -> None:
    # Arrange: 1000 nodes with random ids, and the server's partition sizes
    node_ids = random.Random(0).sample(range(1, 1 << 62), 1000)
    sizes = [(10 + pid % 7, 2 + pid % 3) for pid in range(1000)]
    transport, checks = Transport(_Silent(node_ids)), UpdateChecks({"w": torch.zeros(1)})
    # Act
    started = time.perf_counter()
    assign_partitions(transport, checks, connect_timeout=1, sizes=sizes)
    elapsed = time.perf_counter() - started
    # Assert: node ids in ascending order are clients 0..999, held to the known sizes
    assert [transport.node_to_partition[n] for n in sorted(node_ids)] == list(range(1000))
    assert transport.node_ids() == sorted(node_ids)
    assert checks.expected_sizes[7] == 10 and checks.expected_sizes[13] == 16
    assert checks.expected_val_sizes[5] == 4 and checks.expected_val_sizes[999] == 2
    assert elapsed < 0.5  # no round trip to any node


def test_the_address_book_travels_with_the_partitions() -> None:
    # Arrange: 3 clients on nodes 70, 50, 90 (numbered in node-id order: 50, 70, 90)
    parts = [ClientPartition(cid, np.arange(cid, cid + 2), np.arange(10, 11))
             for cid in range(3)]
    transport, checks = Transport(_Silent([70, 50, 90])), UpdateChecks({"w": torch.zeros(1)})
    assign_partitions(transport, checks, connect_timeout=1, sizes=[(2, 1)] * 3)
    # Act
    record = partitions_record(parts, transport.node_to_partition)
    # Assert
    assert [client_of_node(record, n) for n in (50, 70, 90, 11)] == [0, 1, 2, None]
    assert client_of_node(partitions_record(parts), 50) is None  # no book: node config
    assert [p.train_indices.tolist() for p in partitions_from_record(record)] == \
        [[0, 1], [1, 2], [2, 3]]


def test_too_few_simulated_nodes_is_a_clear_error() -> None:
    transport, checks = Transport(_Silent([1, 2])), UpdateChecks({"w": torch.zeros(1)})
    with pytest.raises(FedimgError, match="only 2 of 3 clients connected"):
        assign_partitions(transport, checks, connect_timeout=0.2, sizes=[(1, 1)] * 3)


def test_node_config_of_a_site_becomes_its_options() -> None:
    options = site_options({"site": "hospital_a", "data-path": "/srv/x", "device": "cuda:1",
                            "num-threads": 4, "min-samples": 16, "max-samples": 500})
    assert options == SiteOptions(data_path="/srv/x", name="hospital_a", device="cuda:1",
                                  num_threads=4, min_samples=16, max_samples=500)
    assert site_options({"partition-id": 0, "num-partitions": 5}) is None  # simulated node
    with pytest.raises(DataError, match="unknown node-config keys \\['colour'\\]"):
        site_options({"data-path": "/srv/x", "colour": "red"})
