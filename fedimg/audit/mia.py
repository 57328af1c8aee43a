"""Membership-inference audit maths for a trained model (plain torch/numpy/scikit-learn).

The attacks score each candidate example; a higher score means "more likely a
training member". :func:`attack_metrics` then summarises a score vector against
the true membership, and :func:`dp_tpr_bound` / :func:`dp_auc_bound` give the
ceiling that an (epsilon, delta)-DP training run puts on *any* attack, so an
audit can print "measured vs allowed".

* Loss threshold (Yeom et al., "Privacy Risk in Machine Learning: Analyzing the
  Connection to Overfitting", CSF 2018): score = -loss.
* LiRA (Carlini et al., "Membership Inference Attacks From First Principles",
  IEEE S&P 2022): shadow models, each trained on a random half of the candidate
  pool (:func:`shadow_splits`), give for every example the distribution of its
  logit-scaled confidence (:func:`true_class_confidence`) when it was IN and
  when it was OUT of training; :func:`lira_scores` turns the target model's
  confidence into a Gaussian likelihood-ratio test.
* DP bound (Kairouz et al., "The Composition Theorem for Differential Privacy",
  ICML 2015; Nasr et al., "Adversary Instantiation: Lower Bounds for
  Differentially Private Machine Learning", IEEE S&P 2021): an
  (epsilon, delta)-DP mechanism forces every test to satisfy
  TPR <= min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import auc, roc_curve

from fedimg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_STD_FLOOR = 1e-8  # keeps the Gaussian tests finite when all shadow values coincide
LOW_FPRS = (0.001, 0.01)  # the operating points LiRA recommends reporting


# --------------------------------------------------------------------- per-example statistics


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise DataError(f"logits must be (N, K) with K >= 2 classes; got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise DataError(f"labels must be (N,) = ({logits.shape[0]},) to match the logits; "
                        f"got {tuple(labels.shape)}")


def true_class_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """LiRA's logit-scaled confidence phi = log(p_y) - log(1 - p_y), shape (N,).

    Computed without forming p_y: phi = z_y - logsumexp_{k != y} z_k (float64),
    which stays finite where p_y rounds to 1 (Carlini et al. 2022, Sec. IV-B).
    """
    _check_logits(logits, labels)
    z = logits.detach().double().cpu()  # (N, K)
    y = labels.detach().long().cpu()  # (N,)
    z_true = z.gather(1, y[:, None]).squeeze(1)  # (N,)
    others = z.scatter(1, y[:, None], float("-inf"))  # (N, K), true class masked out
    return (z_true - torch.logsumexp(others, dim=1)).numpy()


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Cross-entropy of each example, shape (N,), float64."""
    _check_logits(logits, labels)
    z, y = logits.detach().double().cpu(), labels.detach().long().cpu()
    return F.cross_entropy(z, y, reduction="none").numpy()


def loss_threshold_scores(losses: np.ndarray) -> np.ndarray:
    """Yeom et al. (2018): score = -loss, so a low loss reads as "member"."""
    return -np.asarray(losses, dtype=np.float64)


# --------------------------------------------------------------------------------- LiRA


