"""Validation of a :class:`~fedimg.config.schema.FedimgConfig`, and decoding that validates.

:func:`validate` checks every value that needs no registry: each closed-set field
holds a member of its enum, each number is in range, and combinations that the
schema alone can judge are refused. It imports nothing beyond the standard library
and :mod:`fedimg.errors`. Names of open sets (model, strategy, dataset) and the
combinations that depend on a registry entry's facts are checked by
:func:`fedimg.resolve.check_registries`, the composition root's half.

:func:`from_dict` / :func:`from_json` decode *and* validate: a client or a resume
never holds an unvalidated config.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from fedimg.config.choices import Choice
from fedimg.config.head_checks import validate_class_weighting, validate_head_init
from fedimg.config.personal_checks import validate_personal
from fedimg.config.rules import check as _check
from fedimg.config.sim_checks import validate_sim
from fedimg.config.codec import decode, field_types
from fedimg.config.schema import PATH_DATASETS, DataConfig, FedimgConfig, SearchConfig
from fedimg.errors import ConfigError


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
    for name in ("max_train_samples", "max_test_samples"):
        value = getattr(d, name)
        _check(value is None or value >= 1, f"data.{name}={value} must be >= 1 or null")
    s = d.synthetic
    _check(s.num_classes >= 2 and s.train_size >= 1 and s.test_size >= 1,
           "data.synthetic needs num_classes >= 2 and positive sizes")
    _check(s.channels in (1, 3), f"data.synthetic.channels={s.channels} must be 1 or 3")
    _validate_data_path(d)


_PATH_HINTS = {"folder": "DIR (split/class/image or class/image)",
               "manifest": "FILE.csv (columns path,label[,split,site,...])",
               "npz": "FILE.npz (train_images, train_labels[, val_*, test_*])"}


def _validate_data_path(d: DataConfig) -> None:
    """``data.path`` goes with exactly the path datasets; carving fractions in range."""
    kinds = ", ".join(PATH_DATASETS)
    if d.dataset in PATH_DATASETS:
        _check(bool(d.path), f"data.dataset={d.dataset} reads its images from data.path, "
               f"which is not set. Fix: add data.path={_PATH_HINTS[d.dataset]}")
    elif d.dataset.startswith("hf:") or d.dataset == "hf":
        _check(len(d.dataset) > 3 and d.path is None, f"data.dataset={d.dataset} names a "
               "Hugging Face dataset after 'hf:' and reads no data.path. Fix: e.g. "
               "data.dataset=hf:uoft-cs/cifar10 or hf:/path/saved_with_save_to_disk")
    else:
        _check(d.path is None, f"data.path={d.path} is read only by data.dataset={kinds}; "
               f"data.dataset={d.dataset} is a built-in set (found under data.root). Fix: "
               f"drop data.path, or set data.dataset to one of {kinds}")
    _check(0 < d.test_fraction < 1, f"data.test_fraction={d.test_fraction} must be in (0, 1)"
           ": the share of a path dataset without a test split carved off as one (e.g. 0.2)")
    for key, value in (("group_column", d.group_column), ("site_column", d.site_column)):
        _check(value is None or bool(value.strip()),
               f"data.{key}='{value}' must be a metadata column name or null")


def _validate_training(cfg: FedimgConfig) -> None:
    t = cfg.train
    _check(cfg.transfer.last_k >= 1, "transfer.last_k must be >= 1")
    _check(t.lr > 0, f"train.lr={t.lr} must be > 0")
    _check(0 <= t.restricted_softmax <= 1, f"train.restricted_softmax="
           f"{t.restricted_softmax} must be in [0, 1] (1 = off)")
    _check(t.restricted_softmax == 1 or cfg.privacy.mode != "dp_sgd",
           "train.restricted_softmax < 1 with privacy.mode=dp_sgd: the mask of locally "
           "present classes comes from the private labels. Fix: drop one of them")
    _check(t.calibration_tau >= 0, f"train.calibration_tau={t.calibration_tau} must be "
           ">= 0 (0 = off; FedLC's paper uses 0.01 to 1)")
    _check(t.calibration_tau == 0 or cfg.privacy.mode != "dp_sgd",
           "train.calibration_tau > 0 with privacy.mode=dp_sgd: the calibration comes from "
           "the private label counts. Fix: drop one of them")
    _check(0 <= t.momentum < 1, f"train.momentum={t.momentum} must be in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay must be >= 0")
    _check(t.local_epochs >= 1, f"train.local_epochs={t.local_epochs} must be >= 1")
    _check(t.local_steps is None or t.local_steps >= 1, "train.local_steps must be >= 1")
    _validate_budget(cfg)
    for name in ("batch_size", "eval_batch_size"):
        value = getattr(t, name)
        _check(value >= 1, f"train.{name}={value} must be >= 1")
    _check(t.num_threads >= 0, "train.num_threads must be >= 0")
    _validate_feature_cache(cfg)
    _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
           f"train.device='{t.device}' is unknown; valid: auto, cpu, cuda, cuda:N")


def _validate_budget(cfg: FedimgConfig) -> None:
    """``train.local_budget`` with the fields it reads (fedimg.training.budget), warm-up."""
    t, budget = cfg.train, cfg.train.local_budget
    one_epoch = f"{1 / t.batch_size:g}" if t.batch_size >= 1 else "0.03125"
    _check(budget != "steps" or t.local_steps is not None, "train.local_budget=steps needs "
           "train.local_steps (the steps every client takes); it is unset. Fix: add e.g. "
           "train.local_steps=10, or set train.local_budget=epochs|steps_per_sample")
    _check(budget != "steps_per_sample" or t.steps_per_sample is not None,
           "train.local_budget=steps_per_sample needs train.steps_per_sample (a client takes "
           "ceil(steps_per_sample x its training samples) steps); it is unset. Fix: add e.g. "
           f"train.steps_per_sample={one_epoch} (one epoch at batch {t.batch_size})")
    s = t.steps_per_sample
    _check(s is None or budget == "steps_per_sample", f"train.steps_per_sample={s} is read "
           f"only with train.local_budget=steps_per_sample (now {budget}). Fix: add "
           "train.local_budget=steps_per_sample, or drop train.steps_per_sample")
    _check(s is None or (math.isfinite(s) and s > 0), f"train.steps_per_sample={s} is "
           f"impossible: it must be > 0 (steps per training sample). Fix: e.g. "
           f"train.steps_per_sample={one_epoch} (one epoch at batch {t.batch_size})")
    _check(t.local_steps is None or budget != "steps_per_sample", f"train.local_steps="
           f"{t.local_steps} with train.local_budget=steps_per_sample, which sets each "
           "client's steps from its data. Fix: drop train.local_steps, or set "
           "train.local_budget=steps")
    _check(t.local_epochs == 1 or budget == "epochs", f"train.local_epochs={t.local_epochs} "
           f"is read only with train.local_budget=epochs (now {budget}). Fix: drop "
           "train.local_epochs, or set train.local_budget=epochs")
    hint = min(3, max(0, cfg.rounds - 1))
    _check(t.warmup_rounds == 0 or 0 < t.warmup_rounds < cfg.rounds, f"train.warmup_rounds="
           f"{t.warmup_rounds} is impossible with rounds={cfg.rounds}: valid: 0 (off) to "
           f"{cfg.rounds - 1} (rounds - 1). Fix: e.g. train.warmup_rounds={hint}")


def _validate_feature_cache(cfg: FedimgConfig) -> None:
    """``train.feature_cache*`` (fedimg.training.feature_cache): ranges and combinations."""
    t = cfg.train
    _check(math.isfinite(t.feature_cache_gb) and t.feature_cache_gb >= 0,
           f"train.feature_cache_gb={t.feature_cache_gb} is impossible: it is the RAM (GiB) a "
           "worker may fill with cached trunk features before spilling to disk; valid: >= 0 "
           "(0 = no cache). Fix: e.g. train.feature_cache_gb=1")
    _check(1 <= t.feature_cache_views <= 64, f"train.feature_cache_views="
           f"{t.feature_cache_views} is out of range: the augmented views cached per image; "
           "valid: 1..64. Fix: e.g. train.feature_cache_views=4")
    if t.feature_cache != "on":
        return
    _check(cfg.transfer.mode != "full", "train.feature_cache=on with transfer.mode=full: "
           "every layer trains, so there is no frozen trunk to cache; valid: transfer.mode="
           "head|last_k. Fix: set one of them, or train.feature_cache=auto|off")
    _check(t.feature_cache_gb > 0, "train.feature_cache=on with train.feature_cache_gb=0, "
           "which turns the cache off; valid: a size > 0. Fix: e.g. train.feature_cache_gb=1, "
           "or train.feature_cache=off")


def _validate_federation(cfg: FedimgConfig) -> None:
    fl = cfg.fl
    _check(not fl.local_bn or cfg.transfer.bn == "train",
           "fl.local_bn=true (FedBN) keeps each client's BatchNorm, but transfer.bn=frozen "
           "never changes it. Fix: set transfer.bn=train, or drop fl.local_bn")
    _check_fraction("fl.fraction_train", fl.fraction_train)
    _check_fraction("fl.fraction_evaluate", fl.fraction_evaluate, allow_zero=True)
    _check(1 <= fl.min_train_clients <= cfg.clients, f"fl.min_train_clients="
           f"{fl.min_train_clients} must be between 1 and clients={cfg.clients}")
    _check(0 <= fl.min_evaluate_clients <= cfg.clients, f"fl.min_evaluate_clients="
           f"{fl.min_evaluate_clients} must be between 0 and clients={cfg.clients}")
    _check(fl.proximal_mu >= 0, "fl.proximal_mu must be >= 0")
    _check(fl.feddyn_alpha > 0, f"fl.feddyn_alpha={fl.feddyn_alpha} must be > 0 (FedDyn "
           "divides by it); the paper uses 0.1, 0.01 or 0.001")
    _check(fl.server_lr is None or fl.server_lr > 0, "fl.server_lr must be > 0 or null")
    _check(fl.tau > 0, f"fl.tau={fl.tau} must be > 0")
    _check(0 <= fl.beta_1 < 1 and 0 <= fl.beta_2 < 1, "fl.beta_1 and fl.beta_2 must be in [0, 1)")
    _check(0 <= fl.trim_beta < 0.5, f"fl.trim_beta={fl.trim_beta} must be in [0, 0.5)")
    _check(fl.num_malicious >= 0, "fl.num_malicious must be >= 0")
    _check(fl.timeout_s > 0 and fl.connect_timeout_s > 0,
           "fl.timeout_s and fl.connect_timeout_s must be > 0")
    _check(fl.max_update_norm is None or fl.max_update_norm > 0,
           f"fl.max_update_norm={fl.max_update_norm} must be > 0 or null")
    _check(fl.norm_outlier_factor == 0 or fl.norm_outlier_factor > 1,
           f"fl.norm_outlier_factor={fl.norm_outlier_factor} must be > 1 (or 0 = off)")
    _check(fl.max_reply_mb is None or fl.max_reply_mb > 0,
           f"fl.max_reply_mb={fl.max_reply_mb} must be > 0 or null (4x the model + 1 MB)")
    _check(1 <= fl.min_replies <= cfg.clients, f"fl.min_replies={fl.min_replies} must be "
           f"between 1 and clients={cfg.clients}")
    _check(fl.round_retries >= 0, f"fl.round_retries={fl.round_retries} must be >= 0")
    _check(fl.max_skipped_rounds >= 1, f"fl.max_skipped_rounds={fl.max_skipped_rounds} "
           "must be >= 1")


def _validate_privacy(cfg: FedimgConfig) -> None:
    p, private = cfg.privacy, cfg.privacy.mode != "none"
    _check(p.target_epsilon > 0, f"privacy.target_epsilon={p.target_epsilon} must be > 0 "
           "(for no privacy use privacy=none)")
    _check(p.target_delta is None or 0 < p.target_delta < 1,
           f"privacy.target_delta={p.target_delta} must be in (0, 1)")
    _check(p.noise_multiplier is None or p.noise_multiplier > 0,
           f"privacy.noise_multiplier={p.noise_multiplier} must be > 0 or null")
    _check(p.max_grad_norm > 0 and p.clipping_norm > 0,
           "privacy.max_grad_norm and privacy.clipping_norm must be > 0")
    _check(p.count_noise > 0, f"privacy.count_noise={p.count_noise} must be > 0")
    _check(not (p.secure_noise and p.seeded_noise), "privacy.secure_noise=true with privacy."
           "seeded_noise=true: seeded noise is reproducible from the run seed, which is what "
           "secure noise prevents; set privacy.seeded_noise=false (or secure_noise=false)")
    _check(not p.secure_noise or p.mode == "dp_sgd", f"privacy.secure_noise=true with privacy."
           f"mode={p.mode}: only DP-SGD's noise and batches come from the ChaCha20 stream "
           "(client_dp's noise is drawn by Flower's DP wrapper at the server; none adds no noise); "
           "set privacy=dp_sgd or privacy.secure_noise=false")
    _check(p.physical_batch_size is None or p.physical_batch_size >= 1,
           "privacy.physical_batch_size must be >= 1 or null")
    _check(0 < p.target_clipped_quantile < 1, "privacy.target_clipped_quantile must be in (0, 1)")
    budgets = p.client_epsilons
    _check(budgets is None or (len(budgets) == cfg.clients and min(budgets) > 0),
           f"privacy.client_epsilons needs {cfg.clients} positive values (one per client)")
    _check(budgets is None or not cfg.deploy.enabled, "privacy.client_epsilons numbers "
           "simulated clients; deployed sites are named: use privacy.site_epsilons="
           "{site_a:4,site_b:8}")
    named = p.site_epsilons or {}
    _check(all(math.isfinite(v) and v > 0 for v in named.values()),
           f"privacy.site_epsilons={named} needs positive budgets")
    _check(not named or (cfg.deploy.enabled and p.mode == "dp_sgd"), "privacy.site_epsilons "
           "applies to deployed sites under privacy=dp_sgd; in simulation use "
           "privacy.client_epsilons=[...] (one per client)")
    _check(not private or cfg.transfer.bn == "frozen", f"privacy.mode={p.mode} needs "
           "transfer.bn=frozen (the privacy= presets set it): BatchNorm statistics computed "
           "on private data are not covered by the clipping bound, in train mode they mix "
           "the samples of a batch, and noise can make a running variance negative; "
           "GroupNorm instead would lose the pretrained features")


def _validate_attack_and_faults(cfg: FedimgConfig) -> None:
    a = cfg.attack
    _check(0 <= a.byzantine_fraction < 1, f"attack.byzantine_fraction="
           f"{a.byzantine_fraction} must be in [0, 1)")
    _check(a.scale > 0, f"attack.scale={a.scale} must be > 0")
    c = cfg.compression
    _check(0 < c.topk_fraction <= 1, f"compression.topk_fraction={c.topk_fraction} must be "
           "in (0, 1]")

    for name in ("raise_at", "kill_at"):
        for entry in getattr(cfg.faults, name):
            _check(len(entry) == 2 and 1 <= entry[0] <= cfg.rounds
                   and 0 <= entry[1] < cfg.clients,
                   f"faults.{name} entry {list(entry)} must be [round, client] with round "
                   f"in 1..{cfg.rounds} and client in 0..{cfg.clients - 1}")


def _validate_hetero(cfg: FedimgConfig) -> None:
    """Device heterogeneity: ranges and clocks (its privacy combinations: fedimg.resolve)."""
    h = cfg.hetero
    _check_fraction("hetero.availability", h.availability)
    _check(0 <= h.dropout < 1, f"hetero.dropout={h.dropout} must be in [0, 1)")
    _check(h.speed_sigma >= 0, f"hetero.speed_sigma={h.speed_sigma} must be >= 0")
    factors = h.speed_factors
    _check(factors is None or (len(factors) == cfg.clients and min(factors) > 0
                               and all(math.isfinite(f) for f in factors)),
           f"hetero.speed_factors needs {cfg.clients} positive values (one per client), "
           f"got {None if factors is None else len(factors)}")
    for name in ("uplink_mbps", "downlink_mbps", "deadline_s"):
        value = getattr(h, name)
        _check(value is None or value > 0, f"hetero.{name}={value} must be > 0 or null")
    _check(h.step_s is None or (h.step_s > 0 and math.isfinite(h.step_s)),
           f"hetero.step_s={h.step_s} must be > 0 or null")
    _check(h.clock != "real" or h.deadline_s is None or h.deadline_s < cfg.fl.timeout_s,
           f"hetero.deadline_s={h.deadline_s} with hetero.clock=real must be below "
           f"fl.timeout_s={cfg.fl.timeout_s}: the server stops waiting at the earlier one")
    steps = cfg.fl.personalize_steps
    _check(steps >= 0, f"fl.personalize_steps={steps} must be >= 0")


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
    validate_personal(cfg)
    validate_head_init(cfg)
    validate_class_weighting(cfg)
    validate_sim(cfg)
    _validate_privacy(cfg)
    _validate_attack_and_faults(cfg)
    _validate_hetero(cfg)
    _validate_deploy(cfg)
    _validate_secagg(cfg)


def _validate_secagg(cfg: FedimgConfig) -> None:
    s, rho = cfg.secagg, cfg.privacy.dropout_tolerance
    _check(0.5 < s.threshold <= 1, f"secagg.threshold={s.threshold} must be in (0.5, 1]: at "
           "or below half, a server could collect both secrets of one client")
    _check(16 <= s.modulus_bits <= 62, f"secagg.modulus_bits={s.modulus_bits} must be in "
           "16..62 (32: four bytes a coordinate)")
    _check(s.shares is None or s.shares >= 3, f"secagg.shares={s.shares} must be >= 3 or null")
    _check(s.clip_range > 0 and s.timeout_s > 0, "secagg.clip_range and secagg.timeout_s "
           "must be > 0")
    _check(0 <= rho < 1, f"privacy.dropout_tolerance={rho} must be in [0, 1)")


def _validate_deploy(cfg: FedimgConfig) -> None:
    """Simulation-only knobs make no sense at real sites: refuse them in a deployment."""
    if not cfg.deploy.enabled:
        _check(cfg.data.classes is None, f"data.classes={cfg.data.classes} is read only by a "
               "deployed run (deploy.enabled=true): a simulation takes the class names from "
               "its data. Fix: drop data.classes")
        return
    _check(cfg.attack.byzantine_fraction == 0 and not cfg.faults.raise_at
           and not cfg.faults.kill_at,
           "attack.* and faults.* simulate malicious or crashing clients; a deployment "
           "(deploy.enabled=true) has real sites. Fix: remove them from the run's overrides")
    h = cfg.hetero
    _check(h.availability == 1 and h.dropout == 0 and h.speed_sigma == 0
           and h.speed_factors is None and h.uplink_mbps is None and h.downlink_mbps is None,
           "hetero.* simulates unreliable devices; a deployment's sites are real (a real "
           "deadline is hetero.deadline_s with hetero.clock=real). Fix: remove the others")
    _check(h.deadline_s is None or h.clock == "real", "hetero.deadline_s in a deployment "
           "needs hetero.clock=real: real sites report no simulated time")
    _check(cfg.data.source != "synthetic" and cfg.data.dataset != "synthetic",
           "synthetic data with deploy.enabled=true: the sites read their own images. "
           "Fix: name the federation's dataset (data.dataset), whose classes the sites hold")
    own = cfg.data.dataset in PATH_DATASETS or cfg.data.dataset.startswith("hf:")
    _check(not own or bool(cfg.data.classes), f"data.dataset={cfg.data.dataset} with "
           "deploy.enabled=true: the class list comes from your data, which only the "
           "coordinator has, so the sites cannot label their images. Fix: name the classes "
           "in label order, e.g. data.classes=[benign,malignant] (the sites' class folders)")
    classes = cfg.data.classes or []
    _check(len(set(classes)) == len(classes) and all(c.strip() for c in classes),
           f"data.classes={classes} has duplicate or empty names. Fix: list each class once")


def _validate_choices(section: Any, prefix: str = "") -> None:
    """Every closed-set field holds a value of its enum (a hand-built config may hold any)."""
    for name, kind in field_types(type(section)).items():
        value = getattr(section, name)
        if dataclasses.is_dataclass(kind):
            _validate_choices(value, f"{prefix}{name}.")
        elif isinstance(kind, type) and issubclass(kind, Choice):
            kind.parse(value, key=prefix + name)


def validate(cfg: FedimgConfig) -> FedimgConfig:
    """Check every value of ``cfg`` that needs no registry; raise ConfigError on the first.

    This runs once, before any data is read or any worker is started, and again on
    every decode (:func:`from_dict`). Names and registry facts are checked by
    :func:`fedimg.resolve.check_registries`. Checks that need the data (more clients
    than samples, a partition below the minimum size) run when the partitions are
    built, which is still before round 1.
    """
    _validate_choices(cfg)
    _validate_values(cfg)
    return cfg


def from_dict(values: dict[str, Any]) -> FedimgConfig:
    """Inverse of :func:`~fedimg.config.to_dict`, validated (clients, resume, export)."""
    return validate(decode(values))


def from_json(text: str) -> FedimgConfig:
    """Inverse of :func:`~fedimg.config.to_json`, validated."""
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"config JSON is malformed ({exc}). Fix: send the output of "
                          "fedimg.config.to_json") from exc
    return from_dict(values)


def check_search(search: SearchConfig, *, output_metric: str) -> str:
    """Range-check a comparison's recipe search; return the metric it selects on.

    The metric is ``compare.select_metric``, else ``output.select_metric``; it must be
    a federated validation (``val/``) metric: the test split never selects a recipe.
    """
    for key in ("lr", "local_steps", "server_lr", "ridge_lambda"):
        values = getattr(search, key)
        _check(all(v > 0 and math.isfinite(v) for v in values), f"compare.{key}={values} "
               f"is impossible: every value must be > 0. Fix: e.g. compare.{key}="
               f"{'[5,20]' if key == 'local_steps' else '[0.1,0.01]'}")
        _check(len(set(values)) == len(values), f"compare.{key}={values} repeats a value, "
               "which would run the same point twice. Fix: list each value once")
    seeds = search.search_seeds
    _check(bool(seeds) and len(set(seeds)) == len(seeds), f"compare.search_seeds={seeds} "
           "must list at least one seed, each once. Fix: e.g. compare.search_seeds=[0]")
    given = search.select_metric
    metric, key = (given, "compare.select_metric") if given else (
        output_metric, "output.select_metric (compare.select_metric's default)")
    _check(not metric.startswith("test/"), f"{key}='{metric}' is a test metric; the search "
           "selects on federated validation only. Fix: compare.select_metric=val/<metric>, "
           "e.g. val/balanced_accuracy")
    _check(metric.startswith("val/"), f"{key}='{metric}' is not a federated validation "
           "metric (val/...). Fix: compare.select_metric=val/<metric>, e.g. "
           "val/balanced_accuracy")
    return metric
