"""The textbook side of ``bench/flower_baseline.py``: Flower's quickstart-pytorch, on fedimg's task.

It lives in an importable module, as a quickstart's ``client_app.py`` does, so Ray
pickles the ClientApp by reference rather than by value with every message.

Per train/evaluate call, :func:`load_data` decodes the dataset
(:func:`fedimg.data.load_dataset`), partitions it
(:func:`fedimg.data.partition_dataset`) and builds this client's loaders exactly as
:meth:`fedimg.clientapp.environment.TaskEnvironment.client` does; then a fresh network is built
(``weights="none"``, quickstart's ``Net()``) and the received arrays are loaded into
it. Training and evaluation are :func:`fedimg.training.train_local` and
:func:`~fedimg.training.evaluate` with fedimg's seeds, threads and learning-rate
schedule, so only the overhead differs. The server is stock ``FedAvg`` started
with ``strategy.start``; its ``evaluate_fn`` only stamps the end of each round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedimg.config import FedimgConfig, from_json, to_json
from fedimg.resolve import check_registries
from fedimg.data import InMemoryLoader, build_transform, load_dataset, partition_dataset
from fedimg.models import build_model
from fedimg.clientapp.environment import ClientData
from fedimg.training import balanced_class_weights
from fedimg.training import evaluate, resolve_device, scheduled_lr, train_local

CONFIG_KEY, FRESH_KEY, NUM_EXAMPLES = "fedimg-config", "bench-fresh-decode", "num-examples"
SUMMED = ("bench/", "train/seconds")  # summed over replies, not example-weighted


# ---- the textbook client (quickstart-pytorch's task.py and client_app.py) ----------
def load_data(cfg: FedimgConfig, partition_id: int) -> tuple[ClientData, int]:
    """Decode the dataset, partition it and wrap this client's loaders, from scratch."""
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    part = partition_dataset(dataset.train, cfg=cfg.data, num_clients=cfg.clients,
                             seed=cfg.seed)[partition_id]
    train, tcfg, seed = dataset.train, cfg.train, cfg.seed * 1000 + partition_id
    weights = (balanced_class_weights(train.labels[part.train_indices], dataset.num_classes)
               if tcfg.class_weighting == "balanced" else None)
    size = cfg.data.image_size
    return ClientData(
        train=InMemoryLoader(train.images, train.labels, indices=part.train_indices,
                             batch_size=tcfg.batch_size, shuffle=True, seed=seed,
                             transform=build_transform(cfg.data.augment, image_size=size,
                                                       train=True)),
        val=InMemoryLoader(train.images, train.labels, indices=part.val_indices,
                           batch_size=tcfg.eval_batch_size, shuffle=False, seed=seed,
                           transform=build_transform("none", image_size=size, train=False)),
        num_train=len(part.train_indices), num_val=len(part.val_indices),
        class_weights=weights), dataset.num_classes


@contextlib.contextmanager
def _decode_cache(fresh: bool) -> Iterator[None]:
    """With ``fresh``, point fedimg's decode cache at an empty folder for one call."""
    if not fresh:
        yield
        return
    saved, folder = os.environ.get("FEDIMG_CACHE"), tempfile.mkdtemp(prefix="bench-decode-")
    os.environ["FEDIMG_CACHE"] = folder
    try:
        yield
    finally:
        del os.environ["FEDIMG_CACHE"]
        if saved is not None:
            os.environ["FEDIMG_CACHE"] = saved
        shutil.rmtree(folder, ignore_errors=True)


@dataclasses.dataclass
class Call:
    """What one textbook handler call rebuilt, and how long that took."""

    cfg: FedimgConfig
    partition_id: int
    data: ClientData
    num_classes: int
    model: torch.nn.Module
    device: torch.device
    timings: dict[str, float]


