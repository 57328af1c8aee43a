"""The ridge head's query as a cohort message: each member's sums equal its lone reply's.

The server's :func:`fedimg.serverapp.cohorts.group` merges the lone queries into one
message (``sim.cohort_size``), the ClientApp's handler answers it, and
:func:`~fedimg.serverapp.cohorts.split` takes each member's reply back out: its Gram,
moment and count must equal, to the bit, those of the same client queried alone.
"""

from __future__ import annotations

import pytest
from flwr.app import Context, Message, RecordDict

from fedimg.clientapp import app as client_app
from fedimg.clientapp.cohort import statistics_cohort
from fedimg.clientapp.environment import environment
from fedimg.clientapp.site import SiteOptions
from fedimg.config import to_json
from fedimg.config.compose import compose_config
from fedimg.data import partition_dataset
from fedimg.errors import UpdateError
from fedimg.serverapp.cohorts import group, split
from fedimg.transport.grid import Exchange, content_bytes
from fedimg.transport.records import (
    ARRAYS_KEY,
    HEAD_STATS_ACTION,
    HEAD_STATS_KEY,
    METRICS_KEY,
    PARTITION_KEY,
    config_record,
    partitions_record,
    state_dict_to_record,
)

CFG = ["clients=4", "data.source=synthetic", "data.image_size=32", "data.partitioner=iid",
       "data.quantity_skew=0", "data.synthetic.train_size=64", "data.min_partition_size=8",
       "transfer.mode=last_k", "transfer.train_head=false", "transfer.bn=frozen",
       "fl.head_init=ridge"]
QUERY = f"query.{HEAD_STATS_ACTION}"


def _queries() -> list[Message]:
    """The server's query to nodes 1..4, one shared content."""
    cfg = compose_config(overrides=CFG)
    env = environment(to_json(cfg), 1)
    partitions = partition_dataset(env.dataset.train, cfg=cfg.data, num_clients=cfg.clients,
                                   seed=cfg.seed)
    content = RecordDict({"config": config_record(cfg),
                          ARRAYS_KEY: state_dict_to_record(env.reference),
                          PARTITION_KEY: partitions_record(
                              partitions, {p + 1: p for p in range(cfg.clients)})})
    return [Message(content=content, message_type=QUERY, dst_node_id=p + 1)
            for p in range(cfg.clients)]


def _context(node: int, **node_config: str) -> Context:
    return Context(run_id=1, node_id=node, node_config={"partition-id": node - 1,
                                                        "num-partitions": 4, **node_config},
                   state=RecordDict(), run_config={})


def test_each_member_of_a_cohort_query_gets_its_lone_sums() -> None:
    # Arrange
    lone = _queries()
    grouping = group(lone[:3], 3, partition_of=lambda n: n - 1, kinds=(QUERY,))
    (cohort,) = grouping.messages
    # Act
    reply = client_app.head_statistics(cohort, _context(1))
    exchange = Exchange(phase=QUERY, partition_id=0, node_id=1, sent=cohort,
                        bytes_down=content_bytes(cohort.content), reply=reply)
    members = [e.reply for e in split([exchange], grouping)]
    alone = [client_app.head_statistics(m, _context(m.metadata.dst_node_id)) for m in lone[:3]]
    # Assert: the same sums, to the bit
    assert len(members) == 3
    for got, want in zip(members, alone):
        for name in ("gram", "moment"):
            a = got.content[HEAD_STATS_KEY][name].numpy()
            b = want.content[HEAD_STATS_KEY][name].numpy()
            assert a.shape == b.shape and (a == b).all(), name
        # 16 images each, less the 10% validation split (2)
        assert got.content[METRICS_KEY]["num-examples"] == 14
        assert want.content[METRICS_KEY]["num-examples"] == 14
    assert (members[0].content[HEAD_STATS_KEY]["gram"].numpy()
            != members[1].content[HEAD_STATS_KEY]["gram"].numpy()).any()


def test_a_deployed_site_refuses_a_cohort_query(tmp_path) -> None:
    # a deployed site is one client: a server listing several is refused whole
    cohort = group(_queries()[:2], 2, partition_of=lambda n: n - 1, kinds=(QUERY,)).messages[0]
    env = environment(to_json(compose_config(overrides=CFG)), 1)
    with pytest.raises(UpdateError, match="site clinic got a cohort message"):
        statistics_cohort(env, [0, 1], message=cohort.content,
                          site=SiteOptions(data_path=str(tmp_path), name="clinic"))
