"""Console output: logging setup, the round progress bar and the summary table.

fedimg logs through :mod:`logging` only. The console shows fedimg's own messages
and everyone's warnings; ``run.log`` in the run directory keeps everything at
INFO, Flower's per-round chatter included.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedimg.reporting.paths import RunPaths

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines above an active progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _NotOurs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(("fedimg", "flwr"))


def setup_logging(run_dir: Path | None = None, *, verbose: bool = False) -> None:
    """Console for fedimg (INFO) and all warnings; ``run.log`` for everything."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        # Ours from an earlier call, or a bare stderr handler from a library's import-time
        # logging.basicConfig (opacus/utils/module_utils.py has one): it would print every
        # record a second time.
        if getattr(handler, "_fedimg", False) or type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    ours = logging.getLogger("fedimg")
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.handlers = [h for h in ours.handlers if not getattr(h, "_fedimg", False)]
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    console._fedimg = True  # type: ignore[attr-defined]
    ours.addHandler(console)
    others = _TqdmHandler()
    others.setLevel(logging.WARNING)
    others.addFilter(_NotOurs())
    others._fedimg = True  # type: ignore[attr-defined]
    root.addHandler(others)
    for handler in logging.getLogger("flwr").handlers:  # Flower's own console handler
        handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if run_dir is not None:
        file_handler = logging.FileHandler(RunPaths(run_dir).log)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        file_handler._fedimg = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)


class RoundProgress:
    """A progress bar over rounds with an ETA and the latest key metrics."""

    def __init__(self, total: int, *, enabled: bool = True, desc: str = "rounds",
                 initial: int = 0) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="round", disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True, initial=initial)

    def update(self, postfix: dict[str, float]) -> None:
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()
                              if isinstance(v, float) and not math.isnan(v)})
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


_COLUMNS = (("round", "round"), ("train loss", "train/loss"), ("val acc", "val/accuracy"),
            ("test loss", "test/loss"), ("test acc", "test/accuracy"),
            ("test auc", "test/auc"), ("worst val", "fair/worst_accuracy"),
            ("clients", "fleet/ok"), ("wall s", "wall_s"))


def summary_table(rounds: Sequence[dict[str, Any]], results: dict[str, Any]) -> str:
    """A plain-text table of the run, one row per round, plus the headline numbers."""
    rows = [[_fmt(r.get(key)) for _, key in _COLUMNS] for r in rounds]
    header = [name for name, _ in _COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    final, best = results.get("final", {}), results.get("best", {})
    out.append("")
    out.append(f"final  test acc {_fmt(final.get('test/accuracy'))}  "
               f"auc {_fmt(final.get('test/auc'))}  (round {results.get('rounds')})")
    metric = results.get("select_metric", "val/balanced_accuracy")
    out.append(f"best   test acc {_fmt(best.get('test/accuracy'))}  "
               f"(round {best.get('round')}, chosen on {metric} "
               f"{_fmt(best.get(metric))})")
    out.append(f"fair   worst client val acc {_fmt(final.get('fair/worst_accuracy'))}  "
               f"p10 {_fmt(final.get('fair/p10_accuracy'))}  "
               f"spread {_fmt(final.get('fair/spread_accuracy'))}"
               + (f"  after {final_k} local steps: mean "
                  f"{_fmt(final.get('val/personal_accuracy'))} worst "
                  f"{_fmt(final.get('fair/worst_personal_accuracy'))}"
                  if (final_k := results.get("personalize_steps")) else ""))
    out.extend(_personal_line(results.get("personal", "none"), final))
    out.extend(_site_line(final))
    out.extend(_secure_line(rounds))
    part, sent = results.get("participation", {}), results.get("bytes", {})
    out.append("clients " + "  ".join(f"{k} {v}"
                                      for k, v in part.items() if v)
               + f"  |  MB down {sent.get('down', 0) / 1e6:.1f} up {sent.get('up', 0) / 1e6:.1f}")
    out.append(f"data   {results.get('data', {}).get('source')} "
               f"{results.get('data', {}).get('location', '')}")
    out.append(f"run    {results.get('run_dir')}")
    return "\n".join(out)


def _personal_line(personal: str, final: dict[str, Any]) -> list[str]:
    """``personal ditto  val acc mean ... worst client ...`` beside the global model's."""
    if personal == "none":
        return []
    return [f"personal {personal}  val acc mean {_fmt(final.get('val/personal_accuracy'))}  "
            f"worst client {_fmt(final.get('fair/worst_personal_accuracy'))}  (global model: "
            f"mean {_fmt(final.get('val/accuracy'))}  worst "
            f"{_fmt(final.get('fair/worst_accuracy'))})"]


def _site_line(final: dict[str, Any], metric: str = "balanced_accuracy") -> list[str]:
    """``sites  test bal acc worst ... (name)  mean ...  spread ...`` if per-site metrics."""
    suffix = f"/{metric}"
    per_site = {k[len("test/site/"):-len(suffix)]: v for k, v in final.items()
                if k.startswith("test/site/") and k.endswith(suffix)
                and isinstance(v, float) and not math.isnan(v)}
    if not per_site:
        return []
    worst = min(per_site, key=per_site.__getitem__)
    values = list(per_site.values())
    return [f"sites  test bal acc worst {_fmt(per_site[worst])} ({worst})  "
            f"mean {_fmt(sum(values) / len(values))}  "
            f"spread {_fmt(max(values) - min(values))}  over {len(values)} sites"]


_STAGES = ("setup", "share_keys", "collect", "unmask")


def _secure_line(rounds: Sequence[dict[str, Any]]) -> list[str]:
    """``secagg`` seconds and bytes of each SecAgg+ stage, mean over the secure rounds."""
    done = [r for r in rounds if isinstance(r.get("secagg/setup_s"), float)]
    if not done:
        return []

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in done) / len(done)

    stages = "  ".join(f"{stage} {mean(f'secagg/{stage}_s'):.2f} s "
                       f"{mean(f'secagg/{stage}_bytes') / 1e6:.2f} MB" for stage in _STAGES)
    return [f"secagg per round: {stages}  (mean of {len(done)} rounds; "
            f"{mean('secagg/contributors'):.1f} contributors)"]

