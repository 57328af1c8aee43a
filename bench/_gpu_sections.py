"""The four sections of ``bench/gpu.py``; each returns :class:`Table` objects.

Every section times its variants interleaved (variant A, B, C, then again), after
``warmup`` untimed passes, and keeps the best of ``repeats``: a shared machine only
adds time. CUDA work is bracketed by ``torch.cuda.synchronize`` (:func:`timed`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import PeakMemory  # noqa: E402

from fedimg.build import initial_model, prepare_run  # noqa: E402
from fedimg.clientapp.environment import TaskEnvironment  # noqa: E402
from fedimg.config import TrainConfig, TransferConfig  # noqa: E402
from fedimg.config.compose import compose_config  # noqa: E402
from fedimg.models import build_model  # noqa: E402
from fedimg.models.split import split_model  # noqa: E402
from fedimg.privacy.dp_sgd import train_round  # noqa: E402
from fedimg.resolve import compose_and_check  # noqa: E402
from fedimg.simulation.engine import simulate  # noqa: E402
from fedimg.training.device import amp_dtype  # noqa: E402

log = logging.getLogger("fedimg.bench")
SMOKE = "CPU smoke run — not a GPU figure"
COMMON = ["output.progress=false", "output.plots=false", "output.tensorboard=false"]
# Tiny sizes (--tiny): one step of a small batch on a few hundred images, so that every
# path runs in seconds on a shared CPU.
TINY = {"cameras": ["train.local_steps=1", "train.batch_size=8"],
        "medical": ["data.max_train_samples=200", "data.image_size=32",
                    "train.local_steps=1", "train.batch_size=8"],
        "medical_dp": ["data.max_train_samples=200", "train.local_steps=1"]}
# The simulation engine alone: no simulated availability, dropout, deadline or links.
ENGINE_ONLY = ["hetero.availability=1", "hetero.dropout=0", "hetero.speed_sigma=0",
               "hetero.speed_factors=null", "hetero.deadline_s=null",
               "hetero.uplink_mbps=null", "hetero.downlink_mbps=null",
               "fl.personalize_steps=0"]


@dataclass(frozen=True)
class Context:
    """What every section needs: where it runs, and how hard it measures."""

    device: torch.device
    smoke: bool  # no GPU: every figure is a CPU smoke figure
    tiny: bool
    repeats: int
    warmup: int
    client: int
    ks: tuple[int, ...]
    fractions: tuple[float, ...]
    rounds: int


@dataclass
class Table:
    """One printed table: a title, its columns, and rows of plain values (JSON-ready)."""

    section: str
    title: str
    columns: list[str]
    rows: list[list[object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- timing ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of ``fn()``, with the device's queued work finished before and after."""
    sync(device)
    began = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - began


def best_of(runs: Mapping[str, Callable[[], float]], ctx: Context) -> dict[str, float]:
    """Each run returns its own seconds; warm-up passes, then interleaved repeats, best kept."""
    for _ in range(ctx.warmup):
        for run in runs.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(ctx.repeats):
        for name, run in runs.items():
            seconds[name].append(run())
    return {name: min(values) for name, values in seconds.items()}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else float("nan")


# --- one client's round through TaskEnvironment ---------------------------------------


def environment(scenario: str, ctx: Context, *overrides: str,
                dataset: object = None) -> TaskEnvironment:
    """The client's environment for ``scenario`` on the bench device (data loaded once)."""
    extra = TINY.get(scenario, []) if ctx.tiny else []
    cfg = compose_config(scenario, [*COMMON, f"train.device={ctx.device}", *extra, *overrides])
    return TaskEnvironment(cfg, dataset=dataset)


def round_runner(env: TaskEnvironment, client: int) -> Callable[[], float]:
    """Seconds of one local round of ``client`` from the run's first global model."""
    start = initial_model(env.cfg, env.num_classes)[0]

    def run() -> float:
        env.load_state(start)
        if env.cfg.privacy.mode == "dp_sgd":
            return timed(lambda: train_round(env, client, server_round=1), env.device)
        return timed(lambda: env.train(client, server_round=1), env.device)

    return run


# --- 1. AMP and channels-last ---------------------------------------------------------

PRECISIONS = {"fp32": ["train.amp=false", "train.channels_last=false"],
              "amp": ["train.amp=true", "train.channels_last=false"],
              "amp_cl": ["train.amp=true", "train.channels_last=true"]}


