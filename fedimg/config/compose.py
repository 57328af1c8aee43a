"""Compose a run config from a scenario file and Hydra-style overrides.

``python -m fedimg.simulate scenario=medical rounds=3 data.alpha=0.3`` becomes:
the scenario file ``scenarios/medical.yaml`` (whose defaults list starts from the
typed schema :class:`fedimg.config.FedimgConfig`), then the ``key=value``
overrides, merged by Hydra's Compose API, converted to (frozen) dataclasses and
validated once by :func:`fedimg.config.validate`. ``hydra.run.dir=PATH`` sets the run
directory. ``scenario=path/to/file.yaml`` composes a file outside ``scenarios/``.
Names that need a registry (model, strategy, dataset) are not checked here: callers
use :func:`fedimg.resolve.compose_and_check`, which adds
:func:`fedimg.resolve.check_registries`.

Every failure becomes a one-line :class:`~fedimg.errors.ConfigError`, never a
Hydra, OmegaConf or YAML traceback. A malformed scenario file (invalid YAML, an
empty file, a list instead of a mapping, an unknown key, a value of the wrong
type) is named with the line at fault, e.g. ``scenario file s.yaml, line 4:
rounds='ten' must be int``; an unknown key lists the valid ones, and a bad value of a
closed set (``data.augment=wild``) lists the valid values.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import os
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedimg.config.checks import validate
from fedimg.config.choices import Choice
from fedimg.config.codec import field_types
from fedimg.config.schema import FedimgConfig
from fedimg.errors import ConfigError

SCHEMA_NAME = "fedimg_schema"
DEFAULT_SCENARIO = "medical"
YAML_FIX = ("Fix: correct the YAML (indent with spaces, close brackets and quotes, give each "
            "key once).")


def scenarios_dir() -> Path:
    """The scenario folder: ``$FEDIMG_SCENARIOS``, else ``scenarios/`` beside the package."""
    env = os.environ.get("FEDIMG_SCENARIOS")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "scenarios"
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


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes (explicit, else implicit), outermost first."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(":").strip() if lines else ""


def _one_line(exc: BaseException) -> str:
    """The first lines of ``exc`` and its causes down to OmegaConf's, with Hydra's options."""
    from omegaconf.errors import OmegaConfBaseException

    parts: list[str] = []
    for cause in _chain(exc):
        first = _first_line(cause)
        if first and first not in parts:
            parts.append(first)
        options = getattr(cause, "options", None)  # hydra MissingConfigException
        if options:
            parts.append(f"available: {', '.join(options)}")
        if isinstance(cause, OmegaConfBaseException):  # the detail; below it, internals
            break
    return ": ".join(parts)


def _yaml_problem(exc: BaseException) -> str:
    """``line L, column C: problem (context at line K)`` of a YAML error."""
    mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or _first_line(exc)
    if context:
        start = getattr(exc, "context_mark", None)
        problem += f" ({context}{f' at line {start.line + 1}' if start else ''})"
    return where + problem


def _read_scenario(path: Path) -> Any:
    """Parse ``path`` to a YAML node tree; bad YAML, an empty file or a non-mapping fail."""
    import yaml

    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"scenario file {path}: invalid YAML at {_yaml_problem(exc)}. "
                          f"{YAML_FIX}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"scenario file {path} cannot be read ({exc})") from exc
    fix = ("Fix: write a mapping that starts with 'defaults: [fedimg_schema, _self_]' and "
           f"then sets keys such as 'rounds: 3' (see scenarios/{DEFAULT_SCENARIO}.yaml).")
    if node is None:
        raise ConfigError(f"scenario file {path} is empty. {fix}")
    if not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
        raise ConfigError(f"scenario file {path}, line {node.start_mark.line + 1}: the top "
                          f"level is {kind}, not a mapping of config keys. {fix}")
    return node


def _key_line(tree: Any, full_key: str) -> int | None:
    """The line (1-based) of the dotted ``full_key`` in a YAML node tree, if it is there."""
    import yaml

    line = None
    for part in full_key.split("."):
        part = part.split("[")[0]
        pairs = tree.value if isinstance(tree, yaml.MappingNode) else []
        match = [(k, v) for k, v in pairs if getattr(k, "value", None) == part]
        if not part or not match:
            return None
        key, tree = match[0]
        line = key.start_mark.line + 1
    return line


def _choice_problem(exc: Any) -> str | None:
    """For a bad value of a closed-set field: the enum's message (key, value, valid ones)."""
    from omegaconf.errors import ValidationError

    owner = getattr(exc, "object_type", None)
    if not (isinstance(exc, ValidationError) and isinstance(owner, type)
            and dataclasses.is_dataclass(owner)):
        return None
    kind = field_types(owner).get(str(exc.key))
    if not (isinstance(kind, type) and issubclass(kind, Choice)):
        return None
    return kind.unknown_message(exc.full_key, exc.value)


