"""The conditioning / guidance study (issue 10, docs/STUDY.md): train or load the models
of each strategy, score every configuration on every noise type, compare per slice.

A study config (run_scripts/configs/study/*.yaml) has these keys:

- ``run``: a run config whose ``data`` (training volumes and split), ``seed`` and
  ``evaluation`` (test_volumes, max_slices_per_source, noise_seed) the study uses.
- ``evaluation``: keys merged over the run's ``evaluation`` section (test_volumes,
  max_slices_per_source, noise_seed); levels, noise type and methods come from below.
- ``train_overrides``: dotlist overrides applied to every model trained here (steps,
  UNet width ...), so all strategies share one backbone and one training budget.
- ``models``: key -> ``{config: run config, overrides: [...]}`` to train here, or
  ``{ckpt: path}`` to load (class from the checkpoint).
- ``strategies``: list of ``{name, type: ddpm|unet|nlm|bm3d|bm4d|noisy, model, params, nfe,
  k, guidance, extra_nfe}``; ``params`` are the only ``denoise()`` arguments (the run
  config's ``sampling`` defaults are not used, so no ``t_start`` means the pure-noise
  start); a ddpm strategy expands into one method per (NFE, K,
  guidance scale). ``nfe`` are network evaluations per sample: DDIM ``steps = nfe -
  extra_nfe`` (``extra_nfe: 1`` for the first estimate of ``start_noise: independent``).
  K > 1 averages K samples drawn with ``k_params`` (default eta 1).
- ``noise``: list of ``{type, levels, noise_params, volumes, train_noise}``; ``volumes``
  replaces the data volumes whose test slabs are scored (e.g. CT only for lowdose_ct);
  with ``train_noise`` the trained models are retrained on that noise (and those volumes)
  for this noise type, else the models trained on the run's own noise are scored.
- ``references``: method names every method is compared to (e.g. BM3D, BM4D, the U-Net).
  A ``bm4d`` strategy denoises each source's whole test slab (or unseen volume) in 3-D and
  is scored on the same slices, so it can be the reference of a 2.5D model.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from evaluation.reporting import atomic_text, plot_vs_level
from evaluation.study_tables import (PRIMARY, SCORE_LABELS, comparisons, plot_vs_nfe, read_scores, strategy_curves,
                                     study_markdown, write_comparisons_csv)
from orchestration.checkpoints import checkpoint_model_class, load_checkpoint, read_checkpoint
from orchestration.config_checks import check_run_config
from orchestration.evaluation_job import run_evaluation
from orchestration.training import save_config, train
from utils.initialize_configs import ConfigError, apply_overrides, load_config
from utils.paths import resolve_path

STUDY_KEYS = ("run", "evaluation", "train_overrides", "models", "strategies", "noise", "references", "k_params", "seed")
STRATEGY_KEYS = ("name", "type", "model", "params", "nfe", "k", "guidance", "extra_nfe")
NOISE_KEYS = ("type", "levels", "train_noise", "volumes", "noise_params")


def _check_keys(entry, allowed, where: str) -> dict:
    entry = OmegaConf.to_container(entry, resolve=True) if not isinstance(entry, dict) else dict(entry)
    unknown = set(entry) - set(allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; expected some of {list(allowed)}")
    return entry


def expand_strategies(strategies, k_params: dict) -> tuple[list[dict], dict]:
    """(evaluation method entries, method name -> {strategy, nfe, k, guidance}) of the
    strategy list; one ddpm method per (NFE, K, guidance scale)."""
    methods, info = [], {}
    for i, raw in enumerate(strategies):
        s = _check_keys(raw, STRATEGY_KEYS, f"strategies[{i}]")
        name, kind = s.get("name"), s.get("type", "ddpm")
        if not name:
            raise ConfigError(f"strategies[{i}]: needs a name")
        base = {"name": name, "type": kind, **({"model": s["model"]} if s.get("model") else {})}
        if kind != "ddpm":
            methods.append({**base, "params": s.get("params") or {}})
            info[name] = {"strategy": name, "nfe": None, "k": 1, "guidance": None, "diffusion": False}
            continue
        extra = int(s.get("extra_nfe", 0))
        for nfe in s.get("nfe") or [10]:
            steps = int(nfe) - extra
            if steps < 1:
                continue  # e.g. NFE 1 with a first-estimate call: no step left
            for k in s.get("k") or [1]:
                if int(k) > 1 and steps < 2:
                    continue  # one step straight to x0: K samples would be K copies
                for g in s.get("guidance") or [None]:
                    params = {**(s.get("params") or {}), "steps": steps}
                    if g is not None:
                        params["guidance_scale"] = float(g)
                    label = f"{name} | NFE {nfe}"
                    if int(k) > 1:
                        params.update({**k_params, "n_samples": int(k)})
                        label += f" | K {k}"
                    if g is not None:
                        label += f" | s {g:g}"
                    methods.append({**base, "name": label, "params": params})
                    info[label] = {"strategy": name, "nfe": int(nfe), "k": int(k),
                                   "guidance": None if g is None else float(g), "diffusion": True}
    names = [m["name"] for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"strategies: method names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    return methods, info


def _model_run_config(entry: dict, run_cfg, overrides, noise: dict | None, key: str):
    """The run config that trains model ``key``: its own config with the overrides, the data
    and seed of the study's run config, the overrides of ``data.*`` applied again on top (they
    were lost with the model config's data section), and the noise entry's training noise."""
    overrides = list(overrides) + list(entry.get("overrides") or [])
    cfg = load_config(resolve_path(entry["config"]), overrides)
    cfg.data, cfg.seed = run_cfg.data, run_cfg.get("seed", 0)
    cfg = apply_overrides(cfg, [o for o in overrides if o.split("=", 1)[0].strip().startswith("data.")])
    cfg.evaluation = {"enabled": False}
    cfg.logging = OmegaConf.merge(cfg.get("logging", {}), {"name": key, "logger": "csv"})
    if noise and noise.get("train_noise"):
        cfg.data.params.noise = noise["train_noise"]
    if noise and noise.get("volumes"):
        cfg.data.params.volumes = noise["volumes"]
    return cfg


def build_models(study: dict, run_cfg, out_dir: Path, noise: dict | None, cache: dict) -> dict:
    """Model key -> model, trained under out_dir/models/ (once per training noise) or loaded."""
    models = {}
    for key, raw in (study.get("models") or {}).items():
        entry = _check_keys(raw, ("config", "overrides", "ckpt"), f"models.{key}")
        if entry.get("ckpt"):
            path = resolve_path(entry["ckpt"])
            if not path.is_file():
                raise FileNotFoundError(f"models.{key}: checkpoint not found: {path}")
            cls = checkpoint_model_class(read_checkpoint(path, path).get("hyper_parameters") or {})
            models[key] = load_checkpoint(cls, path, allow_targets=run_cfg.get("allow_targets"))
            continue
        if not entry.get("config"):
            raise ConfigError(f"models.{key}: needs `config` (a run config to train) or `ckpt`")
        train_noise = (noise or {}).get("train_noise")
        volumes = (noise or {}).get("volumes") if train_noise else None
        tag = json.dumps([key, train_noise, volumes], sort_keys=True, default=str)
        if tag not in cache:
            cfg = _model_run_config(entry, run_cfg, study.get("train_overrides") or [],
                                    noise if train_noise else None, key)
            check_run_config(cfg)
            run_dir = out_dir / "models" / (key if not train_noise else f"{key}-{noise['type']}")
            run_dir.mkdir(parents=True, exist_ok=True)
            model, _, _ = train(cfg, run_dir)
            cache[tag] = model.eval()
        models[key] = cache[tag]
    return models


def load_study_config(path, overrides=()) -> dict:
    """The study config as a plain dict, every key checked."""
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"study config not found: {path}")
    cfg = OmegaConf.load(path)
    cfg = apply_overrides(cfg, overrides)
    study = _check_keys(cfg, STUDY_KEYS, str(path))
    for key in ("run", "strategies", "noise"):
        if not study.get(key):
            raise ConfigError(f"{path}: needs `{key}`")
    for i, n in enumerate(study["noise"]):
        _check_keys(n, NOISE_KEYS, f"noise[{i}]")
    return study


def run_study(study: dict, out_dir: Path, device: str | None = None) -> dict:
    """Train / load, evaluate each noise type, write study.md, comparisons.csv, the
    figures and the resolved study config into out_dir. Returns the paths written."""
    out_dir = Path(out_dir)
    run_cfg = load_config(resolve_path(study["run"]))
    if "seed" in study:
        run_cfg.seed = study["seed"]
    if study.get("evaluation"):
        run_cfg = OmegaConf.merge(run_cfg, {"evaluation": study["evaluation"]})
    check_run_config(run_cfg)
    methods, info = expand_strategies(study["strategies"], study.get("k_params") or {"eta": 1.0})
    references = list(study.get("references") or [])
    missing = [r for r in references if r not in info]
    if missing:
        raise ConfigError(f"references {missing} are not strategy names ({list(info)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_text(out_dir / "study_config.yaml", OmegaConf.to_yaml(OmegaConf.create(study)))
    cache, rows, noise_types = {}, [], []
    for noise in study["noise"]:
        models = build_models(study, run_cfg, out_dir, noise, cache)
        cfg = OmegaConf.merge(run_cfg, {"sampling": None}, {"evaluation": {
            "levels": list(noise["levels"]), "noise_type": noise["type"], "methods": methods,
            "noise_params": noise.get("noise_params"), "save_predictions": False, "n_examples": 0,
            "enabled": True}})
        cfg.evaluation.pop("sigmas", None)
        if noise.get("volumes"):
            cfg.data.params.volumes = noise["volumes"]
        check_run_config(cfg)
        noise_dir = out_dir / noise["type"]
        noise_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, noise_dir / "run_config.yaml")
        result = run_evaluation(cfg, models, out_dir=out_dir / noise["type"], device=device)
        rows += read_scores(result["scores_csv"])
        noise_types.append(noise["type"])
    comps = comparisons(rows, info, references)
    diffusion = {v["strategy"] for v in info.values() if v["diffusion"]}
    header = ("# Study results\n\nWritten by `run_scripts/study.py`; study config: `study_config.yaml`. "
              "Per-slice scores: `<noise type>/scores.csv`; every paired comparison: `comparisons.csv`.\n")
    paths = {"comparisons_csv": write_comparisons_csv(out_dir / "comparisons.csv", comps)}
    for noise_type in noise_types:
        paths[f"level_{noise_type}"] = plot_vs_level(
            out_dir / f"psnr_vs_level_{noise_type}.png", strategy_curves(rows, info, noise_type),
            {score: SCORE_LABELS[score] for score in PRIMARY[noise_type]}, noise_type,
            title=f"{noise_type}: best configuration of each strategy")
        paths[f"nfe_{noise_type}"] = plot_vs_nfe(out_dir / f"psnr_vs_nfe_{noise_type}.png", rows, info, noise_type)
    paths["study_md"] = atomic_text(out_dir / "study.md", study_markdown(rows, info, comps, noise_types, diffusion,
                                                                         references, header))
    return paths
