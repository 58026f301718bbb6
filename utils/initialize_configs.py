"""OmegaConf configs in the ``target`` + ``params`` idiom.

A node ``{target: package.module.Class, params: {...}}`` becomes ``Class(**params)``.
Nested nodes that themselves carry a ``target`` (the UNet inside the model) are checked
the same way before anything is built, so a typo anywhere is reported with its full
config path, e.g. ``model.params.unet_rosinality_config.params.chanel``.

Targets are allow-listed, so that neither a config nor a checkpoint's hyper-parameters (they
hold the UNet config) can run code such as ``{target: os.system, params: {command: ...}}``:
the target *string* is checked before anything is imported; by default only classes are
allowed, under this project's packages (PROJECT_PACKAGES), or under torch / lightning when
they subclass a module, optimizer, LR scheduler, dataset or Lightning callback, data module
or LightningModule. A run config's top-level ``allow_targets: [mypackage, other.module.Class]``
(prefixes of whole dotted components; anything callable under them) holds while
``instantiate_from_configs(..., allow_targets=...)`` builds its object, constructors' own
instantiations included (``DDPM.__init__`` builds its UNet config). A checkpoint's
hyper-parameters get the default list only, whatever the run config allows (:func:`checkpoint_targets`).
A config reads only its own file, its ``base:`` files and the ``key=value`` overrides:
``${other.key}`` refers to a key of the same config, but no resolver may be called
(``${oc.env:...}`` or any ``${name:...}``). Errors about a file never quote its contents.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

#: Top-level sections a run config may hold, besides ``base`` (a config this one extends).
#: ``allow_targets`` lists extra target prefixes a run config permits (see the module doc).
RUN_SECTIONS = ("seed", "model", "data", "trainer", "sampling", "logging", "evaluation", "allow_targets", "init_from")

#: This project's packages: any class under them may be a target.
PROJECT_PACKAGES = ("utils", "diffusion_modules", "models", "metrics", "evaluation", "orchestration")
#: Framework packages: their classes may be targets if they subclass one of _framework_bases().
FRAMEWORK_PACKAGES = ("torch", "lightning", "pytorch_lightning")

_EXTRA_ALLOWED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("cdm4mi_allow_targets",
                                                                                 default=())
_CHECKPOINT_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("cdm4mi_checkpoint_targets", default=False)


class ConfigError(ValueError):
    """A config is malformed; the message names the offending config path."""


def _is_dotted_name(name: Any) -> bool:
    return isinstance(name, str) and all(part.isidentifier() for part in name.split("."))


def _under(name: str, prefixes: Iterable[str]) -> bool:
    """``name`` is one of ``prefixes`` or inside one, matching whole dotted components."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def normalize_allow_targets(allow_targets: Any, path: str = "allow_targets") -> tuple[str, ...]:
    """``allow_targets`` of a run config as a tuple of dotted prefixes (None -> ())."""
    if allow_targets is None:
        return ()
    allow_targets = _as_dict(allow_targets, path)
    if isinstance(allow_targets, str):
        allow_targets = [allow_targets]
    if not isinstance(allow_targets, (list, tuple)):
        raise ConfigError(f"{path}: expected a list of dotted package / module / class names, "
                          f"got {type(allow_targets).__name__}")
    for i, item in enumerate(allow_targets):
        if not _is_dotted_name(item):
            raise ConfigError(f"{path}[{i}]: expected a dotted name like 'mypackage' or 'mypackage.module.Class', "
                              f"got {item!r}")
    return tuple(allow_targets)


@contextlib.contextmanager
def allowed_targets(extra: Any = None) -> Iterator[tuple[str, ...]]:
    """Allow the targets under the prefixes ``extra`` too while the block runs (nested
    instantiations done by constructors included); yields the extra prefixes in force."""
    token = _EXTRA_ALLOWED.set(_EXTRA_ALLOWED.get() + normalize_allow_targets(extra))
    try:
        yield _EXTRA_ALLOWED.get()
    finally:
        _EXTRA_ALLOWED.reset(token)


@contextlib.contextmanager
def checkpoint_targets() -> Iterator[None]:
    """While the block runs (a checkpoint's hyper-parameters checked or built), targets get the
    default allowlist only: a run config's ``allow_targets`` and enclosing extras do not count."""
    token = _CHECKPOINT_ONLY.set(True)
    try:
        yield
    finally:
        _CHECKPOINT_ONLY.reset(token)


def _framework_bases() -> tuple[type, ...]:
    import torch

    bases: list[type] = [torch.nn.Module, torch.optim.Optimizer, torch.utils.data.Dataset]
    scheduler = getattr(torch.optim.lr_scheduler, "LRScheduler", None) or torch.optim.lr_scheduler._LRScheduler
    bases.append(scheduler)
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            pl = importlib.import_module(package)
        except ImportError:
            continue
        bases += [pl.Callback, pl.LightningDataModule, pl.LightningModule]
    return tuple(bases)


