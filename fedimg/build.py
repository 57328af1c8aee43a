"""The composition root: a validated config becomes a run, everything built before round 1.

:func:`prepare_run` loads and partitions the data, builds the initial model and the
strategy, reads a resume checkpoint, and writes the run directory's first files.
Everything that can fail on bad input fails here, before any worker starts.
:func:`build_loop` then wires the round loop for a Flower grid: the transport, the
update checks, a fresh :class:`~fedimg.serverapp.state.RunState` and the callbacks.
Every name in the config is resolved through its registry here or below
(:mod:`fedimg.resolve`); nothing else reads a name from the config to choose code.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedimg.config import FedimgConfig, to_dict
from fedimg.data import (
    ClientPartition,
    Dataset,
    federation_classes,
    label_distribution,
    load_dataset,
    partition_dataset,
    save_partitions,
)
from fedimg.errors import DataError
from fedimg.models import MODELS, build_model, frozen_state_keys
from fedimg.privacy import PRIVACY_MODES
from fedimg.reporting import RunRecorder
from fedimg.reporting.run_dir import write_json
from fedimg.resolve import check_registries
from fedimg.serverapp.callbacks import default_callbacks
from fedimg.serverapp.checkpoint import SavedRun, load_resume_state
from fedimg.serverapp.evaluation import CentralEvaluator
from fedimg.serverapp.loop import LoopSetup, RoundLoop
from fedimg.serverapp.state import RunState, Sampler
from fedimg.serverapp.strategies import build_strategy, min_replies
from fedimg.serverapp.validation import UpdateChecks
from fedimg.transport.elision import Elision
from fedimg.transport.grid import Transport
from fedimg.transport.records import (
    CLASS_COUNTS_KEY,
    PARTITION_KEY,
    config_record,
    counts_record,
    partitions_record,
    state_dict_to_record,
)

log = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    """A validated config with its data loaded and partitioned, before round 1.

    In a deployment (``deploy.enabled``) the server holds no training data:
    ``partitions`` is empty, ``dataset`` is the held-out test set's dataset for
    central evaluation (None without it), and the sites report their own sizes.
    """

    cfg: FedimgConfig
    dataset: Dataset | None
    partitions: list[ClientPartition]
    recorder: RunRecorder
    classes: tuple[str, ...]
    initial_state: dict[str, torch.Tensor]
    strategy: Strategy
    fixed_keys: frozenset[str] = frozenset()  # buffers and frozen parameters
    frozen_keys: frozenset[str] = frozenset()  # frozen parameters and frozen-BN statistics
    model_frozen_keys: frozenset[str] = frozenset()  # those the model freezes (not FedPer's head)
    resume: SavedRun | None = None
    started: float = field(default_factory=time.perf_counter)
    sites: dict[int, dict[str, Any]] = field(default_factory=dict)  # deployment: id -> report
    engine_ready: float | None = None  # perf_counter when the simulation engine was up
    class_counts: np.ndarray | None = None  # train.class_weighting=federated: the union's (K,)

    @property
    def client_cfg(self) -> FedimgConfig:
        """The config sent to clients: where the server read real data, so must they.

        A worker that cannot find the data then fails loudly instead of silently
        training on the synthetic fallback while results.json says "real".
        """
        if self.dataset is None or self.dataset.provenance.source != "real":
            return self.cfg
        return dataclasses.replace(self.cfg,
                                   data=dataclasses.replace(self.cfg.data, source="strict"))

    def context(self, nodes: Mapping[int, int] | None = None) -> dict[str, ArrayRecord]:
        """Run data every message carries: in simulation, every client's partition and
        the address book ``nodes`` (node id -> client id); the federation's class counts
        under ``train.class_weighting=federated``."""
        context = ({PARTITION_KEY: partitions_record(self.partitions, nodes)}
                   if self.partitions else {})
        if self.class_counts is not None:
            context[CLASS_COUNTS_KEY] = counts_record(self.class_counts)
        return context

    def checkpoint_meta(self, record: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint needs to be reused: config, classes, seed, round, metrics."""
        return {"round": record.get("round"), "model": self.cfg.model,
                "classes": list(self.classes), "seed": self.cfg.seed,
                "config": to_dict(self.cfg),
                "metrics": {k: v for k, v in record.items() if k != "clients"}}


