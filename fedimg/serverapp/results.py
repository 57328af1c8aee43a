"""``results.json``: what a finished (or stopped) run says about itself."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fedimg.reporting import library_versions
from fedimg.serverapp.state import RunState

if TYPE_CHECKING:
    from fedimg.build import PreparedRun

PARTICIPATION = ("fleet/sampled", "fleet/ok", "fleet/offline", "fleet/dropped",
                 "fleet/straggler", "fleet/failed", "fleet/rejected")


def run_results(prepared: PreparedRun, state: RunState, startup_s: float, *,
                first_message_s: float | None = None) -> dict[str, Any]:
    """The results dict of a run whose rounds are ``state.rounds``.

    ``first_message_s``: in simulation, from the engine (Ray) being up to the first
    message of round 1 (or of the resumed round).
    """
    cfg, rounds = prepared.cfg, state.rounds
    trained = [r for r in rounds if r["round"] > 0]
    rounds_s = sum(r["wall_s"] for r in trained)
    return {
        "name": cfg.name, "seed": cfg.seed, "rounds": cfg.rounds, "model": cfg.model,
        "strategy": cfg.strategy, "run_dir": str(prepared.recorder.run_dir),
        "select_metric": cfg.output.select_metric,
        "personalize_steps": cfg.fl.personalize_steps,
        "personal": str(cfg.fl.personal),
        "final": {k: v for k, v in rounds[-1].items() if k != "clients"} if rounds else {},
        "best": state.best, "initial": rounds[0] if rounds else {},
        "data": data_summary(prepared),
        "timing": {"startup_s": startup_s, "first_message_s": first_message_s,
                   "rounds_s": rounds_s,
                   "mean_round_s": rounds_s / len(trained) if trained else None,
                   "total_s": time.perf_counter() - prepared.started},
        "bytes": {"down": sum(r["bytes/down"] for r in rounds),
                  "up": sum(r["bytes/up"] for r in rounds)},
        "participation": {k.removeprefix("fleet/"): sum(r.get(k, 0) for r in trained)
                          for k in PARTICIPATION},
        "rejected_updates": {str(k): v for k, v in sorted(state.rejections.items())},
        "skipped_rounds": [r["round"] for r in rounds if r.get("skipped")],
        "stopped_early": state.stopped,
        "privacy": privacy_summary(str(cfg.privacy.mode), rounds),
        "versions": library_versions()}


def data_summary(prepared: PreparedRun) -> dict[str, Any]:
    """Where the data came from: the server's dataset, or the sites of a deployment."""
    prov = prepared.dataset.provenance if prepared.dataset is not None else None
    where = ({"source": prov.source, "location": prov.location,
              "fallback_reason": prov.fallback_reason, "warnings": list(prov.warnings)}
             if prov is not None else None)
    if not prepared.cfg.deploy.enabled:
        return {"dataset": prepared.cfg.data.dataset, **(where or {})}
    return {"dataset": prepared.cfg.data.dataset, "source": "sites",
            "sites": dict(prepared.sites), "test_set": where}


def privacy_summary(mode: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Final epsilon of each client (DP-SGD) or of the server (client-level DP), and stops."""
    clients: dict[str, dict[str, Any]] = {}
    for record in rounds:
        for pid, entry in record.get("clients", {}).items():
            dp = {k: v for k, v in entry.get("train", {}).items() if k.startswith("dp/")}
            if not dp:
                continue
            info = clients.setdefault(pid, {"stopped_round": None})
            info.update(dp)
            if entry.get("train_status", "").startswith("declined") and \
                    info["stopped_round"] is None:
                info["stopped_round"] = record["round"]
    server = {k: v for k, v in (rounds[-1] if rounds else {}).items()
              if k.startswith("dp/")} if mode == "client_dp" else {}
    return {"mode": mode, "clients": clients, "server": server}