_NOT_ALLOWED_HINT = (f"only classes under {', '.join(PROJECT_PACKAGES)} and torch / lightning modules, optimizers, "
                     "LR schedulers, datasets, callbacks and data modules may be targets; "
                     "add its package to allow_targets to permit it")
_CHECKPOINT_HINT = "a checkpoint's hyper-parameters get the default allowlist only: allow_targets does not reach them"


def _hint() -> str:
    return _CHECKPOINT_HINT if _CHECKPOINT_ONLY.get() else _NOT_ALLOWED_HINT


def _check_target_name(name: str, path: str) -> str:
    """Which rule admits the target string: "extra", "project" or "framework"; ConfigError if none.
    Nothing is imported."""
    if not _CHECKPOINT_ONLY.get() and _under(name, _EXTRA_ALLOWED.get()):
        return "extra"
    if _under(name, PROJECT_PACKAGES):
        return "project"
    if _under(name, FRAMEWORK_PACKAGES):
        return "framework"
    raise ConfigError(f"{path}: {name!r} is not an allowed target ({_hint()})")


def _check_target_object(obj: Any, name: str, rule: str, path: str) -> None:
    """After import: extra prefixes admit anything callable; otherwise the object must be a class,
    defined under an allowed package (not merely imported into one), and for torch / lightning
    a subclass of one of the framework base classes."""
    if rule == "extra":
        if not callable(obj):
            raise ConfigError(f"{path}: target {name!r} is not callable")
        return
    if not inspect.isclass(obj):
        raise ConfigError(f"{path}: {name!r} is not an allowed target: it is a {type(obj).__name__}, not a class "
                          f"({_hint()})")
    defined_in = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    if _under(defined_in, PROJECT_PACKAGES):
        return
    if _under(defined_in, FRAMEWORK_PACKAGES) and issubclass(obj, _framework_bases()):
        return
    raise ConfigError(f"{path}: {name!r} (defined as {defined_in!r}) is not an allowed target ({_hint()})")


def get_obj_from_str(name: str, path: str = "target") -> Any:
    """Import ``package.module.Attr`` and return ``Attr``, if the allowlist admits it.

    The name is checked against the allowlist before anything is imported, the object
    after (see the module doc); a refused target raises ConfigError naming ``path``.
    """
    if not isinstance(name, str) or "." not in name:
        raise ConfigError(f"{path}: expected a dotted import path like 'models.ddpm_conditioned.ConditionDDPM', got {name!r}")
    if not _is_dotted_name(name):
        raise ConfigError(f"{path}: {name!r} is not a dotted import path of Python identifiers")
    rule = _check_target_name(name, path)
    module_name, attr = name.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{path}: cannot import module '{module_name}' of target '{name}' ({err})") from err
    if not hasattr(module, attr):
        raise ConfigError(f"{path}: module '{module_name}' has no attribute '{attr}' (target '{name}')")
    obj = getattr(module, attr)
    _check_target_object(obj, name, rule, path)
    return obj


def check_no_resolvers(value: Any, path: str = "") -> None:
    """ConfigError naming the key if a string in ``value`` (a config, unresolved) calls a
    resolver (``${oc.env:...}``, any ``${name:...}``); ``${other.key}`` is fine."""
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser as Grammar
    from omegaconf.grammar_parser import parse

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:  # ``path``: the key path so far, or a prefix "file: " (no dot after it)
        sub = f"[{key}]" if isinstance(key, int) else f".{key}" if path[-1:] not in ("", " ") else str(key)
        check_no_resolvers(item, path + sub)
    if not (isinstance(value, str) and "${" in value):
        return
    try:
        stack = [parse(value, parser_rule="configValue")]
    except Exception:  # GrammarParseError
        raise ConfigError(f"{path or 'config'}: malformed ${{...}} interpolation") from None
    while stack:  # the parse tree: a resolver's name may itself be an interpolation, so no regex
        node = stack.pop()
        if isinstance(node, Grammar.InterpolationResolverContext):
            raise ConfigError(f"{path or 'config'}: calls the resolver {node.resolverName().getText()!r}; a config "
                              "may not call resolvers, only refer to its own keys with ${other.key} (docs/models.md)")
        stack.extend(getattr(node, "children", None) or ())


def _as_dict(cfg: Any, path: str = "config") -> Any:
    if isinstance(cfg, (DictConfig, ListConfig)):
        check_no_resolvers(cfg, path)
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


