"""The reverse process as plain functions of a network ``model_fn(x_t, t)``.

EDM's split: the network (with its condition, guidance and EMA weights already chosen by the
caller) comes in as ``model_fn``, the math (schedule, parameterization, posterior) from
``GaussianDiffusion``; this module only walks the chain. Each step returns the previous
sample and the predicted x0, like diffusers' ``scheduler.step()``. Images are in model units
[-1, 1]; timesteps are integers 0..T-1 (t=0 least noisy; t_prev=-1 is the clean end).

- ``ddim_timesteps``: the timesteps a DDIM chain visits (uniform, quad or trailing spacing).
- ``matched_timestep``: the t* whose noise level matches a noisy image's sigma.
- ``matched_start``: x_t* from the noisy image (its own noise, or fresh noise around x0_hat).
- ``capped_steps``: a chain from t* has at most t*+1 DDIM steps.
- ``ancestral_step`` / ``ddim_step`` and ``run_chain``, which runs either sampler.
- ``SamplingOptions``: the typed options of ``denoise()`` and of a config's ``sampling``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Callable, Mapping

import numpy as np
import torch

from diffusion_modules.diffusion_utils.gaussian_diffusion import GaussianDiffusion
from diffusion_modules.diffusion_utils.inference import InferenceOptions
from utils.config_keys import NUMBER, check_keys
from utils.initialize_configs import ConfigError

#: ``model_fn(x_t, t)``: the raw network output for x_t at timesteps t (long, shape (B,)).
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = ("ddpm", "ddim")
SPACINGS = ("uniform", "quad", "trailing")
#: "condition": x_t* = sqrt(a_bar*) y (the noise of y itself); "independent": fresh noise
#: around the model's x0 estimate at (sqrt(a_bar*) y, t*).
START_NOISES = ("condition", "independent")
#: DDIM steps when none are given.
DEFAULT_DDIM_STEPS = 50


def ddim_timesteps(steps: int, t_start: int, spacing: str = "uniform") -> list[int]:
    """Strictly decreasing timesteps, the first being ``t_start``.

    ``uniform`` spreads them evenly down to 0, ``quad`` packs them quadratically near 0,
    ``trailing`` takes every (t_start+1)/steps-th step counted from t_start (it ends
    above 0 unless steps = t_start+1).
    """
    if not 1 <= steps <= t_start + 1:
        raise ValueError(f"steps must lie in [1, {t_start + 1}] when starting at t={t_start}, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing '{spacing}' unknown; expected one of {SPACINGS}")
    if steps == 1:
        return [t_start]
    if spacing == "uniform":
        ts = np.round(np.linspace(t_start, 0, steps)).astype(int)
    elif spacing == "quad":
        ts = np.round(t_start * np.linspace(1, 0, steps) ** 2).astype(int)
    else:
        ts = t_start - np.floor(np.arange(steps) * (t_start + 1) / steps).astype(int)
    # Rounding can collide at dense ends: push each step strictly below its predecessor,
    # then keep every step at least as high as the number of steps still to come.
    ts = list(ts)
    for i in range(1, steps):
        ts[i] = min(ts[i], ts[i - 1] - 1)
    for i in range(steps - 1, -1, -1):
        ts[i] = max(ts[i], steps - 1 - i, ts[i + 1] + 1 if i + 1 < steps else 0)
    return [int(t) for t in ts]


def matched_timestep(diffusion: GaussianDiffusion, sigma: float, top: int | None = None) -> int:
    """t* for a noisy image y = x0 + sigma n on the [0, 1] scale (2 sigma in model units):
    the timestep whose sqrt((1 - a_bar) / a_bar) is closest to 2 sigma, at most ``top``
    (default T-1; a model trained up to ``max_train_timestep`` passes that), with a warning
    when sigma lies beyond the noise level of ``top``."""
    sigma = float(sigma)
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite noise std >= 0 on the [0, 1] scale, got {sigma}")
    top = diffusion.num_timesteps - 1 if top is None else int(top)
    top_sigma = float(diffusion.sqrt_recipm1_alphas_cumprod[top]) / 2
    if sigma > top_sigma:
        warnings.warn(f"sigma={sigma:g} lies beyond the largest noise level this model was trained on "
                      f"({top_sigma:.3g} on the [0, 1] scale, t={top}); expect a poor result")
    return min(diffusion.noise_to_timestep(2.0 * sigma), top)


def capped_steps(sampler: str, steps: int | None, t_start: int | None) -> int | None:
    """DDIM steps of a chain from ``t_start``: at most t_start + 1 (with a warning when more
    were asked for); ``steps`` unchanged from pure noise or for the ancestral sampler."""
    if t_start is None or sampler != "ddim":
        return steps
    if (DEFAULT_DDIM_STEPS if steps is None else steps) <= t_start + 1:
        return steps
    if steps is not None:
        warnings.warn(f"steps={steps} capped at {t_start + 1}: a chain starting at t={t_start} has no more steps")
    return t_start + 1


def matched_start(diffusion: GaussianDiffusion, y: torch.Tensor, t_star: int, start_noise: str = "condition",
                  model_fn: ModelFn | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t* from the noisy image y (model units): sqrt(a_bar*) y, which carries y's own noise;
    or with ``start_noise="independent"`` sqrt(a_bar*) x0_hat + sqrt(1 - a_bar*) eps, x0_hat
    the clipped x0 that ``model_fn`` predicts at (sqrt(a_bar*) y, t*) and eps ~ N(0, I)."""
    if start_noise not in START_NOISES:
        raise ValueError(f"start_noise '{start_noise}' unknown; expected one of {START_NOISES}")
    x = diffusion.sqrt_alphas_cumprod[t_star] * y
    if start_noise == "condition":
        return x
    tt = torch.full((y.shape[0],), t_star, device=y.device, dtype=torch.long)
    x0_hat, _ = diffusion.predict_start(x, tt, model_fn(x, tt), clip=True)
    eps = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    return diffusion.q_sample(x0_hat, tt, eps)


