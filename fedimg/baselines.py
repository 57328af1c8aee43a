"""The two references of every cross-silo study: pooled and local-only training.

``strategy=pooled`` trains one model on the union of the sites' training data (the
upper reference: what pooling the archives would give); ``strategy=local`` trains one
model per site on that site's data alone (what a site gets without joining). Both are
ordinary runs with the federation's data, partitions, model, recipe and output files
(FLamby, Ogier du Terrail et al. 2022; Rieke et al. 2020, "The future of digital health
with federated learning"). No weights are exchanged, so no Flower grid or Ray is used:
they train in this process with the ClientApp's own :class:`TaskEnvironment`.

The budget is the federation's. A round of the federation takes ``steps_k`` local
steps at each of its sampled sites (:func:`fedimg.serverapp.strategies.sampled_clients`
of ``K``); ``pooled`` takes their expected sum, ``sum_k steps_k * sampled / K``, per round
on the union, and ``local`` takes ``steps_k`` per round at every site, with the same
learning-rate schedule over the same rounds and the same seeds per (round, site).

Every round is evaluated as a federated round is: ``test/*`` on the pooled test split
and ``test/site/<name>/*`` on each site's rows of it. Under ``local``, ``test/*`` is the
mean over the sites' models on the pooled test split, ``test/site/<name>/*`` is site
``name``'s own model on its own test rows, and each client entry holds its model's
pooled-test metrics; the summary names the worst site and the spread.

With ``fl.head_init=ridge`` each model starts from the closed-form head of its own
training images (:mod:`fedimg.training.closed_form`): ``pooled`` from the union's, which
is the head the federation's summed statistics give, ``local`` from each site's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedimg.build import PreparedRun
from fedimg.clientapp.environment import TaskEnvironment
from fedimg.data import ClientPartition, Dataset
from fedimg.errors import ConfigError
from fedimg.reporting import RoundProgress, library_versions
from fedimg.serverapp.evaluation import CentralEvaluator, site_key
from fedimg.serverapp.head_init import ridge_head_state
from fedimg.serverapp.results import data_summary
from fedimg.serverapp.round_record import POOLED_METRIC
from fedimg.serverapp.strategies import STRATEGIES, sampled_clients
from fedimg.training.metrics import pooled_balanced_accuracy
from fedimg.transport.records import COUNT_KEY

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Trainee:
    """One model a baseline trains: its name, partition and steps per round."""

    name: str
    partition: int  # index into the environment's partitions
    steps: int


def check_baseline(prepared: PreparedRun, *, resume: bool) -> None:
    """Refuse what a baseline cannot honour, with one line each."""
    cfg = prepared.cfg
    for bad, why in ((cfg.privacy.mode != "none", f"privacy={cfg.privacy.mode}: a baseline "
                      "trains without DP. Fix: privacy=none (compare DP runs federated)"),
                     (cfg.deploy.enabled, "deploy.enabled=true: a baseline needs every "
                      "site's data in one place. Fix: simulate it"),
                     (resume, "resume: a baseline run is not resumable. Fix: start it "
                      "again (fedimg.compare reuses finished runs)")):
        if bad:
            raise ConfigError(f"strategy={cfg.strategy} with {why}")


def site_names(dataset: Dataset, partitions: Sequence[ClientPartition],
               column: str | None) -> list[str]:
    """Each partition's site: its one value of ``column`` (natural split), else client<k>."""
    values = dataset.train.metadata.get(column) if column else None
    names = []
    for k, part in enumerate(partitions):
        found = set(np.asarray(values)[part.train_indices].astype(str)) if values is not None \
            else set()
        names.append(site_key(found.pop()) if len(found) == 1 else f"client{k}")
    return names


