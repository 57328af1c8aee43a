"""The typed config schema of fedimg: frozen dataclasses, enums for the closed sets.

Scenario files in ``scenarios/`` and command-line overrides (Hydra ``key=value``)
are merged onto these dataclasses by :mod:`fedimg.config.compose`; the result is a
:class:`FedimgConfig`, checked once by :func:`fedimg.config.validate` before any data is
loaded or any Ray worker is started. Every dataclass is frozen: a changed config is a
new one (``dataclasses.replace``). A field with a closed set of values has a
:class:`~fedimg.config.choices.Choice` enum type; :mod:`fedimg.config.codec` turns a
config into plain dicts and JSON, and back. Field names are snake_case; kebab-case keys exist only inside Flower records
(see :mod:`fedimg.transport.records`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fedimg.config.choices import (
    Accountant,
    AttackKind,
    Augment,
    BatchNorm,
    ClassWeighting,
    Clipping,
    Clock,
    Compression,
    DataSource,
    FeatureCache,
    GradSampleMode,
    HeadInit,
    LocalBudget,
    OnCorrupt,
    OnTooFew,
    Optimizer,
    Partitioner,
    Personal,
    PrivacyKind,
    Schedule,
    SecureAggregation,
    TransferMode,
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of generated images (``dataset=synthetic`` or the offline fallback)."""

    num_classes: int = 4
    train_size: int = 512
    test_size: int = 128
    image_size: int = 32
    channels: int = 3


PATH_DATASETS = ("folder", "manifest", "npz")  # data.dataset values read from data.path


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split across clients.

    ``dataset`` is a built-in name (its files under ``root``) or one of
    :data:`PATH_DATASETS`, read from ``path``: an image folder, a CSV manifest or a
    MedMNIST-style ``.npz`` (see :mod:`fedimg.data.path_sets`). Without a test
    split, ``test_fraction`` of it is carved off (stratified, seeded; whole groups
    of ``group_column`` when set).
    """

    dataset: str = "pneumoniamnist"
    source: DataSource = DataSource.auto  # auto: real, else synthetic with a warning
    root: Optional[str] = None  # else $FEDIMG_DATA, else ~/.cache/fedimg
    path: Optional[str] = None  # folder / manifest / npz datasets only
    test_fraction: float = 0.2  # carved test split of a path dataset without one
    group_column: Optional[str] = None  # carve whole groups (e.g. patient) into test
    download: bool = True
    partitioner: Partitioner = Partitioner.dirichlet
    alpha: float = 0.5  # Dirichlet concentration of the label skew
    quantity_skew: float = 0.0  # sigma of log-normal client sizes; 0 = equal sizes
    classes_per_client: int = 2  # shards (pathological) partitioner
    natural_column: str = "site"  # metadata column for natural partitions
    natural_split: bool = False  # natural, more clients than groups: cut groups into runs
    site_column: Optional[str] = "site"  # test metrics per value: test/site/<value>/...
    classes: Optional[list[str]] = None  # deployed folder/manifest/npz/hf: the class names
    val_fraction: float = 0.1  # each client's local validation split
    min_partition_size: int = 16
    image_size: int = 64  # input resolution of the model
    augment: Augment = Augment.light
    max_train_samples: Optional[int] = None  # subsample the pooled train split
    max_test_samples: Optional[int] = None
    on_corrupt: OnCorrupt = OnCorrupt.refuse  # unreadable image files
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class TransferConfig:
    """Which parameters of the pretrained network are fine-tuned."""

    mode: TransferMode = TransferMode.full
    last_k: int = 2  # feature blocks trained in last_k mode (plus the head)
    bn: BatchNorm = BatchNorm.train  # frozen: FrozenBatchNorm2d
    # false: the head stays as the server set it (FedBABU, Oh et al. 2022; with
    # fl.head_init=ridge, the clients' closed-form head), only the blocks train
    train_head: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each client (plain PyTorch)."""

    optimizer: Optimizer = Optimizer.sgd
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Schedule = Schedule.constant  # over rounds
    warmup_rounds: int = 0  # linear lr warm-up over the first k rounds, then the schedule
    class_weighting: ClassWeighting = ClassWeighting.none
    restricted_softmax: float = 1.0  # FedRS alpha for locally absent classes' logits; 1 = off
    calibration_tau: float = 0.0  # FedLC tau: logits - tau * n_c^(-1/4), absent out; 0 = off
    # Steps of a client's round (fedimg.training.budget): epochs = local_epochs passes, or
    # local_steps if set; steps = local_steps each; steps_per_sample = ceil(s x n_i)
    local_budget: LocalBudget = LocalBudget.epochs
    local_epochs: int = 1
    local_steps: Optional[int] = None  # if set, overrides local_epochs
    steps_per_sample: Optional[float] = None  # local_budget=steps_per_sample: steps per sample
    batch_size: int = 32
    eval_batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision, CUDA only
    channels_last: bool = True  # CUDA only
    num_threads: int = 0  # torch intra-op threads per client; 0 = cpus per client
    # Frozen-trunk feature cache (transfer.mode=head|last_k; fedimg.training.feature_cache):
    # auto = evaluation, and training where exact (augment=none, trunk the same in train
    # mode); on = also training from a bank of views / the trunk's eval-mode output
    feature_cache: FeatureCache = FeatureCache.auto
    feature_cache_gb: float = 1.0  # RAM per worker for cached features (more spills); 0 = off
    feature_cache_views: int = 4  # augmented views kept per image (feature_cache=on)


