"""OmegaConf configs in the ``target`` + ``params`` idiom.

A node ``{target: package.module.Class, params: {...}}`` becomes ``Class(**params)``.
Nested nodes that themselves carry a ``target`` (the UNet inside the model) are checked
the same way before anything is built, so a typo anywhere is reported with its full
config path, e.g. ``model.params.unet_rosinality_config.params.chanel``.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

#: Top-level sections a run config may hold, besides ``base`` (a config this one extends).
RUN_SECTIONS = ("seed", "model", "data", "trainer", "sampling", "logging", "evaluation")


class ConfigError(ValueError):
    """A config is malformed; the message names the offending config path."""


def get_obj_from_str(name: str, path: str = "target") -> Any:
    """Import ``package.module.Attr`` and return ``Attr``."""
    if not isinstance(name, str) or "." not in name:
        raise ConfigError(f"{path}: expected a dotted import path like 'models.ddpm_conditioned.ConditionDDPM', got {name!r}")
    module_name, attr = name.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{path}: cannot import module '{module_name}' of target '{name}' ({err})") from err
    if not hasattr(module, attr):
        raise ConfigError(f"{path}: module '{module_name}' has no attribute '{attr}' (target '{name}')")
    return getattr(module, attr)


def _as_dict(cfg: Any) -> Any:
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _is_target_node(value: Any) -> bool:
    return isinstance(value, Mapping) and "target" in value


def _accepted_parameters(obj: Any) -> tuple[dict | None, bool]:
    """(named keyword parameters, accepts any other keyword) of a target; (None, True) if unknown.

    A class whose ``__init__`` takes ``**kwargs`` (``ConditionDDPM(*args, ..., **kwargs)``)
    is taken to forward them to its base class, whose parameters are then added, up the
    MRO until an ``__init__`` without ``**kwargs``.
    """
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None, True
    kinds = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    named = {n: p for n, p in sig.parameters.items() if p.kind not in kinds}
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    if accepts_kwargs and inspect.isclass(obj):
        owners = [c for c in obj.__mro__ if "__init__" in c.__dict__]
        for base in owners[1:]:
            try:
                base_params = list(inspect.signature(base.__dict__["__init__"]).parameters.values())[1:]
            except (TypeError, ValueError):
                break
            for p in base_params:
                if p.kind not in kinds:
                    named.setdefault(p.name, p)
            if not any(p.kind is p.VAR_KEYWORD for p in base_params):
                accepts_kwargs = False
                break
    return named, accepts_kwargs


def validate_target_config(cfg: Any, path: str = "config") -> None:
    """Check a ``target``/``params`` node (and nested ones) against the target's signature.

    Raises ConfigError naming the config path for a missing ``target``, an unknown
    import, an unknown parameter or a missing required parameter.
    """
    cfg = _as_dict(cfg)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{path}: expected a mapping with 'target' and 'params', got {type(cfg).__name__}")
    if "target" not in cfg:
        raise ConfigError(f"{path}: missing key 'target' (expected {{target: package.module.Class, params: {{...}}}})")
    extra = set(cfg) - {"target", "params"}
    if extra:
        raise ConfigError(f"{path}: unexpected keys {sorted(extra)}; only 'target' and 'params' are allowed")
    obj = get_obj_from_str(cfg["target"], f"{path}.target")
    params = cfg.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{path}.params: expected a mapping, got {type(params).__name__}")
    named, accepts_kwargs = _accepted_parameters(obj)
    if named is not None:
        if not accepts_kwargs:
            for key in params:
                if key not in named:
                    raise ConfigError(
                        f"{path}.params.{key}: unknown parameter '{key}' for {cfg['target']}; "
                        f"expected one of: {', '.join(sorted(named))}")
        for name, p in named.items():
            if p.default is p.empty and name not in params:
                raise ConfigError(f"{path}.params.{name}: missing required parameter '{name}' for {cfg['target']}")
    for key, value in params.items():
        if _is_target_node(value):
            validate_target_config(value, f"{path}.params.{key}")


def instantiate_from_configs(cfg: Any, path: str = "config", **extra: Any) -> Any:
    """Build ``target(**params, **extra)`` from a config node, after validating it."""
    validate_target_config(cfg, path)
    cfg = _as_dict(cfg)
    params = dict(cfg.get("params") or {})
    params.update(extra)
    return get_obj_from_str(cfg["target"], f"{path}.target")(**params)


def _load_with_base(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    cfg = OmegaConf.load(path)
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    return OmegaConf.merge(_load_with_base(path.parent / base, seen + (path,)), cfg)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> DictConfig:
    """Load a run config and apply ``key=value`` dotlist overrides.

    A top-level ``base: other.yaml`` (relative to the file) is loaded first and this file
    is merged on top of it. Unknown top-level sections are rejected so that a misspelt
    override such as ``trainr.max_steps=5`` fails instead of being silently ignored.
    """
    cfg = _load_with_base(Path(path))
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    unknown = set(cfg) - set(RUN_SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; expected some of {list(RUN_SECTIONS)}")
    return cfg