def amp_section(ctx: Context) -> list[Table]:
    """cameras (last_k), medical (full) and medical_dp (DP-SGD, head): fp32 / AMP / AMP+CL."""
    dtype = amp_dtype(ctx.device, enabled=True)
    autocast_name = str(dtype).removeprefix("torch.") if dtype else "off (CPU)"
    table = Table("amp", "AMP and channels-last: one client's local round, feature cache off",
                  ["scenario", "transfer", "images", "fp32 s", "AMP s", "AMP+CL s",
                   "fp32/AMP", "fp32/(AMP+CL)", "autocast dtype"],
                  notes=["DP-SGD trains in float32 whatever train.amp says "
                         "(privacy/dp_sgd.py:_round_plan): its ratios should be ~1."])
    for scenario in ("cameras", "medical", "medical_dp"):
        first = environment(scenario, ctx, "train.feature_cache=off")
        envs = {name: environment(scenario, ctx, "train.feature_cache=off", *fields,
                                  dataset=first.dataset)
                for name, fields in PRECISIONS.items()}
        t = best_of({name: round_runner(env, ctx.client) for name, env in envs.items()}, ctx)
        cfg = first.cfg
        table.rows.append([scenario, str(cfg.transfer.mode), first.client(ctx.client).num_train,
                           t["fp32"], t["amp"], t["amp_cl"], ratio(t["fp32"], t["amp"]),
                           ratio(t["fp32"], t["amp_cl"]), autocast_name])
    return [table]


# --- 2. feature cache -----------------------------------------------------------------


def cache_section(ctx: Context) -> list[Table]:
    """``train.feature_cache=off`` vs ``auto``: uncached, cold-cache and warm-cache rounds."""
    table = Table("cache", "Feature cache: one client's round, off vs auto "
                  "(train.amp and channels_last as shipped)",
                  ["scenario", "images", "uncached s", "cold s", "warm s",
                   "uncached/warm", "uncached/cold"])
    for scenario in ("cameras", "medical_dp"):
        off = environment(scenario, ctx, "train.feature_cache=off")
        auto = environment(scenario, ctx, "train.feature_cache=auto", dataset=off.dataset)
        warm = round_runner(auto, ctx.client)

        def cold() -> float:
            auto.trunk_cache.store.clear()  # as after a changed frozen weight
            return warm()

        t = best_of({"uncached": round_runner(off, ctx.client), "cold": cold,
                     "warm": warm}, ctx)
        table.rows.append([scenario, off.client(ctx.client).num_train, t["uncached"],
                           t["cold"], t["warm"], ratio(t["uncached"], t["warm"]),
                           ratio(t["uncached"], t["cold"])])
    return [table]


# --- 3. client vectorisation ----------------------------------------------------------
# The vectorised trainer's API (fedimg/training/vectorized.py, vector_rule.py) is used
# only through these three functions: if it changes, adapt them.

CLASSES, BATCH, PIXELS = 43, 16, 48  # cameras: GTSRB's classes, batch 16, 48 px
VECTOR_CFG = TrainConfig(lr=0.02, momentum=0.9, weight_decay=1e-4, local_epochs=1,
                         batch_size=BATCH)


def _train_cohort(model: torch.nn.Module, jobs: Sequence[object], *, vectorised: bool,
                  device: torch.device) -> None:
    from fedimg.training.vectorized import train_sequential, train_vectorized
    train = train_vectorized if vectorised else train_sequential
    train(model, jobs, cfg=VECTOR_CFG, lr=VECTOR_CFG.lr, device=device)


def _refusal(model: torch.nn.Module, device: torch.device) -> str | None:
    from fedimg.training.vectorized import refusal
    return refusal(model, cfg=VECTOR_CFG, device=device)


def _camera_tail(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """cameras' model (last_k=2, BatchNorm training), split: (frozen trunk, trained tail)."""
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes=CLASSES, weights="pretrained",
                        transfer=TransferConfig(mode="last_k", last_k=2, bn="train")).to(device)
    split = split_model(model, probe=torch.randn(2, 3, PIXELS, PIXELS, device=device))
    return split.trunk, split.tail


def _camera_jobs(k: int, trunk: torch.nn.Module, device: torch.device) -> list[object]:
    """k cameras of 1-3 batches of 16 random 48 px images, as cached trunk features
    (``bench/vectorize.py``'s clients, so the two benches time the same work)."""
    from vectorize import _jobs

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return trunk(x)

    return _jobs(k, features, device)


def vectorize_section(ctx: Context) -> list[Table]:
    """k camera clients' rounds, one after another vs one vmapped step per step."""
    table = Table("vectorize", "Client vectorisation: k small camera clients (last_k tail "
                  "on cached features), sequential vs vectorised",
                  ["k", "steps", "sequential s", "vectorised s", "sequential/vectorised"],
                  notes=["SGD, momentum 0.9; train.amp and channels_last at their defaults "
                         "(bfloat16 autocast where the GPU has it); random 48 px images."])
    if not (Path(__file__).resolve().parents[1] / "fedimg/training/vectorized.py").exists():
        table.notes.append("skipped: fedimg/training/vectorized.py does not exist")
        return [table]
    trunk, tail = _camera_tail(ctx.device)
    reason = _refusal(tail, ctx.device)
    if reason is not None:
        table.notes.append(f"skipped: the vectorised trainer refuses this setup: {reason}")
        return [table]
    for k in ctx.ks:
        jobs = _camera_jobs(k, trunk, ctx.device)
        runs = {name: (lambda v=vec: timed(
                    lambda: _train_cohort(tail, jobs, vectorised=v, device=ctx.device),
                    ctx.device))
                for name, vec in (("sequential", False), ("vectorised", True))}
        t = best_of(runs, ctx)
        steps = sum(len(job.loader) for job in jobs)
        table.rows.append([k, steps, t["sequential"], t["vectorised"],
                           ratio(t["sequential"], t["vectorised"])])
    return [table]