@dataclass(frozen=True)
class FederationConfig:
    """Server-side settings: sampling, strategy hyper-parameters, evaluation."""

    fraction_train: float = 1.0
    min_train_clients: int = 2
    fraction_evaluate: float = 1.0
    min_evaluate_clients: int = 2
    central_eval: bool = True
    proximal_mu: float = 0.01  # FedProx (Li et al. 2020)
    feddyn_alpha: float = 0.01  # FedDyn (Acar et al. 2021): the dynamic regulariser's weight
    server_lr: Optional[float] = None  # FedAvgM / FedAdam / FedYogi; None = per-strategy default
    server_momentum: float = 0.9  # FedAvgM
    beta_1: float = 0.9  # FedAdam / FedYogi
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2  # FedTrimmedAvg: fraction cut at each end
    num_malicious: int = 0  # Krum / MultiKrum: assumed Byzantine clients
    krum_select: Optional[int] = None  # MultiKrum: updates averaged; None = sampled - f
    timeout_s: float = 3600.0  # how long the server waits for replies
    connect_timeout_s: float = 300.0  # how long it waits for all clients to connect
    # Update validation (besides NaN/Inf, keys, shapes, dtypes, which are always checked)
    max_update_norm: Optional[float] = None  # reject ||w_i - w_global||_2 above this
    norm_outlier_factor: float = 100.0  # reject norms > factor x the round's median; 0 = off
    max_reply_mb: Optional[float] = None  # refuse bigger replies undecoded; None = 4x the model + 1
    # Rounds with too few usable updates (failed, rejected, timed out)
    min_replies: int = 1  # usable training updates a round needs to be aggregated
    on_too_few: OnTooFew = OnTooFew.retry
    round_retries: int = 2  # re-samples of a short round before it is skipped
    max_skipped_rounds: int = 3  # this many skipped rounds in a row end the run
    pack_arrays: bool = True  # model arrays travel as one buffer (fedimg.transport.packing)
    elide_frozen: bool = True  # frozen arrays stay home, named by digest (transport.elision)
    local_bn: bool = False  # FedBN (Li et al. 2021): each client keeps its own BatchNorm
    personalize_steps: int = 0  # >0: clients also report val accuracy after k local steps
    secure_aggregation: SecureAggregation = SecureAggregation.none  # secaggplus: sum only
    # Personalised FL (fedimg.clientapp.personal): what each client keeps in its own state
    personal: Personal = Personal.none  # fedper | fedrep: its head; ditto: a whole model
    fedrep_head_steps: int = 0  # FedRep's head phase, body frozen; 0 = the round's steps
    ditto_lambda: float = 0.1  # Ditto's pull lambda/2 ||v - w||^2 towards the global model
    # Before round 1 (fedimg.serverapp.head_init): ridge = the head that every client's
    # feature statistics give in closed form (Fed3R), the same as pooled data would
    head_init: HeadInit = HeadInit.none
    ridge_lambda: float = 0.1  # ridge penalty, relative to the Gram matrix' mean diagonal


