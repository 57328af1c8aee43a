"""Compose a run config from a scenario file and Hydra-style overrides.

``python -m fedimg.simulate scenario=medical rounds=3 data.alpha=0.3`` becomes:
the scenario file ``scenarios/medical.yaml`` (whose defaults list starts from the
typed schema :class:`fedimg.config.FedimgConfig`), then the ``key=value``
overrides, merged by Hydra's Compose API, converted to dataclasses and validated
once by :func:`fedimg.config.validate`. ``hydra.run.dir=PATH`` sets the run
directory. Every failure becomes a one-line :class:`~fedimg.errors.ConfigError`.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path

from fedimg.config import FedimgConfig, validate
from fedimg.errors import ConfigError

SCHEMA_NAME = "fedimg_schema"
DEFAULT_SCENARIO = "medical"


def scenarios_dir() -> Path:
    """The scenario folder: ``$FEDIMG_SCENARIOS``, else ``scenarios/`` beside the package."""
    env = os.environ.get("FEDIMG_SCENARIOS")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "scenarios"
    if not path.is_dir():
        raise ConfigError(f"scenario folder {path} not found; set FEDIMG_SCENARIOS to "
                          "the repository's scenarios/ folder")
    return path


def list_scenarios() -> list[str]:
    """Names of the scenario files (without ``.yaml``)."""
    return sorted(p.stem for p in scenarios_dir().glob("*.yaml"))


# Config groups whose presets live in scenarios/<group>/<name>.yaml: ``privacy=dp_sgd``
# selects scenarios/privacy/dp_sgd.yaml (Hydra's ``+group=option``), merged after the
# scenario itself so that the preset's settings (e.g. frozen BatchNorm) win.
PRESET_GROUPS = ("privacy",)


def split_argv(argv: Sequence[str]) -> tuple[str, list[str]]:
    """Separate ``scenario=NAME`` from the other ``key=value`` overrides."""
    scenario, overrides = DEFAULT_SCENARIO, []
    for arg in argv:
        if arg.startswith("scenario="):
            scenario = arg.split("=", 1)[1]
        elif "=" not in arg:
            raise ConfigError(f"argument '{arg}' is not of the form key=value "
                              "(e.g. scenario=medical rounds=3 data.alpha=0.3)")
        else:
            overrides.append(arg)
    return scenario, overrides


def _scenario_file(scenario: str) -> Path:
    if scenario.endswith((".yaml", ".yml")):
        path = Path(scenario).resolve()
        if not path.is_file():
            raise ConfigError(f"scenario file '{scenario}' not found")
        return path
    path = scenarios_dir() / f"{scenario}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown scenario '{scenario}'; valid names: "
                          f"{', '.join(list_scenarios())}")
    return path


def _one_line(exc: BaseException) -> str:
    parts = [str(exc).strip().splitlines()[0]]
    cause = exc.__cause__
    while cause is not None:
        first = str(cause).strip().splitlines()
        if first and first[0] not in parts:
            parts.append(first[0])
        cause = cause.__cause__
    return ": ".join(parts)


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=FedimgConfig)


def _default_run_dir(name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return Path("runs") / name / stamp


def compose_config(
    scenario: str = DEFAULT_SCENARIO, overrides: Sequence[str] = ()
) -> FedimgConfig:
    """Merge ``scenario`` with ``overrides``, validate, and fill ``output.run_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    path = _scenario_file(scenario)
    _register_schema()
    # ``privacy=NAME`` is the Hydra group override ``+privacy=NAME`` (a preset file).
    overrides = [f"+{o}" if o.split("=", 1)[0] in PRESET_GROUPS else o for o in overrides]
    if path.parent != scenarios_dir() and any(o.startswith("+privacy=") for o in overrides):
        overrides = [*overrides, f"hydra.searchpath=[file://{scenarios_dir()}]"]
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            raw = compose(config_name=path.stem, overrides=list(overrides),
                          return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, YAMLError, ValueError) as exc:
        raise ConfigError(f"bad config for scenario '{scenario}': {_one_line(exc)}") from exc
    user_run_dir = any(o.lstrip("+").startswith("hydra.run.dir=") for o in overrides)
    run_dir = str(raw.hydra.run.dir) if user_run_dir else None
    with open_dict(raw):
        del raw["hydra"]
    try:
        cfg = OmegaConf.to_object(raw)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad config for scenario '{scenario}': {_one_line(exc)}") from exc
    assert isinstance(cfg, FedimgConfig)
    if run_dir is None and cfg.output.run_dir is None:
        run_dir = str(_default_run_dir(cfg.name))
    if run_dir is not None:
        cfg.output.run_dir = str(Path(run_dir).resolve())
    return validate(cfg)