def _sizes_line(sizes: list[int]) -> str:
    """Every size for a small federation; min / median / max for a fleet."""
    if len(sizes) <= 20:
        return str(sizes)
    ordered = sorted(sizes)
    return f"min {ordered[0]} / median {ordered[len(ordered) // 2]} / max {ordered[-1]}"


def initial_model(cfg: FedimgConfig, num_classes: int
                  ) -> tuple[dict[str, torch.Tensor], frozenset[str], frozenset[str],
                             frozenset[str]]:
    """The starting global weights; the arrays clients do not train; those they never
    change; and those the model itself freezes (every client has them: they may stay home,
    :mod:`fedimg.transport.elision`).

    The first set is the buffers (BatchNorm statistics) and any frozen parameters:
    server optimisers average them instead of stepping them, and client-level DP
    keeps them. The second is the frozen parameters and the statistics of frozen
    BatchNorm layers, which an honest client sends back exactly as it got them; under
    FedPer / FedRep (``fl.personal``) also the head, which each client keeps to itself.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=num_classes, weights=cfg.weights,
                        transfer=cfg.transfer)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    own = frozen = frozen_state_keys(model)
    if cfg.fl.personal in ("fedper", "fedrep"):  # each client keeps its own head and
        frozen |= MODELS.get(cfg.model).head_keys(model)  # returns the global one as sent
    fixed = {name for name, _ in model.named_buffers()} | frozen
    return state, frozenset(fixed), frozen, own


def prepare_run(cfg: FedimgConfig, *, resume: bool = False) -> PreparedRun:
    """Load and partition the data and start the run directory (fails before round 1).

    With ``resume``, ``cfg.output.run_dir`` is an existing run: its checkpoint is
    read and checked against ``cfg`` here, before anything but the (identical)
    partition files is rewritten.
    """
    check_registries(cfg)  # however the config was made
    recorder = RunRecorder(cfg.output.run_dir or "runs/unnamed")
    if not resume:
        recorder.write_config(cfg)
    if cfg.deploy.enabled:
        dataset, partitions, classes = _deployment_data(cfg), [], federation_classes(cfg.data)
    else:
        dataset = load_dataset(cfg.data, seed=cfg.seed)
        partitions, classes = _partition(cfg, dataset, recorder), dataset.classes
    # Model and strategy errors (bad weights file, krum too few clients) surface here,
    # before any worker starts.
    state, fixed, frozen, own = initial_model(cfg, len(classes))
    saved = load_resume_state(recorder.run_dir, cfg, list(classes)) if resume else None
    if resume:
        recorder.write_config(cfg, keep_metrics=True)  # it may have extended rounds
    return PreparedRun(cfg=cfg, dataset=dataset, partitions=partitions, recorder=recorder,
                       classes=classes, initial_state=state, fixed_keys=fixed,
                       frozen_keys=frozen, model_frozen_keys=own, resume=saved,
                       strategy=build_strategy(cfg, buffer_keys=fixed))


def _partition(cfg: FedimgConfig, dataset: Dataset,
               recorder: RunRecorder) -> list[ClientPartition]:
    """The clients' partitions, recorded in the run directory (they travel in messages)."""
    partitions = partition_dataset(dataset.train, cfg=cfg.data, num_clients=cfg.clients,
                                   seed=cfg.seed)
    save_partitions(recorder.paths.partitions, partitions)
    counts = label_distribution(dataset.train.labels.numpy(), partitions, dataset.num_classes)
    write_json(recorder.paths.partitions_json, {
        "classes": list(dataset.classes), "partitioner": str(cfg.data.partitioner),
        "label_counts": counts.tolist(),
        "train_sizes": [len(p.train_indices) for p in partitions],
        "val_sizes": [len(p.val_indices) for p in partitions]})
    log.info("%s: %d train / %d test images, %d classes, %d clients with %s train samples",
             dataset.name, len(dataset.train.labels), len(dataset.test.labels),
             dataset.num_classes, len(partitions),
             _sizes_line([len(p.train_indices) for p in partitions]))
    return partitions