# --- 4. fractional GPUs ---------------------------------------------------------------


def _nvidia_smi_mib() -> float | None:
    """GPU memory in use (MiB), summed over the GPUs nvidia-smi lists; None without it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return sum(float(line) for line in out.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class GpuMemory:
    """``with GpuMemory() as mem: ...``: baseline and peak of nvidia-smi's memory.used.

    It sees every process on the GPU (this driver and the Ray workers), which
    ``torch.cuda.max_memory_allocated`` cannot; ``None`` where nvidia-smi is absent.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.baseline: float | None = None
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        used = _nvidia_smi_mib()
        if used is not None:
            self.peak = used if self.peak is None else max(self.peak, used)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuMemory:
        self.baseline = _nvidia_smi_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _sim_overrides(ctx: Context, fraction: float) -> list[str]:
    """cameras with ``1 / fraction`` clients per GPU; CPUs per client fixed so that the
    GPU share, not the CPUs, limits how many run at once. CPU smoke: the fraction is
    applied to the CPUs instead (no GPU to share)."""
    cpus = os.cpu_count() or 1
    most = round(1 / min(ctx.fractions))  # clients at once at the smallest share
    if ctx.smoke:
        resources = ["sim.num_gpus_per_client=0", f"sim.num_cpus_per_client={cpus * fraction:g}"]
    else:
        resources = [f"sim.num_gpus_per_client={fraction:g}",
                     f"sim.num_cpus_per_client={max(1, cpus // most)}"]
    size = ([*TINY["cameras"], "clients=2", "fl.fraction_train=1.0",
             "fl.fraction_evaluate=0.5", "data.max_test_samples=32"] if ctx.tiny else [])
    run_dir = tempfile.mkdtemp(prefix="fedimg-gpu-bench-")
    return [*ENGINE_ONLY, *COMMON, *size, *resources, f"sim.ray_num_cpus={cpus}",
            f"rounds={ctx.rounds}", f"train.device={ctx.device.type}",
            "output.checkpoints=false", f"hydra.run.dir={run_dir}"]


def _simulation(ctx: Context, fraction: float) -> dict[str, object]:
    """One short cameras run; mean seconds per round over rounds 2+ and peak memory."""
    cfg = compose_and_check("cameras", _sim_overrides(ctx, fraction))
    prepared = prepare_run(cfg)
    with GpuMemory() as gpu, PeakMemory() as host:
        results = simulate(prepared)
    later = [r for r in prepared.recorder.read_rounds() if r["round"] >= 2]
    seconds = [r["wall_s"] for r in later]
    part = results["participation"]
    return {"round_s": sum(seconds) / len(seconds) if seconds else float("nan"),
            "round1_s": next((r["wall_s"] for r in prepared.recorder.read_rounds()
                              if r["round"] == 1), float("nan")),
            "ok": f"{part['ok']}/{part['sampled']}", "failed": part["failed"],
            "gpu_peak": gpu.peak, "gpu_added": (gpu.peak - gpu.baseline)
            if gpu.peak is not None and gpu.baseline is not None else None,
            "host_gib": round(host.bytes / 2**30, 2), "cpus": cfg.sim.num_cpus_per_client}


def fractional_section(ctx: Context) -> list[Table]:
    """cameras simulated with 1, 2, 4 clients per GPU (sim.num_gpus_per_client)."""
    share = "share of the CPUs (no GPU)" if ctx.smoke else "sim.num_gpus_per_client"
    table = Table("fractional", f"Fractional GPUs: cameras simulation, {ctx.rounds} rounds, "
                  "mean wall seconds per round over rounds 2+",
                  [share, "clients/GPU", "cpus/client", "round 1 s", "round s (2+)",
                   "round s / first share's", "trained ok/sampled", "failed",
                   "GPU MiB peak", "GPU MiB added", "host GiB peak"],
                  notes=["GPU MiB: nvidia-smi memory.used sampled every 0.5 s (all "
                         "processes: driver and Ray workers); added = peak - before the run."])
    if ctx.smoke:
        table.notes.append("CPU smoke: sim.num_gpus_per_client=0; the share is applied to "
                           "sim.num_cpus_per_client (share x host CPUs) instead.")
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()  # the earlier sections' cached blocks: not this run's
    first = None
    for fraction in ctx.fractions:
        r = _simulation(ctx, fraction)
        first = first or r["round_s"]
        table.rows.append([fraction, round(1 / fraction), r["cpus"], r["round1_s"],
                           r["round_s"], ratio(r["round_s"], first), r["ok"], r["failed"],
                           r["gpu_peak"], r["gpu_added"], r["host_gib"]])
    return [table]
