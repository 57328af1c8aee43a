"""The typed config schema of fedimg, and the single place where it is validated.

Scenario files in ``scenarios/`` and command-line overrides (Hydra ``key=value``)
are merged onto these dataclasses by :mod:`fedimg.compose`; the result is a
:class:`FedimgConfig`, checked once by :func:`validate` before any data is
loaded or any Ray worker is started. Field names are snake_case; kebab-case keys
exist only inside Flower records (see :mod:`fedimg.federation.records`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from fedimg.errors import ConfigError


@dataclass
class SyntheticConfig:
    """Shape of generated images (``dataset=synthetic`` or the offline fallback)."""

    num_classes: int = 4
    train_size: int = 512
    test_size: int = 128
    image_size: int = 32
    channels: int = 3


@dataclass
class DataConfig:
    """Where the images come from and how they are split across clients."""

    dataset: str = "pneumoniamnist"
    source: str = "auto"  # auto: real, else synthetic with a warning | strict | synthetic
    root: Optional[str] = None  # else $FEDIMG_DATA, else ~/.cache/fedimg
    download: bool = True
    partitioner: str = "dirichlet"  # iid | dirichlet | quantity | shards | natural
    alpha: float = 0.5  # Dirichlet concentration of the label skew
    quantity_skew: float = 0.0  # sigma of log-normal client sizes; 0 = equal sizes
    classes_per_client: int = 2  # shards (pathological) partitioner
    natural_column: str = "site"  # metadata column for natural partitions
    val_fraction: float = 0.1  # each client's local validation split
    min_partition_size: int = 16
    image_size: int = 64  # input resolution of the model
    augment: str = "light"  # none | light | strong
    max_train_samples: Optional[int] = None  # subsample the pooled train split
    max_test_samples: Optional[int] = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TransferConfig:
    """Which parameters of the pretrained network are fine-tuned."""

    mode: str = "full"  # full | head | last_k
    last_k: int = 2  # feature blocks trained in last_k mode (plus the head)
    bn: str = "train"  # train: BatchNorm statistics update | frozen: FrozenBatchNorm2d


@dataclass
class TrainConfig:
    """Local training at each client (plain PyTorch)."""

    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "constant"  # constant | cosine | step (over rounds)
    class_weighting: str = "none"  # none | balanced (inverse local class frequency)
    local_epochs: int = 1
    local_steps: Optional[int] = None  # if set, overrides local_epochs
    batch_size: int = 32
    eval_batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision, CUDA only
    channels_last: bool = True  # CUDA only
    num_threads: int = 0  # torch intra-op threads per client; 0 = cpus per client


@dataclass
class FederationConfig:
    """Server-side settings: sampling, strategy hyper-parameters, evaluation."""

    fraction_train: float = 1.0
    min_train_clients: int = 2
    fraction_evaluate: float = 1.0
    min_evaluate_clients: int = 2
    central_eval: bool = True
    proximal_mu: float = 0.01  # FedProx (Li et al. 2020)
    server_lr: Optional[float] = None  # FedAvgM / FedAdam / FedYogi; None = per-strategy default
    server_momentum: float = 0.9  # FedAvgM
    beta_1: float = 0.9  # FedAdam / FedYogi
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2  # FedTrimmedAvg: fraction cut at each end
    num_malicious: int = 0  # Krum: assumed Byzantine clients
    timeout_s: float = 3600.0  # how long the server waits for replies
    connect_timeout_s: float = 300.0  # how long it waits for all clients to connect


@dataclass
class SimConfig:
    """Flower simulation engine (Ray backend) resources."""

    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    ray_address: Optional[str] = None  # join an existing cluster ("auto" or host:port)
    ray_num_cpus: Optional[int] = None  # CPUs Ray may use when it starts locally
    ray_num_gpus: Optional[int] = None


@dataclass
class OutputConfig:
    """What a run writes into its run directory."""

    run_dir: Optional[str] = None  # set from hydra.run.dir; default runs/<name>/<time>
    checkpoints: bool = True
    select_metric: str = "val/balanced_accuracy"  # picks best.pt; never a test/ metric
    plots: bool = True
    progress: bool = True


@dataclass
class PrivacyConfig:
    """Differential privacy: sample-level DP-SGD at clients, or client-level DP at the server.

    ``privacy=dp_sgd`` / ``privacy=client_dp`` on the command line also apply the
    presets in ``scenarios/privacy/`` (e.g. frozen BatchNorm for DP-SGD).
    """

    mode: str = "none"  # none | dp_sgd (Opacus, per client) | client_dp (server-side)
    target_epsilon: float = 8.0  # per client (dp_sgd) or for the federation (client_dp)
    target_delta: Optional[float] = None  # None: 0.1/N for N samples (dp_sgd) / N clients
    client_epsilons: Optional[list[float]] = None  # dp_sgd: one budget per client
    noise_multiplier: Optional[float] = None  # sigma; None: calibrated once from the budget
    max_grad_norm: float = 1.0  # dp_sgd: per-sample clipping norm C
    accountant: str = "prv"  # prv | rdp; the other one is reported as a cross-check
    poisson: bool = True  # dp_sgd: Poisson batches (false: shuffled, epsilon approximate)
    physical_batch_size: Optional[int] = None  # dp_sgd: None = train.batch_size
    grad_sample_mode: str = "auto"  # auto (per model) | hooks | functorch
    count_noise: float = 10.0  # dp_sgd: Gaussian noise on the label counts behind class weights
    seeded_noise: bool = False  # true: noise/sampling from the run seed (tests only: insecure)
    clipping: str = "fixed"  # client_dp: fixed | adaptive (Andrew et al. 2021)
    clipping_norm: float = 1.0  # client_dp: clip of each update's L2 norm (initial if adaptive)
    target_clipped_quantile: float = 0.5  # client_dp adaptive
    clip_norm_lr: float = 0.2  # client_dp adaptive
    clipped_count_stddev: Optional[float] = None  # client_dp adaptive; None = clients / 20


@dataclass
class FedimgConfig:
    """A whole fedimg run."""

    name: str = "custom"
    description: str = ""
    seed: int = 0
    rounds: int = 10
    clients: int = 5
    model: str = "efficientnet_lite0"
    weights: str = "pretrained"  # pretrained | none | path to a state dict
    strategy: str = "fedavg"
    data: DataConfig = field(default_factory=DataConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fl: FederationConfig = field(default_factory=FederationConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (JSON/YAML serialisable)."""
    return dataclasses.asdict(cfg)