def _key_problem(exc: Any) -> str:
    """An unknown key with the valid ones, or a value of the wrong type with the right one."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    owner, key, full_key = exc.object_type, str(exc.key), exc.full_key
    if not (isinstance(owner, type) and dataclasses.is_dataclass(owner)):
        return f"{full_key}: {_first_line(exc)}"
    choice = _choice_problem(exc)
    if choice is not None:
        return choice
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        valid = [f.name for f in dataclasses.fields(owner)]
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return (f"unknown key '{full_key}'{hint}; valid keys of {owner.__name__}: "
                f"{', '.join(valid)}. Fix: correct or remove it")
    return (f"{full_key}={exc.value!r} must be {_type_name(owner, key)} "
            f"({_first_line(exc)}). Fix: give {full_key} a value of that type")


def _type_name(owner: type, key: str) -> str:
    """``int``, ``float or null``, ``list[float]``: the declared type of a schema field."""
    try:
        declared = typing.get_type_hints(owner).get(key)
    except (NameError, TypeError):  # an unresolvable annotation: say less, never crash
        return "of the declared type"
    args = typing.get_args(declared)
    if type(None) in args:
        return " or ".join(_type_name_of(a) for a in args if a is not type(None)) + " or null"
    return _type_name_of(declared)


def _type_name_of(declared: Any) -> str:
    if isinstance(declared, type) and not typing.get_args(declared):
        return declared.__name__
    return re.sub(r"\btyping\.", "", str(declared))


def _explain(exc: BaseException, *, scenario: str, path: Path, tree: Any) -> str:
    """One line for a Hydra/OmegaConf/YAML failure; with the file line when it is the file's."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    chain = _chain(exc)
    bad_yaml = next((c for c in chain if isinstance(c, yaml.MarkedYAMLError)), None)
    if bad_yaml is not None:
        mark = bad_yaml.problem_mark or bad_yaml.context_mark
        from_file = mark is not None and Path(mark.name).suffix in (".yaml", ".yml")
        where = mark.name if from_file else path
        return f"scenario file {where}: invalid YAML at {_yaml_problem(bad_yaml)}. {YAML_FIX}"
    hydra = next((c for c in chain if isinstance(c, HydraException)), None)
    in_file = hydra is not None and _first_line(hydra).startswith(f"In '{path.stem}':")
    keyed = next((c for c in chain if isinstance(c, OmegaConfBaseException)
                  and getattr(c, "full_key", None)), None)
    line = _key_line(tree, keyed.full_key) if keyed is not None and in_file else None
    if line is not None:
        return f"scenario file {path}, line {line}: {_key_problem(keyed)}"
    choice = _choice_problem(keyed) if keyed is not None else None
    return f"bad config for scenario '{scenario}': {choice or _one_line(exc)}"


def _writable(node: Any) -> Any:
    """``node`` with the read-only flag cleared throughout.

    OmegaConf marks the nodes of frozen dataclasses read-only, which would refuse every
    scenario value merged onto the schema; the frozen types come back in :func:`_to_config`.
    """
    from omegaconf import DictConfig, OmegaConf

    OmegaConf.set_readonly(node, None)  # only the sections' nodes carry the flag
    if OmegaConf.get_type(node) is dict:  # a mapping field (site name -> value): open keys
        OmegaConf.set_struct(node, False)
    for key in node:
        if isinstance(node[key], DictConfig):
            _writable(node[key])
    return node


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    schema = _writable(OmegaConf.structured(FedimgConfig))
    ConfigStore.instance().store(name=SCHEMA_NAME, node=schema)


def _default_run_dir(name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return Path("runs") / name / stamp


def _compose(scenario: str, path: Path, overrides: list[str]) -> Any:
    """Hydra's composed config (a DictConfig with ``hydra``); failures as ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    tree = _read_scenario(path)
    _register_schema()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            return compose(config_name=path.stem, overrides=overrides,
                           return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, YAMLError, ValueError) as exc:
        raise ConfigError(_explain(exc, scenario=scenario, path=path, tree=tree)) from exc


def _to_config(raw: Any, *, scenario: str, path: Path) -> FedimgConfig:
    """The composed config as dataclasses; a scenario not built on the schema fails."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.to_object(raw)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad config for scenario '{scenario}': {_one_line(exc)}") from exc
    if not isinstance(cfg, FedimgConfig):
        raise ConfigError(f"scenario file {path} does not build on the config schema, so its "
                          "keys cannot be checked. Fix: start it with 'defaults: "
                          "[fedimg_schema, _self_]'.")
    return cfg


def compose_config(
    scenario: str = DEFAULT_SCENARIO, overrides: Sequence[str] = ()
) -> FedimgConfig:
    """Merge ``scenario`` with ``overrides``, validate, and fill ``output.run_dir``."""
    from omegaconf import open_dict

    path = _scenario_file(scenario)
    # ``privacy=NAME`` is the Hydra group override ``+privacy=NAME`` (a preset file).
    overrides = [f"+{o}" if o.split("=", 1)[0] in PRESET_GROUPS else o for o in overrides]
    if path.parent != scenarios_dir() and any(o.startswith("+privacy=") for o in overrides):
        overrides = [*overrides, f"hydra.searchpath=[file://{scenarios_dir()}]"]
    raw = _compose(scenario, path, list(overrides))
    user_run_dir = any(o.lstrip("+").startswith("hydra.run.dir=") for o in overrides)
    run_dir = str(raw.hydra.run.dir) if user_run_dir else None
    with open_dict(raw):
        del raw["hydra"]
    cfg = _to_config(raw, scenario=scenario, path=path)
    if run_dir is None and cfg.output.run_dir is None:
        run_dir = str(_default_run_dir(cfg.name))
    if run_dir is not None:
        output = dataclasses.replace(cfg.output, run_dir=str(Path(run_dir).resolve()))
        cfg = dataclasses.replace(cfg, output=output)
    given = Path(cfg.data.path).expanduser() if cfg.data.path else None
    if given is not None and (given.is_absolute() or given.exists()):
        # workers and resumes read it from wherever they run; a relative path that is not
        # here stays relative, for the reader to find under the data root (data.root or
        # $FEDIMG_DATA: data.path=ham_sites)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                path=str(given.resolve())))
    return validate(cfg)
