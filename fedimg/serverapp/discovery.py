"""Before round 1: find the clients, learn their ids and sizes, warm them up.

Every node gets a Flower ``query`` message carrying the run config; answering it
builds the client's task environment (data and model), so start-up cost is not
charged to round 1 and a client that cannot read its data stops the run here.

* In simulation each node is a partition of a dataset the server also loaded,
  and must report exactly the training-set size the server computed for it
  (:func:`discover_partitions`).
* In a deployment each node is a site with its own data (:func:`discover_sites`):
  sites are numbered by their names, their reported sizes become the FedAvg weights
  the update checks hold them to, and a site whose data does not fit the run
  (unknown class, corrupt file, too few images) is named in the error.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedimg.errors import FedimgError
from fedimg.serverapp.validation import UpdateChecks, metrics_of
from fedimg.transport.grid import Transport, error_summary
from fedimg.transport.records import SITE_KEY

log = logging.getLogger(__name__)


def discover_partitions(transport: Transport, checks: UpdateChecks, *, content: RecordDict,
                        timeout: float, connect_timeout: float,
                        expected_sizes: list[int]) -> dict[int, dict[str, float]]:
    """Ask every node for its partition id and sizes (a Flower ``query`` message).

    Also warms the workers up: each builds its task environment (data, model) here,
    so start-up cost is not charged to round 1. Raises FedimgError unless every
    partition answered with the training-set size the server computed for it, so
    a worker that cannot read the data stops the run before round 1.
    """
    started = time.perf_counter()
    nodes = _wait_for_nodes(transport.grid, len(expected_sizes), timeout=connect_timeout)
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n)
                for n in nodes]
    info: dict[int, dict[str, float]] = {}
    failures = []
    for reply in transport.grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            failures.append(str(reply.error.reason).strip().splitlines()[-1:])
            continue
        try:
            metrics, _ = metrics_of(reply.content)
            pid = int(metrics["partition-id"])
            metrics["num-train"], metrics["num-val"] = (int(metrics["num-train"]),
                                                        int(metrics["num-val"]))
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            failures.append([f"node {reply.metadata.src_node_id}: malformed reply ({exc})"])
            continue
        transport.node_to_partition[reply.metadata.src_node_id] = pid
        info[pid] = metrics
    log.info("%d of %d clients ready in %.1fs", len(info), len(nodes),
             time.perf_counter() - started)
    _check_discovery(info, expected_sizes, failures)
    checks.expected_sizes = dict(enumerate(expected_sizes))
    checks.expected_val_sizes = {pid: int(m["num-val"]) for pid, m in info.items()}
    return info


def _wait_for_nodes(grid: Grid, count: int, *, timeout: float) -> list[int]:
    """Node ids once ``count`` nodes are connected (they register after the ServerApp starts)."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise FedimgError(f"only {len(nodes)} of {count} clients connected within "
                              f"{timeout:.0f}s (fl.connect_timeout_s). Fix: in a deployment, "
                              "start the missing site daemons (or lower clients=); under "
                              f"`flwr run` pass --federation-config 'num-supernodes={count}'")
        time.sleep(0.1)
    return nodes


def _check_discovery(info: dict[int, dict[str, float]], expected_sizes: list[int],
                     failures: list[list[str]]) -> None:
    missing = sorted(set(range(len(expected_sizes))) - set(info))
    if missing:
        first = f"; first failure: {failures[0]}" if failures else ""
        raise FedimgError(f"clients {missing[:10]} did not start ({len(failures)} "
                          f"failed){first}")
    wrong = [(pid, int(m["num-train"]), expected_sizes[pid]) for pid, m in info.items()
             if int(m["num-train"]) != expected_sizes[pid]]
    if wrong:
        pid, got, want = wrong[0]
        raise FedimgError(f"client {pid} sees {got} training samples but the server "
                          f"partitioned {want} for it: the workers read different data "
                          "(check FEDIMG_DATA / data.root on every machine)")


def discover_sites(transport: Transport, checks: UpdateChecks, *, content: RecordDict,
                   timeout: float, connect_timeout: float, num_sites: int,
                   num_classes: int) -> dict[int, dict[str, Any]]:
    """Ask every deployed site for its name and sizes; number the sites by name.

    Returns ``{client id: {"name", "num_train", "num_val"}}`` (no paths leave a site); then
    on only these nodes take part (a site connecting later is left out). Raises
    FedimgError naming each site that failed (its own error line: a bad file, an
    unknown class) or reported another class count, and on duplicate site names.
    """
    started = time.perf_counter()
    nodes = _wait_for_nodes(transport.grid, num_sites, timeout=connect_timeout)
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n)
                for n in nodes]
    reports: dict[int, dict[str, Any]] = {}  # node id -> report
    failures: list[str] = []
    for reply in transport.grid.send_and_receive(messages, timeout=timeout):
        report = _site_report(reply)
        if isinstance(report, str):
            failures.append(report)
        else:
            reports[reply.metadata.src_node_id] = report
    _check_sites(reports, failures, num_sites=num_sites, num_classes=num_classes)
    by_name = sorted(reports.items(), key=lambda item: item[1]["name"])
    sites = {cid: report for cid, (_, report) in enumerate(by_name)}
    transport.node_to_partition.update({node: cid for cid, (node, _) in enumerate(by_name)})
    checks.expected_sizes = {cid: r["num_train"] for cid, r in sites.items()}
    checks.expected_val_sizes = {cid: r["num_val"] for cid, r in sites.items()}
    log.info("%d sites ready in %.1fs: %s", len(sites), time.perf_counter() - started,
             ", ".join(f"{r['name']} ({r['num_train']} train)" for r in sites.values()))
    return sites


def _site_report(reply: Message) -> dict[str, Any] | str:
    """A site's describe reply as its report, or the line that says what is wrong with it."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        return f"node {node}: {error_summary(str(reply.error.reason))}"
    site = reply.content.config_records.get(SITE_KEY)
    if site is None:
        return f"node {node}: no data-path in its node config (not a site)"
    try:
        metrics, _ = metrics_of(reply.content)
        return {"name": str(site["name"])[:200],
                "num_train": int(metrics["num-train"]), "num_val": int(metrics["num-val"]),
                "num_classes": int(metrics["num-classes"])}
    except (KeyError, ValueError, TypeError, OverflowError) as exc:
        return f"node {node} ({str(site.get('name', '?'))[:200]}): malformed reply ({exc})"


def _check_sites(reports: dict[int, dict[str, Any]], failures: list[str], *,
                 num_sites: int, num_classes: int) -> None:
    wrong = [f"{r['name']}: {r['num_classes']} classes, the run has {num_classes}"
             for r in reports.values() if r["num_classes"] != num_classes]
    names = [r["name"] for r in reports.values()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    problems = failures + wrong + [f"site name '{n}' is used by several nodes" for n in dupes]
    if problems or len(reports) < num_sites:
        raise FedimgError(f"{len(reports) - len(wrong)} of {num_sites} sites are ready; "
                          + "; ".join(problems[:10]) + ". Fix the site (its daemon's log "
                          "names the files), then submit the run again")
