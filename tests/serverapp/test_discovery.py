"""Finding the clients before round 1: deployed sites numbered by name and held to their sizes."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from offline_grid import OfflineGrid

from fedimg.errors import DataError, FedimgError
from fedimg.serverapp.discovery import discover_sites
from fedimg.transport.grid import InstrumentedGrid
from fedimg.clientapp.site import SiteOptions, site_options
from fedimg.transport.records import SITE_KEY


class _Sites(OfflineGrid):
    """Nodes answering the describe query as deployed sites: node id -> (name, train, classes)."""

    def __init__(self, sites: dict[int, tuple[str, int, int] | str]) -> None:
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
                reply = Message(RecordDict({
                    "metrics": MetricRecord({"partition-id": 0, "num-train": n_train,
                                             "num-val": 2, "num-classes": classes}),
                    SITE_KEY: ConfigRecord({"name": name, "location": f"/data/{name}"})}),
                    reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            replies.append(reply)
        return replies


def _discover(sites: dict, num_sites: int | None = None) -> tuple[InstrumentedGrid, dict]:
    grid = InstrumentedGrid(_Sites(sites), reference={"w": torch.zeros(1)})
    found = discover_sites(grid, content=RecordDict(), timeout=5, connect_timeout=1,
                           num_sites=num_sites or len(sites), num_classes=3)
    return grid, found


def test_sites_are_numbered_by_name_and_held_to_their_reported_sizes() -> None:
    # Arrange: node ids in another order than the names.
    sites = {70: ("hospital_b", 40, 3), 50: ("hospital_a", 30, 3), 90: ("camera_01", 12, 3)}
    # Act
    grid, found = _discover(sites)
    # Assert
    assert [found[i]["name"] for i in range(3)] == ["camera_01", "hospital_a", "hospital_b"]
    assert grid.node_to_partition == {90: 0, 50: 1, 70: 2}
    assert grid.checks.expected_sizes == {0: 12, 1: 30, 2: 40}
    assert list(grid.get_node_ids()) == [90, 50, 70]
    # A node that connects after discovery has no size to be held to: left out.
    grid.inner.node_ids.append(99)
    assert list(grid.get_node_ids()) == [90, 50, 70]


@pytest.mark.parametrize("sites, message", [
    ({1: ("a", 10, 3), 2: "RBC/broken.png: cannot identify image file"}, "RBC/broken.png"),
    ({1: ("a", 10, 3), 2: ("b", 10, 5)}, "b: 5 classes, the run has 3"),
    ({1: ("a", 10, 3), 2: ("a", 10, 3)}, "site name 'a' is used by several nodes"),
])
def test_a_site_that_does_not_fit_stops_the_run_before_round_one(sites, message) -> None:
    with pytest.raises(FedimgError, match=message):
        _discover(sites)


def test_too_few_sites_connected_names_the_fix() -> None:
    with pytest.raises(FedimgError, match="start the missing site daemons"):
        _discover({1: ("a", 10, 3)}, num_sites=2)


def test_node_config_of_a_site_becomes_its_options() -> None:
    options = site_options({"site": "hospital_a", "data-path": "/srv/x", "device": "cuda:1",
                            "num-threads": 4, "min-samples": 16, "max-samples": 500})
    assert options == SiteOptions(data_path="/srv/x", name="hospital_a", device="cuda:1",
                                  num_threads=4, min_samples=16, max_samples=500)
    assert site_options({"partition-id": 0, "num-partitions": 5}) is None  # simulated node
    with pytest.raises(DataError, match="unknown node-config keys \\['colour'\\]"):
        site_options({"data-path": "/srv/x", "colour": "red"})