def _deployment_data(cfg: FedimgConfig) -> Dataset | None:
    """A real federation's server data: only the test split, for central evaluation.

    It is read from the server's own ``data.root``, strictly: a missing test set is
    an error here, never a synthetic stand-in.
    """
    log.info("deployment: %d sites expected; central evaluation %s", cfg.clients,
             "on" if cfg.fl.central_eval else "off")
    if not cfg.fl.central_eval:
        return None
    strict = dataclasses.replace(cfg.data, source="strict")
    try:
        dataset = load_dataset(strict, seed=cfg.seed)
    except DataError as exc:
        raise DataError(f"{exc}. In a deployment the server only needs the test split "
                        "for central evaluation; or set fl.central_eval=false") from exc
    if dataset.classes != federation_classes(cfg.data):
        raise DataError(f"the coordinator's data ({dataset.provenance.location}) has classes "
                        f"{list(dataset.classes)}, but the sites label with "
                        f"{list(federation_classes(cfg.data))} (data.classes). Fix: give "
                        "data.classes in the coordinator's label order")
    return dataset


def update_checks(prepared: PreparedRun) -> UpdateChecks:
    """What every training update must satisfy in this run (see UpdateChecks)."""
    cfg = prepared.cfg
    return UpdateChecks(prepared.initial_state, fl=cfg.fl, fixed_keys=prepared.fixed_keys,
                        immutable_keys=prepared.frozen_keys,
                        screen_norms=not PRIVACY_MODES.get(cfg.privacy.mode).clips_updates)


def build_loop(prepared: PreparedRun, transport: Transport, checks: UpdateChecks) -> RoundLoop:
    """The round loop of ``prepared`` over ``transport``, with a fresh run state."""
    cfg = prepared.cfg
    mode = PRIVACY_MODES.get(cfg.privacy.mode)
    state = RunState(arrays=state_dict_to_record(prepared.initial_state),
                     strategy=prepared.strategy, sampler=Sampler(
                         cfg.seed, secret=mode.secret_sampling and not cfg.privacy.seeded_noise))
    setup = LoopSetup(cfg=cfg, checks=checks,
                      min_replies=max(cfg.fl.min_replies, min_replies(cfg)),
                      train_config=config_record(prepared.client_cfg),
                      evaluate_config=config_record(prepared.client_cfg),
                      reference=prepared.initial_state,
                      context=prepared.context(transport.node_to_partition),
                      ledger_path=prepared.recorder.paths.ledgers)
    evaluator = (CentralEvaluator(cfg, prepared.dataset)
                 if cfg.fl.central_eval and prepared.dataset is not None else None)
    callbacks = default_callbacks(
        cfg, recorder=prepared.recorder, classes=list(prepared.classes), evaluator=evaluator,
        meta=prepared.checkpoint_meta, reference=prepared.initial_state,
        done=prepared.resume.round if prepared.resume else 0)
    return RoundLoop(setup, state, transport, callbacks)


def new_transport(prepared: PreparedRun, grid: Grid) -> Transport:
    """The transport of a run over Flower's ``grid``: frozen arrays stay home unless
    ``fl.elide_frozen=false``."""
    elision = Elision({k: prepared.initial_state[k].numpy()
                       for k in prepared.model_frozen_keys}) \
        if prepared.cfg.fl.elide_frozen and prepared.model_frozen_keys else None
    return Transport(grid, pack=prepared.cfg.fl.pack_arrays, elision=elision)
