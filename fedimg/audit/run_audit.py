"""Empirical privacy audits of a finished run: membership inference and gradient inversion.

:func:`audit_run` loads a run directory (config, partitions, final checkpoint) and
attacks the final global model:

* members are training samples of the clients, non-members samples of their
  validation splits (same distribution, never trained on);
* the loss-threshold attack (Yeom et al. 2018) needs only the target model;
* LiRA (Carlini et al. 2022) trains ``shadows`` models, each on a random half of the
  member/non-member pool, with the target's local recipe run centrally: the same
  pretrained start, transfer mode, optimiser, epochs (rounds x local epochs) and,
  for a private target, DP-SGD at the target's (epsilon, delta). Centralised shadows
  approximate the federated training they imitate; their pool is smaller than the
  target's data, so they overfit somewhat more.
* the bound that the run's (epsilon, delta) puts on any attack is reported beside.

:func:`inversion_audit` attacks one client update with Inverting Gradients
(Geiping et al. 2020): the gradient of one image as released without DP, and as
DP-SGD releases it (clipped to C, noise sigma C).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedimg.config import FedimgConfig, from_dict
from fedimg.resolve import check_registries
from fedimg.data import Dataset, InMemoryLoader, build_transform, load_dataset, load_partitions
from fedimg.errors import DataError
from fedimg.models import build_model, make_inplace_free
from fedimg.audit import mia
from fedimg.privacy.accounting import default_delta, new_ledger
from fedimg.reporting.run_dir import write_json
from fedimg.training import balanced_class_weights
from fedimg.training import resolve_device, scheduled_lr, train_local
from fedimg.reporting.paths import RunPaths

log = logging.getLogger(__name__)


def load_run_config(run_dir: Path) -> FedimgConfig:
    """The resolved config a run directory was made with (config.json)."""
    values = json.loads(RunPaths(run_dir).config_json.read_text())["config"]
    return check_registries(from_dict(values))


def load_final_model(run_dir: Path, cfg: FedimgConfig, num_classes: int) -> torch.nn.Module:
    """The run's final global model (checkpoints/final.pt) in eval mode."""
    model = build_model(cfg.model, num_classes=num_classes, weights=str(
        RunPaths(run_dir).checkpoint("final")), transfer=cfg.transfer)
    return model.eval()


def run_guarantee(results: dict[str, Any]) -> tuple[float, float]:
    """The weakest (epsilon, delta) any sample of the run enjoys (inf without DP)."""
    privacy = results.get("privacy", {})
    server = privacy.get("server", {})
    if "dp/epsilon" in server:
        return float(server["dp/epsilon"]), float(server["dp/delta"])
    clients = privacy.get("clients", {}).values()
    if not clients:
        return math.inf, 0.0
    return (max(float(c["dp/epsilon"]) for c in clients),
            max(float(c["dp/delta"]) for c in clients))


def _pool(dataset: Dataset, partitions: list, size: int, seed: int
          ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Images/labels of members then as many non-members, and the membership mask.

    Members are drawn from the clients' training splits, non-members from their
    validation splits: the same distribution (a different split, e.g. the official
    test set, would let an attack score on the distribution shift), never trained on.
    """
    rng = np.random.default_rng(seed)
    train_idx = np.concatenate([p.train_indices for p in partitions])
    held_out = np.concatenate([p.val_indices for p in partitions])
    size = min(size, len(train_idx), len(held_out))
    if size < 2:
        raise DataError("the membership audit needs held-out samples: the clients' "
                        "validation splits are empty (set data.val_fraction > 0)")
    chosen = np.r_[rng.choice(train_idx, size, replace=False),
                   rng.choice(held_out, size, replace=False)]
    idx = torch.from_numpy(chosen)
    return (dataset.train.images[idx], dataset.train.labels[idx],
            np.r_[np.ones(size, bool), np.zeros(size, bool)])


def _logits(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
            cfg: FedimgConfig) -> torch.Tensor:
    loader = InMemoryLoader(images, labels, indices=np.arange(len(labels)),
                            batch_size=cfg.train.eval_batch_size, shuffle=False, seed=0,
                            transform=build_transform("none", image_size=cfg.data.image_size,
                                                      train=False))
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x) for x, _ in loader])  # (N, K)


def train_shadow(cfg: FedimgConfig, images: torch.Tensor, labels: torch.Tensor,
                 indices: np.ndarray, *, num_classes: int, epsilon: float, delta: float,
                 seed: int) -> torch.nn.Module:
    """A shadow model: the target's local recipe, run centrally on ``indices``."""
    from fedimg.privacy.dp_budget import sample_rate, steps_per_round
    from fedimg.privacy.dp_sgd import train_private

    torch.manual_seed(seed)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, num_classes=num_classes, weights=cfg.weights,
                        transfer=cfg.transfer).to(device)
    loader = InMemoryLoader(images, labels, indices=indices, batch_size=cfg.train.batch_size,
                            shuffle=True, seed=seed, transform=build_transform(
                                cfg.data.augment, image_size=cfg.data.image_size, train=True))
    weights = (balanced_class_weights(labels[indices], num_classes)
               if cfg.train.class_weighting != "none" else None)
    n, book = len(indices), None
    if math.isfinite(epsilon):
        book = new_ledger(target_epsilon=epsilon, delta=delta, sample_rate=sample_rate(cfg, n),
                          planned_steps=cfg.rounds * steps_per_round(cfg, n),
                          accountant=cfg.privacy.accountant)
        private = make_inplace_free(model)
    for r in range(1, cfg.rounds + 1):  # one "round" = the local work of one client round
        lr = scheduled_lr(cfg.train, server_round=r, total_rounds=cfg.rounds)
        if book is None:
            train_local(model, loader, cfg=cfg.train, lr=lr, device=device,
                        class_weights=weights)
        else:
            train_private(private, loader, book, cfg=cfg, device=device, class_weights=weights,
                          lr=lr, steps=steps_per_round(cfg, n),
                          generator=torch.Generator().manual_seed(seed * 1000 + r))
    return model.eval()