@dataclass(frozen=True)
class SimConfig:
    """Flower simulation engine (Ray backend) resources."""

    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    ray_address: Optional[str] = None  # join an existing cluster ("auto" or host:port)
    ray_num_cpus: Optional[int] = None  # CPUs Ray may use when it starts locally
    ray_num_gpus: Optional[int] = None
    max_worker_restarts: int = -1  # Ray restarts a dead worker actor; -1 = always, 0 = never
    # Training clients per message (fedimg.serverapp.cohorts): 1 = one each (off); k > 1
    # sends up to k sampled clients to one node, which trains them together (and asks
    # up to k clients for the ridge head's sums in one message: fl.head_init=ridge)
    cohort_size: int = 1


@dataclass(frozen=True)
class AttackConfig:
    """Simulated Byzantine clients, to measure robustness; off unless byzantine_fraction > 0.

    The malicious clients are a fixed, seeded choice of round(fraction x clients).
    ``sign_flip`` sends w_g - scale * (w_i - w_g) (Li et al. 2019, RSA, use scale 4);
    ``scale`` sends w_g + scale * (w_i - w_g) (a model-replacement style boost);
    ``label_flip`` trains honestly on labels y -> C - 1 - y (Biggio et al. 2012).
    """

    byzantine_fraction: float = 0.0
    kind: AttackKind = AttackKind.sign_flip
    scale: float = 4.0


@dataclass(frozen=True)
class FaultsConfig:
    """Injected client faults, to test fault tolerance (chaos testing); off by default.

    Each entry is a ``[round, client]`` pair: in that training round that client
    raises an exception (``raise_at``) or its worker process kills itself with
    SIGKILL, as the OOM killer would (``kill_at``).
    """

    raise_at: list[list[int]] = field(default_factory=list)
    kill_at: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class HeterogeneityConfig:
    """Simulated device and network heterogeneity of the clients (:mod:`fedimg.simulation.fleet`).

    Off by default. Each draw is seeded by (run seed, round, client), so a run repeats.
    ``availability``: probability that a sampled client is online in a training round;
    ``dropout``: probability that an online client dies part-way through its local
    steps (it trains them, then sends nothing); ``speed_sigma``: each client's fixed
    speed factor (how many times slower than this host it computes) is
    LogNormal(0, sigma), or ``speed_factors`` lists them; ``uplink_mbps`` /
    ``downlink_mbps`` add the transfer time of the bytes on the wire; ``deadline_s``:
    training replies arriving later are not aggregated (stragglers). ``clock``:
    ``simulated`` scales the measured compute by the speed factor and judges the
    deadline on that time; ``real`` makes a slow client sleep the difference and the
    server stop waiting at the deadline. ``step_s``: a device's seconds per local step
    at speed 1, so that device time (and who is late) does not depend on this host's
    load; None uses the measured compute time (not reproducible).
    """

    availability: float = 1.0
    dropout: float = 0.0
    speed_sigma: float = 0.0
    speed_factors: Optional[list[float]] = None  # one per client; overrides speed_sigma
    uplink_mbps: Optional[float] = None
    downlink_mbps: Optional[float] = None
    deadline_s: Optional[float] = None
    clock: Clock = Clock.simulated
    step_s: Optional[float] = None  # device seconds per local step at speed 1; None: measured


@dataclass(frozen=True)
class CompressionConfig:
    """Compression of client updates on the uplink (see :mod:`fedimg.transport.codecs`)."""

    kind: Compression = Compression.none
    topk_fraction: float = 0.01  # topk: share of each tensor's entries sent
    error_feedback: bool = True  # carry what was not sent into the next round