def _setup(msg: Message, context: Context) -> Call:
    """Config from the message, then ``load_data`` and ``Net()`` + the received weights."""
    started = time.perf_counter()
    config = msg.content["config"]
    cfg = check_registries(from_json(str(config[CONFIG_KEY])))
    torch.set_num_threads(cfg.train.num_threads or max(1, int(cfg.sim.num_cpus_per_client)))
    pid = int(context.node_config["partition-id"])
    with _decode_cache(bool(config.get(FRESH_KEY, False))):
        data, num_classes = load_data(cfg, pid)
    logging.getLogger("fedimg.data").setLevel(logging.ERROR)  # data warnings: once a process
    loaded = time.perf_counter()
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, num_classes=num_classes, weights="none",
                        transfer=cfg.transfer)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(device)
    return Call(cfg, pid, data, num_classes, model, device,
                {"bench/data_s": loaded - started,
                 "bench/model_s": time.perf_counter() - loaded, "bench/calls": 1.0})


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train a fresh copy of the received model on this client's freshly loaded data."""
    call = _setup(msg, context)
    cfg, loader, server_round = call.cfg, call.data.train, int(msg.content["config"]
                                                                ["server-round"])
    # The same batches as fedimg's TaskEnvironment.train: seeded by (run, round, client).
    torch.manual_seed(int(np.random.SeedSequence(
        [cfg.seed, server_round, call.partition_id]).generate_state(1)[0]))
    steps = cfg.train.local_steps
    loader.epoch = (server_round - 1) * (-(-steps // max(1, len(loader))) if steps
                                         else cfg.train.local_epochs)
    lr = scheduled_lr(cfg.train, server_round=server_round, total_rounds=cfg.rounds)
    result = train_local(call.model, loader, cfg=cfg.train, lr=lr, device=call.device,
                         class_weights=call.data.class_weights)
    metrics = MetricRecord({"train/loss": result.loss, "train/accuracy": result.accuracy,
                            "train/seconds": result.seconds, **call.timings,
                            NUM_EXAMPLES: call.data.num_train})
    content = RecordDict({"arrays": ArrayRecord(call.model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate_model(msg: Message, context: Context) -> Message:
    """Evaluate a fresh copy of the received model on this client's validation split."""
    call = _setup(msg, context)
    started = time.perf_counter()
    metrics = evaluate(call.model, call.data.val, device=call.device,
                       num_classes=call.num_classes, amp=call.cfg.train.amp)
    record = MetricRecord({"val/accuracy": metrics.get("accuracy", 0.0),
                           "val/loss": metrics.get("loss", 0.0),
                           "bench/eval_s": time.perf_counter() - started, **call.timings,
                           NUM_EXAMPLES: call.data.num_val})
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)


# ---- the textbook server: stock FedAvg, strategy.start ------------------------------
def aggregate_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Example-weighted means (FedAvg's default), but sums of the timings and counts."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weighting_key]) for m in metrics]
    out: dict[str, float] = {}
    for key in metrics[0]:
        values = [float(m[key]) for m in metrics]
        if key.startswith(SUMMED) or key == weighting_key:
            out[key] = sum(values)
        else:
            out[key] = sum(v * w for v, w in zip(values, weights)) / (sum(weights) or 1.0)
    return MetricRecord(out)


def textbook_server(cfg: FedimgConfig, *, num_classes: int, fresh_decode: bool,
                    stamps: dict[int, float], results: dict) -> ServerApp:
    """A quickstart-style ServerApp; ``evaluate_fn`` only stamps the end of each round."""
    app = ServerApp()

    def clock(server_round: int, arrays: ArrayRecord) -> None:
        stamps[server_round] = time.perf_counter()  # round 0: before round 1 starts

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, num_classes=num_classes, weights=cfg.weights,
                            transfer=cfg.transfer)
        fl = cfg.fl  # a textbook app lets Flower sample, from the same fractions
        strategy = FedAvg(fraction_train=fl.fraction_train,
                          fraction_evaluate=fl.fraction_evaluate,
                          min_train_nodes=fl.min_train_clients,
                          min_evaluate_nodes=min(fl.min_evaluate_clients, cfg.clients),
                          min_available_nodes=fl.min_train_clients,
                          train_metrics_aggr_fn=aggregate_metrics,
                          evaluate_metrics_aggr_fn=aggregate_metrics)
        config = {CONFIG_KEY: to_json(cfg), FRESH_KEY: fresh_decode}
        results["result"] = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.rounds,
            timeout=cfg.fl.timeout_s, train_config=ConfigRecord(config),
            evaluate_config=ConfigRecord(config), evaluate_fn=clock)

    return app