def shadow_splits(num_examples: int, num_shadows: int, seed: int) -> np.ndarray:
    """Which examples each shadow model trains on: bool (S, N), True = IN.

    As in the LiRA paper's balanced splits, every example is IN for exactly
    S/2 shadows. With S odd a random half of the examples is IN for (S+1)/2
    shadows and the other half for (S-1)/2, so each shadow still sees about
    half of the pool.
    """
    if num_examples < 1 or num_shadows < 1:
        raise ConfigError(f"num_examples={num_examples}, num_shadows={num_shadows}: "
                          f"both must be >= 1")
    rng = np.random.default_rng(seed)
    ranks = rng.permuted(np.tile(np.arange(num_shadows)[:, None], (1, num_examples)), axis=0)
    in_count = np.full(num_examples, num_shadows // 2)  # (N,)
    if num_shadows % 2:
        extra = rng.permutation(num_examples) < (num_examples + 1) // 2
        in_count = in_count + extra
    return ranks < in_count[None, :]


def _side_stats(values: np.ndarray, mask: np.ndarray, *, fixed_variance: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example mean and std of ``values`` where ``mask``, plus the count (N,).

    Examples with no value get NaN means (filled by the caller). The fixed
    variance pools every example's deviations from its own mean into one
    global std; with a single value per example it falls back to the std of
    all values of that side (as the LiRA reference code does). A per-example
    std needs >= 2 values and otherwise falls back to the global one.
    """
    count = mask.sum(0)  # (N,)
    mu = np.full(values.shape[1], np.nan)
    seen = count > 0
    mu[seen] = np.where(mask, values, 0.0).sum(0)[seen] / count[seen]
    dev2 = np.where(mask, values - np.nan_to_num(mu)[None, :], 0.0) ** 2  # (S, N)
    dof = int((count[seen] - 1).sum())  # one mean estimated per example
    if dof > 0:
        pooled = math.sqrt(dev2.sum() / dof)
    else:
        pooled = float(values[mask].std()) if mask.sum() > 1 else 1.0
    std = np.full(values.shape[1], pooled)
    if not fixed_variance:
        per_example = np.sqrt(dev2.sum(0) / np.maximum(count - 1, 1))
        std = np.where(count > 1, per_example, pooled)
    return mu, np.maximum(std, _STD_FLOOR), count


def _fill_means(mu_in: np.ndarray, mu_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill a missing IN (OUT) mean from the OUT (IN) mean plus the average IN-OUT gap."""
    both = ~np.isnan(mu_in) & ~np.isnan(mu_out)
    if both.any():
        gap = float(np.mean(mu_in[both] - mu_out[both]))
    else:  # no example has both sides: compare the pooled means of each side
        gap = float(np.nanmean(mu_in) - np.nanmean(mu_out))
    return (np.where(np.isnan(mu_in), mu_out + gap, mu_in),
            np.where(np.isnan(mu_out), mu_in - gap, mu_out))


def _gauss_logpdf(x: np.ndarray, mu: np.ndarray, std: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mu) / std) ** 2 - np.log(std) - 0.5 * math.log(2 * math.pi)


def lira_scores(
    target_conf: np.ndarray,
    shadow_conf: np.ndarray,
    shadow_in: np.ndarray,
    *,
    online: bool | None = None,
    fixed_variance: bool = True,
) -> np.ndarray:
    """LiRA membership scores (N,), higher = more likely member.

    ``target_conf`` (N,) is :func:`true_class_confidence` of the target model,
    ``shadow_conf`` (S, N) that of each shadow model and ``shadow_in`` (S, N)
    whether the shadow trained on the example.

    * online: log N(x; mu_in, s_in) - log N(x; mu_out, s_out), the Gaussian
      likelihood ratio of IN vs OUT (Carlini et al. 2022, Alg. 1).
    * offline: the one-sided test against OUT only. The paper reports the
      p-value Phi((x - mu_out) / s_out); its z-score (x - mu_out) / s_out is
      returned instead: the same ranking, without Phi saturating at 1.

    ``online=None`` picks online when every example has >= 1 IN and >= 1 OUT
    shadow (a half/half :func:`shadow_splits` with S >= 2 guarantees it), else
    offline. ``fixed_variance`` uses one global std per side (pooled over
    examples), which the paper recommends below ~64 shadows. An example missing
    one side (e.g. no OUT shadow) borrows that mean from the other side shifted
    by the average IN-OUT gap, so scores stay finite.
    """
    x, conf, keep = _check_lira_inputs(target_conf, shadow_conf, shadow_in)
    mu_in, std_in, n_in = _side_stats(conf, keep, fixed_variance=fixed_variance)
    mu_out, std_out, n_out = _side_stats(conf, ~keep, fixed_variance=fixed_variance)
    if online is None:
        online = bool((n_in > 0).all() and (n_out > 0).all())
        log.debug("LiRA: chose the %s attack", "online" if online else "offline")
    if online and not n_in.any():
        raise ConfigError("online LiRA needs shadow models trained WITH the examples, but "
                          "shadow_in is all False; use online=False (offline LiRA)")
    if not n_out.any():
        raise ConfigError("LiRA needs shadow models trained WITHOUT the examples, but "
                          "shadow_in is all True; draw the splits with shadow_splits()")
    lacking = int(((n_in == 0) | (n_out == 0)).sum())
    if (n_out == 0).any() or (online and (n_in == 0).any()):
        log.warning("LiRA: %d examples lack an IN or OUT shadow; their missing mean is "
                    "estimated from the average IN-OUT gap", lacking)
    if n_in.any():  # without any IN shadow every example has all S shadows OUT
        mu_in, mu_out = _fill_means(mu_in, mu_out)
    if online:
        return _gauss_logpdf(x, mu_in, std_in) - _gauss_logpdf(x, mu_out, std_out)
    return (x - mu_out) / std_out


def _check_lira_inputs(target_conf: np.ndarray, shadow_conf: np.ndarray,
                       shadow_in: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(target_conf, dtype=np.float64)
    conf = np.asarray(shadow_conf, dtype=np.float64)
    keep = np.asarray(shadow_in, dtype=bool)
    if x.ndim != 1 or conf.ndim != 2 or conf.shape[1] != x.shape[0] or keep.shape != conf.shape:
        raise DataError(f"LiRA expects target_conf (N,), shadow_conf (S, N) and shadow_in "
                        f"(S, N); got {x.shape}, {conf.shape}, {keep.shape}")
    if not (np.isfinite(x).all() and np.isfinite(conf).all()):
        raise DataError("LiRA confidences contain NaN or Inf; compute them with "
                        "true_class_confidence(), which is finite for finite logits")
    return x, conf, keep


# ------------------------------------------------------------------------------ metrics


def attack_metrics(scores: np.ndarray, is_member: np.ndarray) -> dict[str, float]:
    """AUC, TPR at FPR 0.1 % and 1 %, and the best-threshold balanced accuracy.

    TPR at a target FPR is the largest TPR over thresholds whose FPR is at most
    the target (Carlini et al. 2022 recommend these low-FPR points over AUC).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_member, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise DataError(f"scores and is_member must both be (N,); got {s.shape} and {y.shape}")
    if y.all() or not y.any():
        raise DataError(f"attack metrics need both members and non-members; got "
                        f"{int(y.sum())} members out of {y.size}")
    if not np.isfinite(s).all():
        raise DataError("attack scores contain NaN or Inf")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    metrics = {"auc": float(auc(fpr, tpr))}
    for target in LOW_FPRS:
        metrics[f"tpr_at_fpr_{target:g}"] = float(tpr[fpr <= target].max())
    metrics["balanced_accuracy"] = float(np.max((tpr + 1 - fpr) / 2))
    return metrics


# --------------------------------------------------------------------------- DP bounds


def _check_dp(epsilon: float, delta: float) -> None:
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise ConfigError(f"epsilon={epsilon}, delta={delta}: need epsilon >= 0 (inf allowed) "
                          f"and 0 <= delta <= 1")


def _tpr_bound(epsilon: float, delta: float, fpr: np.ndarray) -> np.ndarray:
    if math.isinf(epsilon):
        return np.ones_like(fpr)
    e = math.exp(epsilon)
    bound = np.minimum(e * fpr + delta, 1 - (1 - delta - fpr) / e)
    return np.clip(bound, 0.0, 1.0)


def dp_tpr_bound(epsilon: float, delta: float, fpr: float) -> float:
    """Largest TPR any membership attack reaches at ``fpr`` against (eps, delta)-DP.

    TPR <= min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)); eps = inf gives 1.
    """
    _check_dp(epsilon, delta)
    if not 0 <= fpr <= 1:
        raise ConfigError(f"fpr={fpr} must lie in [0, 1]")
    return float(_tpr_bound(epsilon, delta, np.array([fpr], dtype=np.float64))[0])


def dp_auc_bound(epsilon: float, delta: float, *, grid: int = 10_001) -> float:
    """Largest ROC AUC an attack reaches against (eps, delta)-DP: the integral of
    :func:`dp_tpr_bound` over FPR in [0, 1] (trapezoid rule on a grid that also
    holds the bound's kinks, where it is then exact; eps = 0, delta = 0 gives 0.5).
    """
    _check_dp(epsilon, delta)
    kinks = [1 - delta]
    if not math.isinf(epsilon):
        kinks += [(1 - delta) / (math.exp(epsilon) + 1), (1 - delta) / math.exp(epsilon)]
    fpr = np.union1d(np.linspace(0.0, 1.0, grid), np.clip(kinks, 0.0, 1.0))
    return float(auc(fpr, _tpr_bound(epsilon, delta, fpr)))  # trapezoid rule