@dataclass(frozen=True)
class OutputConfig:
    """What a run writes into its run directory."""

    run_dir: Optional[str] = None  # set from hydra.run.dir; default runs/<name>/<time>
    checkpoints: bool = True  # best.pt, final.pt, and last.pt (resume state) every round
    select_metric: str = "val/balanced_accuracy"  # picks best.pt; never a test/ metric
    plots: bool = True
    progress: bool = True
    tensorboard: bool = True  # the run directory is also a TensorBoard log directory
    mlflow: bool = False  # also log to MLflow (pip install -e ".[mlflow]")
    mlflow_uri: Optional[str] = None  # tracking URI; None: sqlite beside the run folders


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy: sample-level DP-SGD at clients, or client-level DP at the server.

    ``privacy=dp_sgd`` / ``privacy=client_dp`` on the command line also apply the
    presets in ``scenarios/privacy/`` (e.g. frozen BatchNorm for DP-SGD).
    """

    mode: PrivacyKind = PrivacyKind.none  # dp_sgd: Opacus, per client; client_dp: server
    target_epsilon: float = 8.0  # per client (dp_sgd) or for the federation (client_dp)
    target_delta: Optional[float] = None  # None: 0.1/N for N samples (dp_sgd) / N clients
    client_epsilons: Optional[list[float]] = None  # dp_sgd: one budget per simulated client
    site_epsilons: dict[str, float] = field(default_factory=dict)  # dp_sgd, deployed: per site name
    noise_multiplier: Optional[float] = None  # sigma; None: calibrated once from the budget
    max_grad_norm: float = 1.0  # dp_sgd: per-sample clipping norm C
    accountant: Accountant = Accountant.prv  # the other one is reported as a cross-check
    poisson: bool = True  # dp_sgd: Poisson batches (false: shuffled, epsilon approximate)
    physical_batch_size: Optional[int] = None  # dp_sgd: None = train.batch_size
    grad_sample_mode: GradSampleMode = GradSampleMode.auto  # auto: per model; or ghost_mixed
    count_noise: float = 10.0  # dp_sgd: Gaussian noise on the label counts behind class weights
    seeded_noise: bool = False  # true: noise/sampling from the run seed (tests only: insecure)
    secure_noise: bool = False  # dp_sgd: noise and batches from ChaCha20 (a CSPRNG), not torch
    clipping: Clipping = Clipping.fixed  # client_dp; adaptive: Andrew et al. 2021
    clipping_norm: float = 1.0  # client_dp: clip of each update's L2 norm (initial if adaptive)
    target_clipped_quantile: float = 0.5  # client_dp adaptive
    clip_norm_lr: float = 0.2  # client_dp adaptive
    clipped_count_stddev: Optional[float] = None  # client_dp adaptive; None = clients / 20
    dropout_tolerance: float = 0.2  # distributed_dp: sampled clients that may drop or collude


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ settings (``fl.secure_aggregation=secaggplus``; fedimg.privacy.secagg)."""

    shares: Optional[int] = None  # neighbourhood size; None: every sampled client up to 21
    threshold: float = 0.6  # shares that rebuild a secret, fraction of a neighbourhood (> 0.5)
    modulus_bits: int = 32  # sums mod 2^bits: 4 bytes a coordinate, as float32
    clip_range: float = 8.0  # |coordinate| of a weighted update kept (counted when clipped)
    timeout_s: float = 120.0  # wait for a key stage's replies (milliseconds of work each)


@dataclass(frozen=True)
class DeployConfig:
    """A real federation (``fedimg-server run``): the data stays at the sites.

    Each SuperNode reads its own images from the ``data-path`` of its node config;
    the server loads no training data and learns each site's size from the site.
    ``clients`` is the number of sites the run waits for. Central evaluation then
    needs the dataset's test split on the server (``data.root``), or
    ``fl.central_eval=false``.
    """

    enabled: bool = False


@dataclass(frozen=True)
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
    attack: AttackConfig = field(default_factory=AttackConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    hetero: HeterogeneityConfig = field(default_factory=HeterogeneityConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)


@dataclass(frozen=True)
class SearchConfig:
    """A comparison grid's recipe search: ``compare.lr=[...]`` etc. (fedimg.compare.search).

    Not part of a run's config: the grid (``python -m fedimg.compare``) reads it and
    sets the chosen ``train.lr``, ``train.local_steps``, ``fl.server_lr`` and
    ``fl.ridge_lambda`` on its runs.
    Empty axes search nothing. Each strategy's point is chosen on the mean over
    ``search_seeds`` of the final round's federated validation metric, never on test.
    """

    lr: list[float] = field(default_factory=list)  # train.lr values; [] = not searched
    local_steps: list[int] = field(default_factory=list)  # train.local_steps values
    server_lr: list[float] = field(default_factory=list)  # fl.server_lr: strategies reading it
    ridge_lambda: list[float] = field(default_factory=list)  # fl.ridge_lambda (head_init=ridge)
    search_seeds: list[int] = field(default_factory=lambda: [0])  # seeds the search runs on
    select_metric: Optional[str] = None  # a val/ metric; None = output.select_metric
