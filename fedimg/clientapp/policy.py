"""A deployed site's floor: the run settings it refuses, whatever the server asks.

The site YAML's ``policy:`` section (:mod:`fedimg.deploy.site`) becomes a
:class:`SitePolicy` in the site's node config. Every run config a site receives is
first validated with the server's own validator (``from_json`` validates on
decode, then the registries), then held to this policy by :func:`check_policy`. A
refusal is one line naming the setting, the value asked for and the site's limit;
the site raises it while answering the server's discovery query, so the
coordinator sees it before round 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedimg.config import FedimgConfig
from fedimg.errors import PolicyRefused
from fedimg.simulation import fleet

# What a site may refuse outright (``policy.never_accept``), and how a run asks for it.
NEVER_ACCEPT = ("seeded_noise", "faults", "attack", "synthetic", "hetero")


@dataclass(frozen=True)
class SitePolicy:
    """The site's limits on any run it joins (``policy:`` in its YAML)."""

    require_dp: bool = False  # only privacy.mode=dp_sgd (noise added at this site)
    max_run_epsilon: float | None = None  # largest per-run epsilon it accepts
    lifetime_epsilon: float | None = None  # what it may spend in this federation, ever
    lifetime_delta: float = 1e-5
    min_noise_multiplier: float | None = None  # smallest DP-SGD sigma it accepts
    min_batch_size: int = 1  # smallest expected logical batch (q = B / N)
    never_accept: tuple[str, ...] = NEVER_ACCEPT  # settings meant for simulation only


def site_epsilon(cfg: FedimgConfig, site: str) -> float:
    """The per-run epsilon this run gives site ``site``: its own entry, else the default."""
    budgets = cfg.privacy.site_epsilons or {}
    return float(budgets.get(site, cfg.privacy.target_epsilon))


def _asked(cfg: FedimgConfig) -> dict[str, str]:
    """The never-accept settings ``cfg`` turns on, with how it does so."""
    f = cfg.faults
    on = {"seeded_noise": "privacy.seeded_noise=true" if cfg.privacy.seeded_noise else "",
          "faults": "faults.raise_at/kill_at" if f.raise_at or f.kill_at else "",
          "attack": (f"attack.byzantine_fraction={cfg.attack.byzantine_fraction:g}"
                     if cfg.attack.byzantine_fraction > 0 else ""),
          "synthetic": "data.dataset=synthetic" if cfg.data.dataset == "synthetic" else "",
          "hetero": "hetero.* (simulated devices)" if fleet.enabled(cfg.hetero) else ""}
    return {k: v for k, v in on.items() if v}


def policy_problems(cfg: FedimgConfig, policy: SitePolicy, *, site: str) -> list[str]:
    """Every way ``cfg`` breaks ``policy`` at site ``site``, one phrase each."""
    problems = [f"{how} (policy.never_accept: {name})"
                for name, how in _asked(cfg).items() if name in policy.never_accept]
    p, dp = cfg.privacy, str(cfg.privacy.mode) == "dp_sgd"
    if policy.require_dp and not dp:
        problems.append(f"privacy.mode={p.mode}, but this site requires DP-SGD with its own "
                        "noise (policy.require_dp: true)")
    eps = site_epsilon(cfg, site)
    if dp and policy.max_run_epsilon is not None and eps > policy.max_run_epsilon:
        problems.append(f"a per-run epsilon of {eps:g}, above this site's "
                        f"policy.max_run_epsilon={policy.max_run_epsilon:g}")
    sigma = p.noise_multiplier
    if dp and policy.min_noise_multiplier is not None and sigma is not None \
            and sigma < policy.min_noise_multiplier:
        problems.append(f"privacy.noise_multiplier={sigma:g}, below this site's "
                        f"policy.min_noise_multiplier={policy.min_noise_multiplier:g}")
    if cfg.train.batch_size < policy.min_batch_size:
        problems.append(f"train.batch_size={cfg.train.batch_size}, below this site's "
                        f"policy.min_batch_size={policy.min_batch_size}")
    return problems


def check_policy(cfg: FedimgConfig, policy: SitePolicy, *, site: str) -> None:
    """Raise :class:`PolicyRefused` (one line, every problem) if ``cfg`` breaks ``policy``."""
    problems = policy_problems(cfg, policy, site=site)
    if problems:
        raise PolicyRefused(f"site {site} refuses this run: " + "; ".join(problems)
                          + ". Fix: submit the run within the site's policy, or ask the site "
                          "to change its policy")


def calibrated_sigma_problem(sigma: float, policy: SitePolicy) -> str:
    """Why a calibrated DP-SGD sigma is below the site's floor, or ""."""
    floor = policy.min_noise_multiplier
    if floor is None or sigma >= floor:
        return ""
    return (f"policy: the run's budget calibrates sigma={sigma:.3f}, below this site's "
            f"policy.min_noise_multiplier={floor:g}")
