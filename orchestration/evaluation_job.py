"""From a run config to the evaluation: test slices of the data module, denoisers, ``evaluate``."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from metrics.denoisers import build_denoiser, plain_dict
from metrics.evaluation import evaluate
from utils.initialize_configs import instantiate_from_configs


def limit_slices(slices, max_per_source):
    """At most max_per_source slices of each source, evenly spaced over its slices in
    the given order (None: all)."""
    if max_per_source is None:
        return list(slices)
    max_per_source = int(max_per_source)
    if max_per_source < 1:
        raise ValueError(f"max_slices_per_source must be >= 1 or null, got {max_per_source}")
    by_source = {}
    for i, s in enumerate(slices):
        by_source.setdefault(s["source"], []).append(i)
    keep = set()
    for numbers in by_source.values():
        pos = np.unique(np.round(np.linspace(0, len(numbers) - 1, min(max_per_source, len(numbers)))))
        keep.update(numbers[int(p)] for p in pos)
    return [s for i, s in enumerate(slices) if i in keep]


def evaluation_levels(ev) -> list:
    """The noise levels of an ``evaluation`` section: ``levels`` if set, else ``sigmas``
    (a config based on a Gaussian one may set ``levels`` alone; both set and different
    warns)."""
    levels, sigmas = ev.get("levels"), ev.get("sigmas")
    if levels is None and sigmas is None:
        raise ValueError("config evaluation section lacks 'levels' (or 'sigmas')")
    if levels is not None and sigmas is not None and list(levels) != list(sigmas):
        warnings.warn(f"evaluation.levels {list(levels)} is used, evaluation.sigmas {list(sigmas)} is ignored")
    return list(sigmas if levels is None else levels)


def run_evaluation(cfg, models: dict, *, out_dir, device: str | None = None) -> dict:
    """Config -> test slices -> denoisers -> ``evaluate``.

    cfg: run config with ``data`` ({target, params} of the data module) and
      ``evaluation``: levels or sigmas (list of noise levels: sigma on [0,1] for
      gaussian/rician, i0 photons for lowdose_ct; ``levels`` wins when both are set),
      noise_seed, max_slices_per_source (int|null), methods (list of {name, type, params,
      sigma}), n_examples, and optionally noise_type ("gaussian"), noise_params (other
      noise model parameters, e.g. {n_angles: 180}) and save_predictions (true).
    sampling: defaults for every ddpm method's ``denoise`` arguments (a method's own
      params win).
    models: loaded models by key ("ddpm", "unet", "ddpm_pretrained", ...); methods whose
      model is missing or None are skipped with a warning.
    device: where models run (default cuda if available, else cpu).
    """
    ev = cfg.get("evaluation") if hasattr(cfg, "get") else None
    if ev is None:
        raise ValueError("config has no 'evaluation' section")
    levels = evaluation_levels(ev)
    if ev.get("methods") is None:
        raise ValueError("config evaluation section lacks 'methods'")
    if cfg.get("data") is None:
        raise ValueError("config has no 'data' section")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    datamodule = instantiate_from_configs(cfg["data"], "data", allow_targets=cfg.get("allow_targets"))
    datamodule.prepare_data()
    datamodule.setup("test")
    slices = limit_slices(datamodule.test_slices(), ev.get("max_slices_per_source"))

    sampling = plain_dict(cfg.get("sampling") or {})
    denoisers = []
    for entry in ev["methods"]:
        kind = entry.get("type")
        key = entry.get("model", kind)
        if kind in ("ddpm", "unet") and models.get(key) is None:
            warnings.warn(f"skipping method {entry.get('name')!r}: no {key!r} model given")
            continue
        if kind == "ddpm":
            entry = {**entry, "params": {**sampling, **(entry.get("params") or {})}}
        denoisers.append(build_denoiser(entry, models, device=device))

    return evaluate(
        denoisers,
        slices,
        levels,
        out_dir,
        noise_seed=int(ev.get("noise_seed", 0)),
        noise_type=str(ev.get("noise_type", "gaussian")),
        save_predictions=bool(ev.get("save_predictions", True)),
        n_examples=int(ev.get("n_examples", 1)),
        noise_params=plain_dict(ev.get("noise_params") or {}),
    )