def to_json(cfg: FedimgConfig) -> str:
    """Canonical JSON of a config: sorted keys, so equal configs give equal text."""
    return json.dumps(to_dict(cfg), sort_keys=True)


def _section_from_dict(cls: type, values: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{key}' in {cls.__name__}")
        default = hints[key].default_factory  # type: ignore[misc]
        if isinstance(value, dict) and default is not dataclasses.MISSING:
            value = _section_from_dict(type(default()), value)
        kwargs[key] = value
    return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> FedimgConfig:
    """Inverse of :func:`to_dict` (used by clients that receive the config as JSON)."""
    return _section_from_dict(FedimgConfig, values)


def from_json(text: str) -> FedimgConfig:
    """Inverse of :func:`to_json`."""
    return from_dict(json.loads(text))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_fraction(name: str, value: float, *, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    _check(low_ok and value <= 1, f"{name}={value} is impossible: it must be in "
           f"{'[0, 1]' if allow_zero else '(0, 1]'}")


def _validate_data(d: DataConfig) -> None:
    _check(d.alpha > 0, f"data.alpha={d.alpha} is impossible: the Dirichlet "
           "concentration must be > 0 (small = more skew, e.g. 0.1; large = near iid)")
    _check(d.quantity_skew >= 0, f"data.quantity_skew={d.quantity_skew} must be >= 0")
    _check(d.classes_per_client >= 1, "data.classes_per_client must be >= 1")
    _check(0 <= d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    _check(d.min_partition_size >= 2, f"data.min_partition_size={d.min_partition_size} "
           "must be >= 2 (BatchNorm cannot train on a single sample)")
    _check(8 <= d.image_size <= 1024, f"data.image_size={d.image_size} must be in [8, 1024]")
    _check(d.source in ("auto", "strict", "synthetic"), f"data.source='{d.source}' is "
           "unknown; valid: auto, strict, synthetic")
    for name in ("max_train_samples", "max_test_samples"):
        value = getattr(d, name)
        _check(value is None or value >= 1, f"data.{name}={value} must be >= 1 or null")
    s = d.synthetic
    _check(s.num_classes >= 2 and s.train_size >= 1 and s.test_size >= 1,
           "data.synthetic needs num_classes >= 2 and positive sizes")
    _check(s.channels in (1, 3), f"data.synthetic.channels={s.channels} must be 1 or 3")


def _validate_training(cfg: FedimgConfig) -> None:
    t = cfg.train
    _check(cfg.transfer.mode in ("full", "head", "last_k"), f"transfer.mode="
           f"'{cfg.transfer.mode}' is unknown; valid: full, head, last_k")
    _check(cfg.transfer.last_k >= 1, "transfer.last_k must be >= 1")
    _check(cfg.transfer.bn in ("train", "frozen"), f"transfer.bn='{cfg.transfer.bn}' "
           "is unknown; valid: train, frozen")
    _check(t.lr > 0, f"train.lr={t.lr} must be > 0")
    _check(t.class_weighting in ("none", "balanced"), f"train.class_weighting="
           f"'{t.class_weighting}' is unknown; valid: none, balanced")
    _check(0 <= t.momentum < 1, f"train.momentum={t.momentum} must be in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay must be >= 0")
    _check(t.local_epochs >= 1, f"train.local_epochs={t.local_epochs} must be >= 1")
    _check(t.local_steps is None or t.local_steps >= 1, "train.local_steps must be >= 1")
    _check(t.batch_size >= 1 and t.eval_batch_size >= 1, "batch sizes must be >= 1")
    _check(t.num_threads >= 0, "train.num_threads must be >= 0")
    _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
           f"train.device='{t.device}' is unknown; valid: auto, cpu, cuda, cuda:N")


def _validate_federation(cfg: FedimgConfig) -> None:
    fl, sim = cfg.fl, cfg.sim
    _check_fraction("fl.fraction_train", fl.fraction_train)
    _check_fraction("fl.fraction_evaluate", fl.fraction_evaluate, allow_zero=True)
    _check(1 <= fl.min_train_clients <= cfg.clients, f"fl.min_train_clients="
           f"{fl.min_train_clients} must be between 1 and clients={cfg.clients}")
    _check(0 <= fl.min_evaluate_clients <= cfg.clients, f"fl.min_evaluate_clients="
           f"{fl.min_evaluate_clients} must be between 0 and clients={cfg.clients}")
    _check(fl.proximal_mu >= 0, "fl.proximal_mu must be >= 0")
    _check(fl.server_lr is None or fl.server_lr > 0, "fl.server_lr must be > 0 or null")
    _check(fl.tau > 0, f"fl.tau={fl.tau} must be > 0")
    _check(0 <= fl.beta_1 < 1 and 0 <= fl.beta_2 < 1, "fl.beta_1 and fl.beta_2 must be in [0, 1)")
    _check(0 <= fl.trim_beta < 0.5, f"fl.trim_beta={fl.trim_beta} must be in [0, 0.5)")
    _check(fl.num_malicious >= 0, "fl.num_malicious must be >= 0")
    _check(fl.timeout_s > 0 and fl.connect_timeout_s > 0,
           "fl.timeout_s and fl.connect_timeout_s must be > 0")
    _check(sim.num_cpus_per_client > 0, f"sim.num_cpus_per_client="
           f"{sim.num_cpus_per_client} must be > 0")
    gpus = sim.num_gpus_per_client
    _check(gpus >= 0 and (gpus <= 1 or float(gpus).is_integer()),
           f"sim.num_gpus_per_client={gpus} must be a fraction in [0, 1] or a whole "
           "number of GPUs")
    device = cfg.train.device
    _check(not (device.startswith("cuda") and gpus == 0), f"train.device={device} "
           "but sim.num_gpus_per_client=0: Ray hides GPUs from clients given none; set "
           "sim.num_gpus_per_client (e.g. 0.25 = four clients per GPU) or train.device=auto")
    for name in ("ray_num_cpus", "ray_num_gpus"):
        value = getattr(sim, name)
        _check(value is None or value >= (1 if name == "ray_num_cpus" else 0),
               f"sim.{name}={value} is impossible")


def _validate_privacy(cfg: FedimgConfig) -> None:
    from fedimg.privacy import PRIVACY_MODES  # light: the registry only

    p, private = cfg.privacy, cfg.privacy.mode != "none"
    PRIVACY_MODES.get(p.mode)  # an unknown mode is reported before its requirements
    _check(p.target_epsilon > 0, f"privacy.target_epsilon={p.target_epsilon} must be > 0 "
           "(for no privacy use privacy=none)")
    _check(p.target_delta is None or 0 < p.target_delta < 1,
           f"privacy.target_delta={p.target_delta} must be in (0, 1)")
    _check(p.noise_multiplier is None or p.noise_multiplier > 0,
           f"privacy.noise_multiplier={p.noise_multiplier} must be > 0 or null")
    _check(p.max_grad_norm > 0 and p.clipping_norm > 0,
           "privacy.max_grad_norm and privacy.clipping_norm must be > 0")
    _check(p.accountant in ("prv", "rdp"), f"privacy.accountant='{p.accountant}' is "
           "unknown; valid: prv, rdp")
    _check(p.grad_sample_mode in ("auto", "hooks", "functorch"),
           f"privacy.grad_sample_mode='{p.grad_sample_mode}' is unknown; valid: auto, "
           "hooks, functorch")
    _check(p.count_noise > 0, f"privacy.count_noise={p.count_noise} must be > 0")
    _check(p.physical_batch_size is None or p.physical_batch_size >= 1,
           "privacy.physical_batch_size must be >= 1 or null")
    _check(p.clipping in ("fixed", "adaptive"), f"privacy.clipping='{p.clipping}' is "
           "unknown; valid: fixed, adaptive")
    _check(0 < p.target_clipped_quantile < 1, "privacy.target_clipped_quantile must be in (0, 1)")
    budgets = p.client_epsilons
    _check(budgets is None or (len(budgets) == cfg.clients and min(budgets) > 0),
           f"privacy.client_epsilons needs {cfg.clients} positive values (one per client)")
    _check(not private or cfg.transfer.bn == "frozen", f"privacy.mode={p.mode} needs "
           "transfer.bn=frozen (the privacy= presets set it): BatchNorm statistics computed "
           "on private data are not covered by the clipping bound, in train mode they mix "
           "the samples of a batch, and noise can make a running variance negative; "
           "GroupNorm instead would lose the pretrained features")
    if p.mode == "dp_sgd":
        _check(cfg.strategy != "fedprox", "strategy=fedprox with privacy.mode=dp_sgd is "
               "not supported: Opacus replaces the gradient by the noisy per-sample sum, "
               "which drops the proximal term; use fedavg")


def _validate_values(cfg: FedimgConfig) -> None:
    """Range checks that need no registry."""
    _check(cfg.output.select_metric.startswith(("val/", "train/")),
           f"output.select_metric='{cfg.output.select_metric}' must be a val/ or train/ "
           "metric (e.g. val/balanced_accuracy): the test split must not select models")
    _check(cfg.rounds >= 1, f"rounds={cfg.rounds} is impossible: run at least 1 round")
    _check(cfg.clients >= 1, f"clients={cfg.clients} is impossible: need at least 1 client")
    _validate_data(cfg.data)
    _validate_training(cfg)
    _validate_federation(cfg)
    _validate_privacy(cfg)


def _validate_names(cfg: FedimgConfig) -> None:
    """Every name-valued field must be a key of its registry."""
    # Imported here: the registries pull in torch/torchvision/flwr, and this module
    # must stay importable for tools that only read configs.
    from fedimg.data import AUGMENTATIONS, DATASETS, PARTITIONERS
    from fedimg.federation.strategies import STRATEGIES
    from fedimg.models import MODELS
    from fedimg.privacy import PRIVACY_MODES
    from fedimg.training import OPTIMIZERS, SCHEDULES

    for registry, value in (
        (MODELS, cfg.model),
        (STRATEGIES, cfg.strategy),
        (DATASETS, cfg.data.dataset),
        (PARTITIONERS, cfg.data.partitioner),
        (AUGMENTATIONS, cfg.data.augment),
        (OPTIMIZERS, cfg.train.optimizer),
        (SCHEDULES, cfg.train.schedule),
        (PRIVACY_MODES, cfg.privacy.mode),
    ):
        registry.get(value)


def validate(cfg: FedimgConfig) -> FedimgConfig:
    """Check every value and name of ``cfg``; raise ConfigError on the first problem.

    This runs once, before any data is read or any worker is started. Checks that
    need the data (more clients than samples, a partition below the minimum size)
    run when the partitions are built, which is still before round 1.
    """
    _validate_values(cfg)
    _validate_names(cfg)
    return cfg