def _target_nodes(value: Any, path: str) -> Iterator[tuple[str, Mapping]]:
    """The ``target`` nodes inside ``value`` (mappings and lists walked; a node's own params
    are left to the node), with their config paths."""
    if _is_target_node(value):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _target_nodes(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _target_nodes(item, f"{path}[{i}]")


def _check_all_target_names(cfg: Mapping, path: str) -> None:
    """Refuse a disallowed target string anywhere in the tree before importing anything."""
    target = cfg.get("target")
    if _is_dotted_name(target) and "." in target:
        _check_target_name(target, f"{path}.target")
    params = cfg.get("params")
    if isinstance(params, Mapping):
        for key, value in params.items():
            for sub_path, node in _target_nodes(value, f"{path}.params.{key}"):
                _check_all_target_names(node, sub_path)


def validate_target_config(cfg: Any, path: str = "config", allow_targets: Any = None) -> None:
    """Check a ``target``/``params`` node (and nested ones) against the allowlist and the
    target's signature.

    Every target string in the tree is checked against the allowlist (default list plus
    ``allow_targets`` plus those of an enclosing :func:`allowed_targets`) before any module
    is imported. Raises ConfigError naming the config path for a refused target, a missing
    ``target``, an unknown import, an unknown parameter or a missing required parameter.
    """
    with allowed_targets(allow_targets):
        cfg = _as_dict(cfg, path)
        if isinstance(cfg, Mapping):
            _check_all_target_names(cfg, path)
        _validate_node(cfg, path)


def _validate_node(cfg: Any, path: str) -> None:
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
        for sub_path, node in _target_nodes(value, f"{path}.params.{key}"):
            _validate_node(node, sub_path)


def validate_all_targets(value: Any, path: str = "config", allow_targets: Any = None) -> None:
    """:func:`validate_target_config` on every ``target`` node anywhere inside ``value``
    (e.g. a checkpoint's hyper-parameters), all target strings checked before any import."""
    with allowed_targets(allow_targets):
        value = _as_dict(value, path)
        nodes = list(_target_nodes(value, path))
        for sub_path, node in nodes:
            _check_all_target_names(node, sub_path)
        for sub_path, node in nodes:
            _validate_node(node, sub_path)


def instantiate_from_configs(cfg: Any, path: str = "config", allow_targets: Any = None, **extra: Any) -> Any:
    """Build ``target(**params, **extra)`` from a config node, after validating it.

    ``allow_targets`` (a run config's list of extra allowed prefixes) also holds for the
    configs that the target's constructor instantiates itself.
    """
    with allowed_targets(allow_targets):
        validate_target_config(cfg, path)
        cfg = _as_dict(cfg, path)
        params = dict(cfg.get("params") or {})
        params.update(extra)
        return get_obj_from_str(cfg["target"], f"{path}.target")(**params)


def _load_with_base(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:  # yaml's errors quote the file's text: keep only where the problem is
        cfg = OmegaConf.load(path)
    except Exception as err:
        where = f" at line {err.problem_mark.line + 1}" if getattr(err, "problem_mark", None) else ""
        raise ConfigError(f"{path}: not a readable YAML config ({type(err).__name__}{where})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: not a config: expected a mapping of sections, got a list")
    unknown = [str(k) for k in cfg if k not in (*RUN_SECTIONS, "base")]
    if unknown:  # a key is the file's text too: named only where it is a near miss of a section name
        near = [f"{k!r} (did you mean {m[0]!r}?)" for k in unknown if (m := get_close_matches(k, RUN_SECTIONS, 1, .75))]
        near += [f"{len(unknown) - len(near)} not shown (no section name is near)"] * (len(near) < len(unknown))
        raise ConfigError(f"{path}: unknown top-level keys: {', '.join(near)}; expected some of {list(RUN_SECTIONS)}")
    check_no_resolvers(cfg, f"{path}: ")
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    try:  # a base that is not a path, or a list merged onto a mapping: never quote the values
        return OmegaConf.merge(_load_with_base(path.parent / base, seen + (path,)), cfg)
    except TypeError:
        raise ConfigError(f"{path}: base: not the path of a config file, or a section of the base is a list "
                          "where this file has a mapping (or the other way round)") from None


def apply_overrides(cfg: DictConfig, overrides: Iterable[str]) -> DictConfig:
    """Apply ``key=value`` overrides in order; a value is parsed as YAML, a dict value
    is merged into the node, and an integer path part indexes a list
    (``evaluation.test_volumes.2.max_slices=4``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
            check_no_resolvers(value, key.strip())
            OmegaConf.update(cfg, key.strip(), value, merge=True)
        except Exception as err:  # omegaconf's errors name the node but not the override
            raise ConfigError(f"override '{item}': {str(err).splitlines()[0]}") from err
    return cfg


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> DictConfig:
    """Load a run config and apply ``key=value`` dotlist overrides.

    A top-level ``base: other.yaml`` (relative to the file) is loaded first and this file
    is merged on top of it. Unknown top-level sections are rejected so that a misspelt
    override such as ``trainr.max_steps=5`` fails instead of being silently ignored.
    """
    cfg = apply_overrides(_load_with_base(Path(path)), overrides)
    unknown = set(cfg) - set(RUN_SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; expected some of {list(RUN_SECTIONS)}")
    normalize_allow_targets(cfg.get("allow_targets"))
    return cfg
