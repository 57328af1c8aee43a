"""A whole federated run on a Flower grid: discover the clients, run the rounds, report.

:func:`run_federation` is what the ServerApp's ``main`` calls, in simulation and in
a deployment alike. It takes a run the composition root prepared
(:func:`fedimg.build.prepare_run`), finds the clients, builds the round loop
(:func:`fedimg.build.build_loop`), restores its state from the checkpoint when
resuming, runs it, and writes ``results.json``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flwr.app import RecordDict
from flwr.serverapp import Grid

from fedimg.config import ClassWeighting, HeadInit
from fedimg.build import PreparedRun, build_loop, new_transport, update_checks
from fedimg.data import label_distribution
from fedimg.errors import FedimgError, PrivacyBudgetExhausted
from fedimg.reporting.run_dir import write_json
from fedimg.serverapp.class_counts import federation_counts
from fedimg.serverapp.checkpoint import repair_best, restore_run_state
from fedimg.serverapp.discovery import assign_partitions, discover_sites
from fedimg.serverapp.head_init import fit_ridge_head
from fedimg.serverapp.loop import RoundLoop
from fedimg.serverapp.results import run_results
from fedimg.serverapp.validation import UpdateChecks
from fedimg.transport.grid import Transport
from fedimg.transport.records import config_record

log = logging.getLogger(__name__)


def run_federation(grid: Grid, prepared: PreparedRun) -> dict[str, Any]:
    """Run all rounds of ``prepared`` on ``grid`` (from its checkpoint if resuming).

    Returns the results dict, also written to ``results.json``. A run that stops
    early still writes its results (``stopped_early`` says why) and final checkpoint:
    spent privacy budgets are a normal end; any other error (too many skipped rounds,
    a bug) is re-raised after that.
    """
    transport, checks = new_transport(prepared, grid), update_checks(prepared)
    _discover(prepared, transport, checks)
    if prepared.cfg.fl.head_init == HeadInit.ridge and prepared.resume is None:
        fit_ridge_head(prepared, transport, checks)  # Fed3R: the head before round 1
    startup_s = time.perf_counter() - prepared.started
    loop = build_loop(prepared, transport, checks)
    if prepared.resume is not None:
        _resume(prepared, loop)
    stop: Exception | None = None
    try:
        loop.run()
    except PrivacyBudgetExhausted as exc:  # a normal end of a private run
        loop.state.stopped = str(exc)
        log.warning("run stopped early: %s", exc)
    except Exception as exc:  # noqa: BLE001 - results are written, then it propagates
        loop.state.stopped, stop = f"{type(exc).__name__}: {exc}", exc
        log.error("run stopped: %s", loop.state.stopped)
    finally:
        for callback in loop.callbacks:
            callback.on_run_end(loop.state)
    results = run_results(prepared, loop.state, startup_s,
                          first_message_s=_first_message_s(prepared, transport))
    prepared.recorder.write_results(results)
    if stop is not None:
        raise stop
    return results


def _first_message_s(prepared: PreparedRun, transport: Transport) -> float | None:
    """Seconds from the simulation engine being up to the run's first message out."""
    if prepared.engine_ready is None or transport.first_push is None:
        return None
    seconds = transport.first_push - prepared.engine_ready
    log.info("first message %.2fs after the simulation engine started", seconds)
    return seconds


def _resume(prepared: PreparedRun, loop: RoundLoop) -> None:
    """Continue after the checkpoint: restore the loop's state, hand back DP ledgers.

    With secret noise the rerun of the interrupted round is a new release, so the
    ledgers as last reported (``ledgers.json``, written as replies arrived, which
    may include that round) are used: epsilon may be over-counted by one round,
    never under-counted. With seeded noise (tests) the rerun repeats the same
    release, and the checkpoint's ledgers make the run identical to one never
    interrupted.
    """
    saved, recorder = prepared.resume, prepared.recorder
    assert saved is not None
    path = recorder.paths.ledgers
    reported = ({int(k): v for k, v in json.loads(path.read_text()).items()}
                if not prepared.cfg.privacy.seeded_noise and path.is_file() else {})
    restore_run_state(loop.state, saved, recorder=recorder, reported_ledgers=reported)
    if prepared.cfg.deploy.enabled:  # a site keeps its own ledger: the server's is a report
        loop.state.ledgers_to_return.clear()
    repair_best(loop.state, saved, recorder=recorder, reference=prepared.initial_state,
                meta=prepared.checkpoint_meta)
    log.info("resuming %s after round %d of %d", recorder.run_dir, saved.round,
             prepared.cfg.rounds)


def _saved_site_names(prepared: PreparedRun) -> list[str]:
    """The site names of the run being resumed, in their client-id order."""
    path = prepared.recorder.paths.sites
    if not path.is_file():
        raise FedimgError(f"cannot resume {prepared.recorder.run_dir}: it has no {path.name} "
                          "(it never got past discovery). Fix: start the run anew")
    saved = json.loads(path.read_text())
    return [saved[k]["name"] for k in sorted(saved, key=int)]


def _discover(prepared: PreparedRun, transport: Transport, checks: UpdateChecks) -> None:
    """Find every client before round 1 (the sites of a deployment, or the partitions)."""
    cfg = prepared.cfg
    federated = cfg.train.class_weighting == ClassWeighting.federated
    if not cfg.deploy.enabled:
        assign_partitions(transport, checks, connect_timeout=cfg.fl.connect_timeout_s,
                          sizes=[(len(p.train_indices), len(p.val_indices))
                                 for p in prepared.partitions])
        if federated:
            assert prepared.dataset is not None
            prepared.class_counts = label_distribution(
                prepared.dataset.train.labels, prepared.partitions,
                len(prepared.classes)).sum(axis=0)
        return
    content = RecordDict({"config": config_record(prepared.client_cfg)})
    before = _saved_site_names(prepared) if prepared.resume is not None else None
    prepared.sites = discover_sites(
        transport, checks, content=content, timeout=cfg.fl.timeout_s,
        connect_timeout=cfg.fl.connect_timeout_s, num_sites=cfg.clients,
        num_classes=len(prepared.classes))
    names = [site["name"] for site in prepared.sites.values()]
    if before is not None and names != before:
        raise FedimgError(f"cannot resume {prepared.recorder.run_dir}: it ran with sites "
                          f"{before}, now {names} answered. Fix: start the same sites' "
                          "daemons (clients= their number), then resume again")
    if federated:
        prepared.class_counts = federation_counts(prepared.sites)
    write_json(prepared.recorder.paths.sites,
               {str(k): v for k, v in prepared.sites.items()})