def trainees(prepared: PreparedRun, env: TaskEnvironment) -> list[Trainee]:
    """Who trains, on which partition, for how many steps a round (see the module doc)."""
    cfg, parts = prepared.cfg, prepared.partitions
    steps = [env.local_steps(k) for k in range(len(parts))]
    if cfg.strategy == "local":
        names = site_names(env.dataset, parts, cfg.data.site_column)
        return [Trainee(n, k, s) for k, (n, s) in enumerate(zip(names, steps))]
    share = min(sampled_clients(cfg), len(parts)) / len(parts)
    return [Trainee("pooled", len(parts), max(1, round(sum(steps) * share)))]


def union(partitions: Sequence[ClientPartition]) -> ClientPartition:
    """One partition holding every site's training and validation indices."""
    return ClientPartition(len(partitions),
                           np.concatenate([p.train_indices for p in partitions]),
                           np.concatenate([p.val_indices for p in partitions]))


class BaselineRun:
    """Trains the baseline's models round by round and records each round."""

    def __init__(self, prepared: PreparedRun) -> None:
        self.prepared, cfg = prepared, prepared.cfg
        self.env = TaskEnvironment(cfg, dataset=prepared.dataset,
                                   partitions=[*prepared.partitions, union(prepared.partitions)])
        self.evaluator = CentralEvaluator(cfg, prepared.dataset)
        if cfg.train.class_weighting == "federated":  # the union's: pooled training's weights
            self.env.install_class_counts(self.env.own_class_counts())
        self.trainees = trainees(prepared, self.env)
        self.states: dict[str, State] = {t.name: dict(prepared.initial_state)
                                         for t in self.trainees}
        if cfg.fl.head_init == "ridge":  # each model's head from its own training images
            for t in self.trainees:
                self.states[t.name].update(self._ridge_head(t))
        log.info("%s baseline: %s", cfg.strategy, ", ".join(
            f"{t.name} ({self.env.client(t.partition).num_train} images, {t.steps} steps/"
            "round)" for t in self.trainees))

    def _ridge_head(self, trainee: Trainee) -> State:
        """``fl.head_init=ridge`` in-process: the closed-form head of the trainee's data
        (pooled: the union, the head a federation's summed statistics give)."""
        self.env.load_state(self.states[trainee.name])
        return ridge_head_state(self.prepared.cfg, self.env.head_statistics(trainee.partition))

    def train_round(self, server_round: int) -> dict[str, dict[str, Any]]:
        """Each trainee trains its own model from its own last state."""
        entries = {}
        for t in self.trainees:
            self.env.load_state(self.states[t.name])
            metrics, _ = self.env.train(t.partition, server_round=server_round, steps=t.steps)
            self.states[t.name] = self.env.state()
            val, _ = self.env.evaluate_client(t.partition)
            counts = {k.removeprefix("val/"): v for k, v in val.items() if COUNT_KEY in k}
            entries[t.name] = {"train": metrics, "counts": counts,
                               "val": {k: v for k, v in val.items() if COUNT_KEY not in k}}
        return entries

    def evaluate(self, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """``test/*`` (pooled split), ``test/site/*`` and the per-model entries of a round."""
        tests = {t.name: self.evaluator(self.states[t.name]) for t in self.trainees}
        if self.prepared.cfg.strategy == "pooled":
            return dict(tests["pooled"])
        pooled = {k: v for k, v in _mean(list(tests.values())).items()
                  if not k.startswith("test/site/")}
        own = {k: v for name, m in tests.items() for k, v in m.items()
               if k.startswith(f"test/site/{name}/")}
        for name, m in tests.items():
            entries.setdefault(name, {})["test"] = {k: v for k, v in m.items()
                                                    if not k.startswith("test/site/")}
        return {**pooled, **own}

    def record(self, server_round: int, started: float) -> dict[str, Any]:
        """The round's metrics.jsonl record (round 0: the initial model, evaluated)."""
        entries = self.train_round(server_round) if server_round else {}
        record: dict[str, Any] = {"round": server_round, **self.evaluate(entries)}
        trained = [e for e in entries.values() if "train" in e]
        if trained:
            record.update(_mean([e["train"] for e in trained]))
            record.update(_mean([e["val"] for e in trained]))
            record[POOLED_METRIC] = pooled_balanced_accuracy([e.pop("counts") for e in trained])
            accuracies = [e["val"].get("val/accuracy", float("nan")) for e in trained]
            record.update({"fair/worst_accuracy": float(np.nanmin(accuracies)),
                           "fair/spread_accuracy": float(np.nanmax(accuracies)
                                                         - np.nanmin(accuracies)),
                           "fleet/ok": len(trained)})
        record.update({"bytes/down": 0, "bytes/up": 0, "wall_s": time.perf_counter() - started,
                       "clients": {str(k): entries.get(t.name, {})
                                   for k, t in enumerate(self.trainees)}})
        return record


def _mean(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean over ``dicts`` (NaN-aware; keys missing from some are skipped)."""
    keys = set.intersection(*(set(d) for d in dicts)) if dicts else set()
    return {k: float(np.nanmean([d[k] for d in dicts])) if not all(
        np.isnan(d[k]) for d in dicts) else float("nan") for k in sorted(keys)}


def run_baseline(prepared: PreparedRun) -> dict[str, Any]:
    """Run ``strategy=pooled|local`` for ``cfg.rounds`` rounds; return results.json's content."""
    cfg, recorder = prepared.cfg, prepared.recorder
    if not STRATEGIES.get(cfg.strategy).baseline:
        raise ConfigError(f"strategy={cfg.strategy} is not a baseline (pooled, local)")
    run = BaselineRun(prepared)
    startup_s = time.perf_counter() - prepared.started
    rounds, progress = [], RoundProgress(cfg.rounds, enabled=cfg.output.progress,
                                         desc=cfg.strategy)
    for server_round in range(cfg.rounds + 1):
        record = run.record(server_round, time.perf_counter())
        recorder.append_round(record)
        rounds.append(record)
        if server_round:
            progress.update({k: record.get(k) for k in ("train/loss", "test/accuracy")})
    progress.close()
    for t in run.trainees:
        recorder.save_checkpoint("final" if t.name == "pooled" else f"final_{t.name}",
                                 run.states[t.name], prepared.checkpoint_meta(rounds[-1]))
    results = baseline_results(prepared, rounds, startup_s)
    recorder.write_results(results)
    return results


def baseline_results(prepared: PreparedRun, rounds: list[dict[str, Any]],
                     startup_s: float) -> dict[str, Any]:
    """results.json of a baseline: the federated run's keys that apply to it."""
    cfg = prepared.cfg
    rounds_s = sum(r["wall_s"] for r in rounds[1:])
    return {"name": cfg.name, "seed": cfg.seed, "rounds": cfg.rounds, "model": cfg.model,
            "strategy": cfg.strategy, "run_dir": str(prepared.recorder.run_dir),
            "select_metric": cfg.output.select_metric,
            "final": {k: v for k, v in rounds[-1].items() if k != "clients"},
            "best": best_round(rounds[1:], cfg.output.select_metric), "initial": rounds[0],
            "data": data_summary(prepared),
            "timing": {"startup_s": startup_s, "rounds_s": rounds_s,
                       "mean_round_s": rounds_s / max(1, len(rounds) - 1),
                       "total_s": time.perf_counter() - prepared.started},
            "bytes": {"down": 0, "up": 0}, "participation": {},
            "versions": library_versions()}


def best_round(rounds: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The round with the highest ``metric`` (the first of ties; NaN never wins)."""
    scored = [r for r in rounds if isinstance(r.get(metric), float)
              and not np.isnan(r[metric])]
    if not scored:
        return {}
    best = max(scored, key=lambda r: r[metric])  # max keeps the first of equal values
    return {k: v for k, v in best.items() if k != "clients"}