def ancestral_step(diffusion: GaussianDiffusion, model_output: torch.Tensor, t: int, x_t: torch.Tensor,
                   clip: bool, generator: torch.Generator | None = None):
    """One ancestral DDPM step x_t -> x_{t-1} through q(x_{t-1} | x_t, x0_pred); returns
    (x_prev, x0_pred). The step to t = -1 adds no noise."""
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    x0, _ = diffusion.predict_start(x_t, tt, model_output, clip)
    mean, _, log_var = diffusion.q_posterior(x0, x_t, tt)
    if t == 0:
        return mean, x0
    noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return mean + (0.5 * log_var).exp() * noise, x0


def ddim_step(diffusion: GaussianDiffusion, model_output: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor,
              eta: float, clip: bool, generator: torch.Generator | None = None):
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021); returns (x_prev, x0_pred).
    ``clip`` clamps x0 to [-1, 1] and recomputes eps from it; t_prev = -1 is the clean end
    (alpha_bar = 1); ``eta`` 0 is deterministic, 1 ancestral-like."""
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    x0, eps = diffusion.predict_start(x_t, tt, model_output, clip)
    a_t, a_prev = diffusion.alpha_bar(t), diffusion.alpha_bar(t_prev)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return x_prev, x0


def check_sampler(sampler: str, steps: int | None, eta: float | None, spacing: str | None) -> None:
    """Refuse an unknown sampler, and DDIM-only options given to the ancestral sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler '{sampler}' unknown; expected one of {SAMPLERS}")
    if sampler == "ddpm":
        given = [name for name, value in (("steps", steps), ("eta", eta), ("spacing", spacing)) if value is not None]
        if given:
            raise ValueError(f"sampler='ddpm' runs every timestep and takes no {', '.join(given)}; "
                             "use sampler='ddim' to choose them")
    elif eta is not None and not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: ancestral-like), got {eta}")


