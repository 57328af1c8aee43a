"""Finding the clients before round 1: partitions held to their sizes, sites numbered by name."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from offline_grid import OfflineGrid

from fedimg.errors import DataError, FedimgError
from fedimg.serverapp.discovery import discover_partitions, discover_sites
from fedimg.serverapp.validation import UpdateChecks
from fedimg.transport.grid import Transport
from fedimg.clientapp.site import SiteOptions, site_options
from fedimg.transport.records import SITE_KEY


class _Sites(OfflineGrid):
    """Nodes answering the describe query as deployed sites: node id -> (name, train, classes).

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
                name, n_train, classes = site
                sizes = {"num-train": n_train} if n_train is not None else {}
                reply = Message(RecordDict({
                    "metrics": MetricRecord({"partition-id": 0, **sizes,
                                             "num-val": 2, "num-classes": classes}),
                    SITE_KEY: ConfigRecord({"name": name})}),
                    reply_to=m)
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


def test_too_few_sites_connected_names_the_fix() -> None:
    with pytest.raises(FedimgError, match="start the missing site daemons"):
        _discover({1: ("a", 10, 3)}, num_sites=2)


class _Partitions(OfflineGrid):
    """Simulated nodes answering the describe query: node pid + 1 is partition pid -> size.

    A str size is the error the node's ClientApp raised; None a reply without its id.
    """

    def __init__(self, sizes: dict[int, int | str | None]) -> None:
        self.sizes = sizes
        self.node_ids = [pid + 1 for pid in sizes]

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        replies = []
        for m in messages:
            pid = m.metadata.dst_node_id - 1
            size = self.sizes[pid]
            if isinstance(size, str):
                replies.append(Message(Error(code=0, reason=f"Traceback\n{size}"), reply_to=m))
                continue
            metrics = ({"partition-id": pid, "num-train": size} if size is not None
                       else {"num-train": 10})
            replies.append(Message(RecordDict({"metrics": MetricRecord({**metrics,
                                                                        "num-val": 2})}),
                                   reply_to=m))
        return replies


def _discover_partitions(sizes: dict[int, int | str | None], expected: list[int]
                         ) -> tuple[Transport, UpdateChecks, dict]:
    transport, checks = Transport(_Partitions(sizes)), UpdateChecks({"w": torch.zeros(1)})
    info = discover_partitions(transport, checks, content=RecordDict(), timeout=5,
                               connect_timeout=1, expected_sizes=expected)
    return transport, checks, info


def test_partitions_report_their_ids_and_are_held_to_the_servers_sizes() -> None:
    # Arrange: nodes 1, 2 are partitions 0, 1 of 10 and 12 training images
    # Act
    transport, checks, info = _discover_partitions({0: 10, 1: 12}, [10, 12])
    # Assert
    assert transport.node_to_partition == {1: 0, 2: 1}
    assert checks.expected_sizes == {0: 10, 1: 12}
    assert {pid: m["num-train"] for pid, m in info.items()} == {0: 10.0, 1: 12.0}


def test_discovery_refuses_missing_clients_and_mismatched_data() -> None:
    with pytest.raises(FedimgError, match=r"clients \[2\] did not start.*DataError"):
        _discover_partitions({0: 10, 1: 12, 2: "DataError: not found"}, [10, 12, 7])
    with pytest.raises(FedimgError, match="client 1 sees 12 training samples but the server"):
        _discover_partitions({0: 10, 1: 12}, [10, 11])
    with pytest.raises(FedimgError, match="only 2 of 3 clients connected"):
        _discover_partitions({0: 10, 1: 12}, [10, 12, 7])
    # A reply without its partition id is that node's failure, not a KeyError.
    with pytest.raises(FedimgError, match=r"clients \[1\] did not start.*node 2: malformed"):
        _discover_partitions({0: 10, 1: None}, [10, 12])


def test_node_config_of_a_site_becomes_its_options() -> None:
    options = site_options({"site": "hospital_a", "data-path": "/srv/x", "device": "cuda:1",
                            "num-threads": 4, "min-samples": 16, "max-samples": 500})
    assert options == SiteOptions(data_path="/srv/x", name="hospital_a", device="cuda:1",
                                  num_threads=4, min_samples=16, max_samples=500)
    assert site_options({"partition-id": 0, "num-partitions": 5}) is None  # simulated node
    with pytest.raises(DataError, match="unknown node-config keys \\['colour'\\]"):
        site_options({"data-path": "/srv/x", "colour": "red"})
