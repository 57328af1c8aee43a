"""Before round 1: find the clients and learn their ids and sizes.

* In simulation each node is a partition of a dataset the server loaded itself, so
  the server already knows every size: it only waits for the nodes and numbers them
  (:func:`assign_partitions`), with no message to any of them. Start-up then costs
  the same for 5 clients or 1000; each worker builds its task environment on its
  first message. The address book (node id -> client id) travels with the
  partitions in every message (``fedimg.transport.records.partitions_record``); a
  worker that read other data than the server refuses its partitions there
  (``TaskEnvironment.install_partitions``).
* In a deployment each node is a site with its own data (:func:`discover_sites`):
  every site gets a Flower ``query`` message carrying the run config; answering it
  builds its task environment, so a site that cannot read its data stops the run
  before round 1. Sites are numbered by their names, their reported sizes become the FedAvg weights
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
from fedimg.serverapp.class_counts import site_counts
from fedimg.serverapp.validation import UpdateChecks, metrics_of
from fedimg.transport.grid import Transport, error_summary
from fedimg.transport.records import CLASS_COUNTS_KEY, SITE_KEY

log = logging.getLogger(__name__)


def assign_partitions(transport: Transport, checks: UpdateChecks, *, connect_timeout: float,
                      sizes: list[tuple[int, int]]) -> None:
    """Number the simulated nodes 0..N-1 in node-id order; hold each to its known sizes.

    ``sizes``: each client's (training, validation) set size, as the server
    partitioned them. No node is asked anything, so this takes as long for 1000
    clients as for 5.
    """
    started = time.perf_counter()
    nodes = sorted(_wait_for_nodes(transport.grid, len(sizes), timeout=connect_timeout))
    transport.node_to_partition = {node: pid for pid, node in enumerate(nodes[:len(sizes)])}
    checks.expected_sizes = {pid: n_train for pid, (n_train, _) in enumerate(sizes)}
    checks.expected_val_sizes = {pid: n_val for pid, (_, n_val) in enumerate(sizes)}
    log.info("%d clients numbered from their partitions in %.2fs (no describe query)",
             len(sizes), time.perf_counter() - started)


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
        report = {"name": str(site["name"])[:200],
                  "num_train": int(metrics["num-train"]), "num_val": int(metrics["num-val"]),
                  "num_classes": int(metrics["num-classes"])}
        if CLASS_COUNTS_KEY in reply.content.array_records:  # class_weighting=federated
            report["class_counts"] = site_counts(
                reply.content, num_classes=report["num_classes"],
                num_train=report["num_train"]).tolist()
        return report
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
