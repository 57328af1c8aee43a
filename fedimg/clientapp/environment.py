"""The learning task behind every client: plain PyTorch.

A :class:`TaskEnvironment` holds what a worker process needs to serve any client
of one run: the decoded dataset, the partitions, one model object and the
loaders. It is built once per process and per run config (:func:`environment`),
so a simulated worker that serves many clients in many rounds decodes the data
and builds the network once; each call then only loads the incoming global
weights into the existing model. With ``transfer.mode=head|last_k`` it also keeps
each client's frozen-trunk features (:attr:`TaskEnvironment.trunk_cache`,
``train.feature_cache``), so that a round can run only the trainable tail; a deployed
site's environment lives on in its warm executor, and its cache with it. Nothing here
imports flwr, ray or opacus: the benchmark in ``bench/`` runs the very same steps
without Flower.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedimg.simulation.attacks import poisoned_labels
from fedimg.config import FedimgConfig, TrainConfig, from_json
from fedimg.data import (
    ClientPartition,
    Dataset,
    InMemoryLoader,
    SiteData,
    build_transform,
    federation_classes,
    load_dataset,
    partition_dataset,
    own_site_rows,
    read_site_data,
    site_dataset,
)
from fedimg.errors import DataError, UpdateError
from fedimg.seeds import derive_seed
from fedimg.models import MODELS, batchnorm_state_keys, build_model, frozen_state_keys
from fedimg.clientapp.policy import site_epsilon
from fedimg.clientapp.site import SiteOptions
from fedimg.training import (
    TrunkCache,
    balanced_class_weights,
    calibrated_logit_shift,
    evaluate,
    resolve_device,
    restricted_logit_scale,
    scheduled_lr,
    train_local,
)
from fedimg.training.budget import round_steps
from fedimg.training.closed_form import HeadStatistics, head_statistics
from fedimg.training.losses import balanced_weights_from_counts
from fedimg.training.vector_rule import VectorizeRule

log = logging.getLogger(__name__)

@dataclass
class ClientData:
    """One client's loaders over its partition."""

    train: InMemoryLoader
    val: InMemoryLoader
    num_train: int
    num_val: int
    class_weights: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None  # FedRS (train.restricted_softmax)
    logit_shift: torch.Tensor | None = None  # FedLC (train.calibration_tau)