@torch.no_grad()
def run_chain(model_fn: ModelFn, diffusion: GaussianDiffusion, x_T: torch.Tensor, *, sampler: str = "ddim",
              steps: int | None = None, eta: float | None = None, spacing: str | None = None,
              t_start: int | None = None, clip: bool = True,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The reverse process from ``x_T`` at ``t_start`` (default T-1) to x_0.

    ``sampler="ddpm"``: ancestral, every timestep (t_start + 1 network calls); it takes no
    steps, eta or spacing. ``sampler="ddim"``: ``steps`` network calls (default 50), ``eta``
    in [0, 1] (default 0), ``spacing`` uniform|quad|trailing (default uniform).
    """
    check_sampler(sampler, steps, eta, spacing)
    t_start = diffusion.num_timesteps - 1 if t_start is None else int(t_start)
    x = x_T
    if sampler == "ddpm":
        for t in range(t_start, -1, -1):
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x, _ = ancestral_step(diffusion, model_fn(x, tt), t, x, clip, generator)
        return x
    ts = ddim_timesteps(DEFAULT_DDIM_STEPS if steps is None else steps, t_start, spacing or "uniform")
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x, _ = ddim_step(diffusion, model_fn(x, tt), t, t_prev, x, 0.0 if eta is None else eta, clip, generator)
    return x


@dataclass(frozen=True)
class SamplingOptions:
    """How a diffusion model denoises: the ``sampling`` section of a run config, a method's
    ``params`` in ``evaluation.methods``, and the keywords of ``DDPM.denoise`` /
    ``ConditionDDPM.denoise`` (``model.denoise(noisy, **options.as_kwargs(), sigma=...)``).

    sampler "ddim" | "ddpm"; steps, eta, spacing (DDIM only; None: 50, 0, uniform); t_start
    None (pure noise), an int, or "auto" (the matched t* of the image's sigma); guidance_scale
    (conditional models trained with condition dropout); n_samples averaged per image;
    start_noise "condition" | "independent"; batch_size images per network batch; inference
    how the network runs (``InferenceOptions``: precision, channels_last, compile,
    cuda_graphs; None: float32 eager), given as a mapping in a config and to ``denoise()``.
    """

    sampler: str = "ddim"
    steps: int | None = None
    eta: float | None = None
    spacing: str | None = None
    t_start: int | str | None = None
    guidance_scale: float = 1.0
    n_samples: int = 1
    start_noise: str = "condition"
    batch_size: int = 16
    inference: InferenceOptions | None = None

    #: accepted types of each field in a config (None: null allowed)
    TYPES = {"sampler": (str,), "steps": (int, None), "eta": (*NUMBER, None), "spacing": (str, None),
             "t_start": (int, str, None), "guidance_scale": NUMBER, "n_samples": (int,), "start_noise": (str,),
             "batch_size": (int,), "inference": (dict, InferenceOptions, None)}

    def __post_init__(self):
        check_sampler(self.sampler, self.steps, self.eta, self.spacing)
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"spacing '{self.spacing}' unknown; expected one of {SPACINGS}")
        if self.start_noise not in START_NOISES:
            raise ValueError(f"start_noise '{self.start_noise}' unknown; expected one of {START_NOISES}")
        if isinstance(self.t_start, str) and self.t_start != "auto":
            raise ValueError(f"t_start must be null, an int or 'auto', got {self.t_start!r}")
        for name in ("n_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        object.__setattr__(self, "inference", InferenceOptions.coerce(self.inference))

    @classmethod
    def from_mapping(cls, values: Mapping | None, path: str = "sampling") -> "SamplingOptions":
        """Options from a config section; an unknown key or a wrong type is a ConfigError
        naming ``path.key``, a bad value a ValueError naming ``path``."""
        values = dict(values or {})
        if isinstance(values.get("inference"), Mapping):  # e.g. an OmegaConf node of a merged config
            values["inference"] = dict(values["inference"])
        check_keys(values, [f.name for f in fields(cls)], cls.TYPES, path)
        if "inference" in values:
            values["inference"] = InferenceOptions.coerce(values["inference"], f"{path}.inference")
        try:
            return cls(**values)
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from err

    def updated(self, values: Mapping | None, path: str = "sampling") -> "SamplingOptions":
        """These options with the keys of ``values`` replaced (checked like ``from_mapping``);
        an ``inference`` mapping is merged key by key over this one's."""
        base, values = self.as_kwargs(), dict(values or {})
        if isinstance(values.get("inference"), Mapping) and base["inference"] is not None:
            values["inference"] = {**base["inference"], **values["inference"]}
        return type(self).from_mapping({**base, **values}, path)

    def as_kwargs(self) -> dict:
        """The keywords of ``denoise()``, plain values only (``inference`` as a mapping or None)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.inference is not None:
            kwargs["inference"] = self.inference.as_mapping()
        return kwargs