def _lira(cfg: FedimgConfig, images: torch.Tensor, labels: torch.Tensor, target_conf: np.ndarray,
          *, shadows: int, num_classes: int, epsilon: float, delta: float,
          seed: int) -> np.ndarray:
    """LiRA scores of the pool from ``shadows`` shadow models on balanced random halves."""
    splits = mia.shadow_splits(len(labels), shadows, seed)  # (S, N) bool
    confs = []
    for s, inside in enumerate(splits):
        model = train_shadow(cfg, images, labels, np.flatnonzero(inside),
                             num_classes=num_classes, epsilon=epsilon, delta=delta,
                             seed=seed * 100 + s)
        confs.append(mia.true_class_confidence(_logits(model, images, labels, cfg), labels))
        log.info("shadow %d/%d trained", s + 1, shadows)
    return mia.lira_scores(target_conf, np.stack(confs), splits)


def audit_run(run_dir: str | Path, *, pool_size: int = 500, shadows: int = 0,
              seed: int = 0) -> dict[str, Any]:
    """Membership-inference audit of a run's final model; writes ``audit.json``."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    results = json.loads(RunPaths(run_dir).results.read_text())
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    images, labels, is_member = _pool(dataset, load_partitions(RunPaths(run_dir).partitions),
                                      pool_size, seed)
    model = load_final_model(run_dir, cfg, dataset.num_classes)
    logits = _logits(model, images, labels, cfg)
    eps, delta = run_guarantee(results)
    report: dict[str, Any] = {
        "epsilon": eps, "delta": delta, "pool_size": pool_size, "seed": seed,
        "non_members_from": "client validation splits", "members": int(is_member.sum()),
        "non_members": int((~is_member).sum()),
        "loss": mia.attack_metrics(mia.loss_threshold_scores(
            mia.per_sample_loss(logits, labels)), is_member),
        "bound": {"tpr_at_fpr_0.001": mia.dp_tpr_bound(eps, delta, 0.001),
                  "tpr_at_fpr_0.01": mia.dp_tpr_bound(eps, delta, 0.01),
                  "auc": mia.dp_auc_bound(eps, delta)}}
    if shadows:
        scores = _lira(cfg, images, labels, mia.true_class_confidence(logits, labels),
                       shadows=shadows, num_classes=dataset.num_classes, epsilon=eps,
                       delta=delta or default_delta(len(labels)), seed=seed)
        report["lira"] = {**mia.attack_metrics(scores, is_member), "shadows": shadows}
    write_json(run_dir / "audit.json", report)
    return report


def inversion_audit(run_dir: str | Path, *, steps: int = 300, seed: int = 0,
                    client: int = 0, sigma: float = 1.0) -> dict[str, Any]:
    """Invert one image's update from the final model, without DP and as DP-SGD releases it.

    The DP release clips the image's gradient to C and adds N(0, (sigma C)^2), sigma
    being the client's own in a DP-SGD run and ``sigma`` otherwise. Writes
    ``inversion.png`` and ``inversion.json`` into the run directory.
    """
    from fedimg.audit import inversion

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    part = load_partitions(RunPaths(run_dir).partitions)[client]
    idx = torch.from_numpy(part.train_indices[:1])
    tf = build_transform("none", image_size=cfg.data.image_size, train=False)
    x, y = tf(dataset.train.images[idx]), dataset.train.labels[idx]
    model = load_final_model(run_dir, cfg, dataset.num_classes)
    results = json.loads(RunPaths(run_dir).results.read_text())
    sigma = float(results.get("privacy", {}).get("clients", {}).get(str(client), {})
                  .get("dp/sigma", sigma))
    out: dict[str, Any] = {"image_index": int(idx[0]), "steps": steps, "sigma": sigma}
    recon = {}
    for name, clip, noise in (("plain", None, 0.0),
                              ("dp_sgd", cfg.privacy.max_grad_norm,
                               sigma * cfg.privacy.max_grad_norm)):
        result = inversion.audit_update(model, x, y, clip_norm=clip, noise_std=noise,
                                        steps=steps, seed=seed)
        recon[name] = result.pop("reconstruction")
        out[name] = {k: v for k, v in result.items() if k != "labels"}
        out[name].update({"clip_norm": clip, "noise_std": noise})
    inversion.save_comparison(torch.cat([x, x]), torch.cat([recon["plain"], recon["dp_sgd"]]),
                              run_dir / "inversion.png",
                              titles=["original (update without DP)", "original (DP-SGD update)"])
    write_json(run_dir / "inversion.json", out)
    return out