class TaskEnvironment:
    """Dataset, partitions and one reusable model for a run config, in one process."""

    def __init__(self, cfg: FedimgConfig, *, num_threads: int | None = None,
                 site: SiteData | None = None,
                 partitions: Sequence[ClientPartition] | None = None,
                 dataset: Dataset | None = None) -> None:
        """``partitions``: the server's, as its messages carry them; ``()`` = install them
        later (:meth:`install_partitions`); None = partition here, for standalone use
        (benchmarks, audits, tests), with the seeded function the server uses.
        ``dataset``: already loaded in this process (the baselines), else loaded here."""
        started = time.perf_counter()
        if num_threads:
            torch.set_num_threads(num_threads)
        self.cfg = cfg
        if site is None:
            self.dataset = dataset or load_dataset(cfg.data, seed=cfg.seed)
            self.partitions = list(partitions) if partitions is not None else \
                partition_dataset(self.dataset.train, cfg=cfg.data, num_clients=cfg.clients,
                                  seed=cfg.seed)
        else:  # a deployed site: its own images are the only client
            self.dataset, self.partitions = site_dataset(site, name=cfg.data.dataset)
        self.device = resolve_device(cfg.train.device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, num_classes=self.dataset.num_classes,
                                 weights="none", transfer=cfg.transfer).to(self.device)
        self.reference = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        self._clients: dict[int, ClientData] = {}
        self._private: torch.nn.Module | None = None
        self._class_counts: np.ndarray | None = None  # the server's (class_weighting=federated)
        self._train_tf = build_transform(cfg.data.augment, image_size=cfg.data.image_size,
                                         train=True)
        self._eval_tf = build_transform("none", image_size=cfg.data.image_size, train=False)
        log.info("task environment ready in %.1fs (%d clients, %s)",
                 time.perf_counter() - started, len(self.partitions), self.device)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def install_partitions(self, partitions: Sequence[ClientPartition]) -> None:
        """The server's partitions, from the first message that carries them (once)."""
        if self.partitions:
            return
        n = len(self.dataset.train.labels)
        for part in partitions:
            for indices in (part.train_indices, part.val_indices):
                if len(indices) and (indices.min() < 0 or indices.max() >= n):
                    raise DataError(f"client {part.client_id}'s partition indexes beyond "
                                    f"the {n} training images this worker loaded: the server "
                                    "and this worker read different data")
        self.partitions = list(partitions)

    def client(self, partition_id: int) -> ClientData:
        """Loaders of client ``partition_id`` (built on first use, then cached)."""
        if not 0 <= partition_id < len(self.partitions):
            raise DataError(f"partition id {partition_id} is out of range: this run has "
                            f"{len(self.partitions)} clients known here (the server sends "
                            "every client's partition with its messages)")
        if partition_id not in self._clients:
            part, train = self.partitions[partition_id], self.dataset.train
            tcfg, seed = self.cfg.train, self.cfg.seed * 1000 + partition_id
            # A simulated label-flipping client trains on poisoned labels (attack.*).
            labels = poisoned_labels(self.cfg, partition_id, train.labels, self.num_classes)
            self._clients[partition_id] = ClientData(
                train=InMemoryLoader(train.images, labels, indices=part.train_indices,
                                     batch_size=tcfg.batch_size, transform=self._train_tf,
                                     shuffle=True, seed=seed),
                val=InMemoryLoader(train.images, train.labels, indices=part.val_indices,
                                   batch_size=tcfg.eval_batch_size, transform=self._eval_tf,
                                   shuffle=False, seed=seed),
                num_train=len(part.train_indices), num_val=len(part.val_indices),
                class_weights=self._class_weights(labels[part.train_indices]),
                logit_scale=(restricted_logit_scale(labels[part.train_indices],
                                                    self.num_classes, tcfg.restricted_softmax)
                             if tcfg.restricted_softmax < 1 else None),
                logit_shift=(calibrated_logit_shift(labels[part.train_indices],
                                                    self.num_classes, tcfg.calibration_tau)
                             if tcfg.calibration_tau > 0 else None))
        return self._clients[partition_id]

    def _class_weights(self, labels: torch.Tensor) -> torch.Tensor | None:
        weighting = self.cfg.train.class_weighting
        if weighting == "balanced":
            return balanced_class_weights(labels, self.num_classes)
        if weighting == "federated" and self._class_counts is not None:  # else: not yet
            return balanced_weights_from_counts(torch.as_tensor(self._class_counts)).float()
        return None

    def own_class_counts(self) -> np.ndarray:
        """(K,) counts of the training labels of every client known here (a site: its own)."""
        indices = np.unique(np.concatenate([np.asarray(p.train_indices, dtype=np.int64)
                                            for p in self.partitions] or [np.zeros(0, np.int64)]))
        return np.bincount(np.asarray(self.dataset.train.labels)[indices],
                           minlength=self.num_classes).astype(np.int64)

    def install_class_counts(self, counts: np.ndarray) -> None:
        """The federation's class counts (``train.class_weighting=federated``), checked.

        No class may count fewer images in the federation than the clients known here
        hold, and the counts may not change during a run; UpdateError otherwise.
        """
        if self._class_counts is not None:
            if not np.array_equal(counts, self._class_counts):
                raise UpdateError("the server's class counts changed during the run "
                                  f"({self._class_counts.tolist()[:10]} -> "
                                  f"{counts.tolist()[:10]}): message rejected")
            return
        short = np.flatnonzero(counts < self.own_class_counts())
        if len(short):
            raise UpdateError(f"the server's class counts {counts.tolist()[:10]} are below "
                              f"this client's own images for classes {short.tolist()[:10]}: "
                              "message rejected")
        self._class_counts = counts  # clients built before (a site's describe) get them too
        weights = balanced_weights_from_counts(torch.as_tensor(counts)).float()
        self._clients = {pid: dataclasses.replace(data, class_weights=weights)
                         for pid, data in self._clients.items()}

    def private_model(self) -> torch.nn.Module:
        """The shared model with in-place ops rewritten, for Opacus' per-sample hooks.

        It shares every parameter and buffer with :attr:`model`, so loading global
        weights into one loads them into both.
        """
        if self._private is None:
            from fedimg.models import make_inplace_free

            self._private = make_inplace_free(self.model)
        return self._private

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite every parameter and buffer of the shared model."""
        self.model.load_state_dict(state, strict=True)

    def trained_keys(self) -> frozenset[str]:
        """State-dict names of the parameters local training updates."""
        return frozenset(n for n, p in self.model.named_parameters() if p.requires_grad)

    @functools.cached_property
    def trunk_cache(self) -> TrunkCache:
        """Cached features of the frozen trunk (``train.feature_cache``), split once.

        Under DP-SGD the in-place-free model is split, so that the tail Opacus wraps
        has no in-place op; both share every weight with :attr:`model`.
        """
        source = self.private_model() if self.cfg.privacy.mode == "dp_sgd" else self.model
        return TrunkCache.build(source, cfg=self.cfg, device=self.device)

    def private_inputs(self, partition_id: int
                       ) -> tuple[torch.nn.Module, InMemoryLoader]:
        """What DP-SGD wraps and samples: the tail and cached features, when the cache
        serves training, else the in-place-free model and the client's images."""
        data = self.client(partition_id)
        cached = self.trunk_cache.train_inputs(partition_id, data.train, amp=False)
        return cached or (self.private_model(), data.train)

    @functools.cached_property
    def vectorize_rule(self) -> VectorizeRule:
        """This process's measured choice between training a cohort vectorised or one by
        one (``sim.cohort_size``: :mod:`fedimg.clientapp.cohort`), probed once per shape."""
        return VectorizeRule()

    @functools.cached_property
    def batchnorm_keys(self) -> frozenset[str]:
        """State-dict names of the trainable BatchNorm layers (kept local under FedBN)."""
        return batchnorm_state_keys(self.model)

    @functools.cached_property
    def head_keys(self) -> frozenset[str]:
        """State-dict names of the classification head (kept local under FedPer, FedRep)."""
        return MODELS.get(self.cfg.model).head_keys(self.model)

    @functools.cached_property
    def frozen_keys(self) -> frozenset[str]:
        """State-dict names local training never changes (frozen weights and BatchNorm)."""
        return frozen_state_keys(self.model)

    @functools.cached_property
    def built_state(self) -> dict[str, torch.Tensor]:
        """The model as the server builds its start (``weights`` as configured), once;
        the global random state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            model = build_model(self.cfg.model, num_classes=self.num_classes,
                                weights=self.cfg.weights, transfer=self.cfg.transfer)
        return {k: v.detach() for k, v in model.state_dict().items()}

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the model's state dict on the CPU (never aliasing the live model)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def epochs_per_round(self, loader: InMemoryLoader) -> int:
        """Passes over the local data in one round (a round's steps may span several)."""
        steps = round_steps(self.cfg.train, batches=len(loader),
                            num_samples=loader.num_examples)
        return -(-steps // max(1, len(loader)))

    def local_steps(self, partition_id: int) -> int:
        """Optimizer steps client ``partition_id`` takes in one full round
        (``train.local_budget``, :func:`fedimg.training.budget.round_steps`)."""
        loader = self.client(partition_id).train
        return round_steps(self.cfg.train, batches=len(loader),
                           num_samples=loader.num_examples)

    def train(self, partition_id: int, *, server_round: int, proximal_mu: float = 0.0,
              steps: int | None = None, lr: float | None = None,
              grad_offset: Mapping[str, torch.Tensor] | None = None,
              proximal_anchor: Mapping[str, torch.Tensor] | None = None
              ) -> tuple[dict[str, float], int]:
        """Local training of client ``partition_id`` from the loaded weights.

        ``steps`` overrides the round's step count (a client dropping mid-round, or
        the k steps of personalization); ``lr`` the round's scheduled learning rate;
        ``grad_offset`` (trained parameter name -> tensor) is added to those gradients
        at every step (SCAFFOLD, FedDyn: :mod:`fedimg.serverapp.drift_strategies`);
        ``proximal_anchor`` (name -> tensor) centres ``proximal_mu``'s term away from the
        loaded weights (Ditto's personal model: :mod:`fedimg.clientapp.personal`).
        """
        data = self.client(partition_id)
        tcfg = self.cfg.train if steps is None else dataclasses.replace(
            self.cfg.train, local_steps=steps)
        _ = self.trunk_cache  # split before seeding: the split's probe draws nothing
        # Seed by (run, round, client), not by call order: which worker serves a client
        # varies between runs, and a resumed run must replay the same batches.
        torch.manual_seed(derive_seed(self.cfg.seed, server_round, partition_id))
        model, loader, tcfg, scheduled = self.round_inputs(partition_id, tcfg=tcfg,
                                                           server_round=server_round)
        lr = scheduled if lr is None else lr
        offsets = [(p, grad_offset[n]) for n, p in self.model.named_parameters()
                   if grad_offset and n in grad_offset]  # the tail shares these parameters
        anchors = [(p, proximal_anchor[n]) for n, p in self.model.named_parameters()
                   if proximal_anchor and p.requires_grad]
        result = train_local(model, loader, cfg=tcfg, lr=lr,
                             device=self.device, proximal_mu=proximal_mu,
                             class_weights=data.class_weights, logit_scale=data.logit_scale,
                             logit_shift=data.logit_shift,
                             grad_offset=offsets, proximal_anchors=anchors)
        return {**result.as_metrics(), "train/lr": lr}, data.num_train

    def round_inputs(self, partition_id: int, *, tcfg: TrainConfig, server_round: int
                     ) -> tuple[torch.nn.Module, InMemoryLoader, TrainConfig, float]:
        """What client ``partition_id`` trains in ``server_round``: the module (the model,
        or the tail on cached trunk features), its loader at the round's epoch, the
        training settings and the scheduled learning rate. Shared by :meth:`train` and a
        cohort's members (:mod:`fedimg.clientapp.cohort`)."""
        if self.cfg.train.class_weighting == "federated" and self._class_counts is None:
            raise DataError("train.class_weighting=federated, but the server sent no class "
                            "counts (a fedimg server older than this client?). Fix: update "
                            "the server, or train.class_weighting=balanced")
        data = self.client(partition_id)
        data.train.epoch = (server_round - 1) * self.epochs_per_round(data.train)
        lr = scheduled_lr(self.cfg.train, server_round=server_round, total_rounds=self.cfg.rounds)
        model, loader = self.model, data.train
        cached = self.trunk_cache.train_inputs(partition_id, data.train, amp=tcfg.amp)
        if cached is not None:  # the tail on cached trunk features, batched alike
            (model, loader), tcfg = cached, dataclasses.replace(tcfg, channels_last=False)
        return model, loader, tcfg, lr

    def head_statistics(self, partition_id: int) -> HeadStatistics:
        """Fed3R's feature sums of client ``partition_id``'s training images, as the
        evaluation sees them (no augmentation): ``fl.head_init=ridge``."""
        part, train = self.partitions[partition_id], self.dataset.train
        labels = poisoned_labels(self.cfg, partition_id, train.labels, self.num_classes)
        loader = InMemoryLoader(train.images, labels, indices=part.train_indices,
                                batch_size=self.cfg.train.eval_batch_size,
                                transform=self._eval_tf, shuffle=False, seed=0)
        return head_statistics(self.model, MODELS.get(self.cfg.model).get_head(self.model),
                               loader, num_classes=self.num_classes, device=self.device)

    def site_test(self, partition_id: int) -> InMemoryLoader | None:
        """The test rows of this client's own site (:func:`own_site_rows`), or None."""
        own = own_site_rows(self.dataset, self.partitions[partition_id].train_indices,
                            column=self.cfg.data.site_column)
        return None if own is None else InMemoryLoader(
            self.dataset.test.images, self.dataset.test.labels, indices=own,
            batch_size=self.cfg.train.eval_batch_size, transform=self._eval_tf,
            shuffle=False, seed=0)

    def evaluate_client(self, partition_id: int) -> tuple[dict[str, float], int]:
        """Metrics of the loaded weights on client ``partition_id``'s validation split."""
        data = self.client(partition_id)
        model, loader = self.model, data.val
        cached = self.trunk_cache.eval_inputs(partition_id, data.val, amp=self.cfg.train.amp)
        if cached is not None:
            model, loader = cached
        metrics = evaluate(model, loader, device=self.device, num_classes=self.num_classes,
                           amp=self.cfg.train.amp, per_class=True)  # for the pooled score
        return {f"val/{k}": v for k, v in metrics.items() if k != "num_examples"}, data.num_val


@functools.lru_cache(maxsize=2)
def environment(config_json: str, num_threads: int | None = None) -> TaskEnvironment:
    """The process-wide TaskEnvironment of a run config (keyed by its canonical JSON).

    Its partitions are installed from the first message that carries them.
    """
    return TaskEnvironment(from_json(config_json), num_threads=num_threads, partitions=())


@functools.lru_cache(maxsize=2)
def site_environment(config_json: str, site: SiteOptions) -> TaskEnvironment:
    """The TaskEnvironment of a deployed site: its own data, device and thread limit.

    The images are checked against the run's class list here (unknown class
    folders, unreadable files, too few samples are a :class:`DataError` naming them),
    so a site whose data does not fit the federation fails its first message.
    """
    cfg = from_json(config_json)
    if site.device:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=site.device))
    # the run's budget for this site, by its name (every deployed site is client 0)
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(
        cfg.privacy, target_epsilon=site_epsilon(cfg, site.name)))
    data = read_site_data(site.data_path, classes=federation_classes(cfg.data),
                          image_size=cfg.data.image_size, min_samples=site.min_samples,
                          val_fraction=cfg.data.val_fraction, seed=cfg.seed,
                          on_corrupt=cfg.data.on_corrupt, max_samples=site.max_samples)
    return TaskEnvironment(cfg, num_threads=site.num_threads or None, site=data)
