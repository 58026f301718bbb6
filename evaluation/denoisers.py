"""Denoisers behind one interface, so the evaluation treats baselines and models alike.

A denoiser has a ``name`` and is called as ``denoiser(noisy01, sigma) -> pred01``:
noisy01 is one (H,W) float32 slice on the [0,1] scale (not clipped: noise may leave
[0,1]), sigma the Gaussian noise std on the [0,1] scale or None (then estimated from
the image with the wavelet estimate of noise_level.py where the method needs it), pred01 a
(H,W) float32 slice in [0,1]. ``denoise_with_std`` also returns a per-pixel std map
([0,1] units) when the method yields one (a diffusion model averaging several samples),
else None.

Two kinds of methods see more than the slice (``evaluation.loop.evaluate`` feeds them):
- ``context_slices = k > 0`` (a 2.5D model): noisy01 is the (1+2k, H, W) stack of the
  noisy slice and its k noisy neighbours on each side, in the order of
  ``diffusion_utils.context.context_indices`` ([z, z-k..z-1, z+1..z+k], reflected).
- ``volumetric = True`` (BM4D): ``denoise_volume(noisy (S,H,W), sigma) -> (S,H,W)``
  denoises a whole noisy stack (a test slab or an unseen volume) at once.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import numpy as np
from omegaconf import DictConfig, OmegaConf

from diffusion_modules.diffusion_utils.noise_level import estimate_noise_sigma, wavelet_sigma
from utils.intensity import from_model_units, to_model_units

DENOISER_TYPES = ("noisy", "nlm", "bm3d", "bm4d", "unet", "ddpm")
#: the slice sets a method may be restricted to (evaluation.reporting.SETS)
METHOD_SETS = ("same-subject", "unseen")
#: BM4D profiles: the package's "np" (default) and "refilter", and "lc" (its low-complexity profile)
BM4D_PROFILES = ("np", "refilter", "lc")


def volume_runs(scored, n_slices: int, max_slices: int | None) -> list[range]:
    """The runs of consecutive slices (positions 0..n_slices-1) a 3-D method denoises so
    that every scored position lies in one: the whole volume when ``max_slices`` is None or
    at least n_slices; else, per scored position, the max_slices slices centred on it
    (moved inside the volume), overlapping or touching windows merged into one run."""
    if max_slices is None or max_slices >= n_slices:
        return [range(n_slices)]
    windows = []
    for z in sorted(set(int(p) for p in scored)):
        start = min(max(z - (max_slices - 1) // 2, 0), n_slices - max_slices)
        if windows and start <= windows[-1][1]:
            windows[-1][1] = start + max_slices
        else:
            windows.append([start, start + max_slices])
    return [range(a, b) for a, b in windows]


def _check_slice(noisy01) -> np.ndarray:
    arr = np.asarray(noisy01, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"noisy01 must be one (H,W) slice, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("noisy01 contains NaN or inf values")
    return arr


def _check_stack(noisy01, depth: int | None = None) -> np.ndarray:
    """A (S,H,W) float32 stack of finite slices (S = depth when given)."""
    arr = np.asarray(noisy01, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] < 1 or (depth is not None and arr.shape[0] != depth):
        want = f"({depth},H,W)" if depth is not None else "(S,H,W)"
        raise ValueError(f"noisy01 must be a {want} stack of slices, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("noisy01 contains NaN or inf values")
    return arr


def _resolve_sigma(noisy01: np.ndarray, sigma) -> float:
    """The given sigma ([0,1] units), or the wavelet estimate of it when None."""
    if sigma is None:
        return wavelet_sigma(noisy01)
    sigma = float(sigma)
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a non-negative number or None, got {sigma}")
    return sigma


class Denoiser:
    """Base class: subclasses set ``name`` and implement ``__call__``."""

    name: str = "denoiser"
    #: noisy neighbours on each side of the slice the method takes (2.5D); 0: the slice alone
    context_slices: int = 0
    #: True: the loop calls denoise_volume on the whole noisy stack of a source (3-D)
    volumetric: bool = False
    #: a 3-D method sees at most this many slices around each scored slice (volume_runs); None: all
    max_slices: int | None = None
    #: the slice sets ("same-subject", "unseen") the method is scored on; None: all
    sets: tuple | None = None

    def __call__(self, noisy01: np.ndarray, sigma: float | None) -> np.ndarray:
        raise NotImplementedError

    def denoise_with_std(self, noisy01: np.ndarray, sigma: float | None):
        """(pred01, std01 or None); the base class has no std map."""
        return self(noisy01, sigma), None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class NoisyInput(Denoiser):
    """Identity: returns the noisy slice unchanged (not clipped), so its PSNR is the
    noise level itself (about -20 log10(sigma) dB for Gaussian noise)."""

    def __init__(self, name: str = "noisy input"):
        self.name = name

    def __call__(self, noisy01, sigma):
        return _check_slice(noisy01).copy()


class NLMDenoiser(Denoiser):
    """scikit-image non-local means with h = h_factor * sigma; output clipped to [0,1]."""

    def __init__(
        self,
        name: str = "NLM",
        h_factor: float = 0.8,
        patch_size: int = 5,
        patch_distance: int = 6,
        fast_mode: bool = True,
    ):
        self.name = name
        self.h_factor = float(h_factor)
        self.patch_size = int(patch_size)
        self.patch_distance = int(patch_distance)
        self.fast_mode = bool(fast_mode)

    def __call__(self, noisy01, sigma):
        from skimage.restoration import denoise_nl_means

        x = _check_slice(noisy01)
        s = _resolve_sigma(x, sigma)
        out = denoise_nl_means(
            x.astype(np.float64),
            h=self.h_factor * s,
            sigma=s,
            patch_size=self.patch_size,
            patch_distance=self.patch_distance,
            fast_mode=self.fast_mode,
        )
        return np.clip(out, 0.0, 1.0).astype(np.float32)


class BM3DDenoiser(Denoiser):
    """BM3D (``bm3d`` package) with sigma_psd = sigma; output clipped to [0,1]."""

    def __init__(self, name: str = "BM3D", profile: str = "np"):
        self.name = name
        self.profile = profile

    def __call__(self, noisy01, sigma):
        import bm3d

        x = _check_slice(noisy01)
        s = _resolve_sigma(x, sigma)
        out = bm3d.bm3d(x.astype(np.float64), sigma_psd=s, profile=self.profile)
        return np.clip(np.asarray(out), 0.0, 1.0).astype(np.float32)


class BM4DDenoiser(Denoiser):
    """BM4D (``bm4d`` package, by BM3D's authors) with sigma_psd = sigma, 3-D: the loop
    gives ``denoise_volume`` the whole noisy stack of a source (S,H,W); output clipped to
    [0,1]. BM4D's third axis is the slice axis; a stack of fewer than 5 slices takes its
    8x8x1 (2-D) blocks. Called on one slice it denoises that slice alone. profile: "np"
    (default), "refilter", or "lc" (low complexity: smaller search window and Wiener
    groups; "np" on stacks of fewer than 5 slices). sigma None: the median wavelet
    estimate over the slices (noise_level.estimate_noise_sigma). max_slices: the loop gives
    it at most that many slices around each scored slice (``volume_runs``; BM4D's cost
    grows with the voxels), None (default) the whole volume."""

    volumetric = True

    def __init__(self, name: str = "BM4D", profile: str = "np", max_slices: int | None = None):
        if profile not in BM4D_PROFILES:
            raise ValueError(f"bm4d profile must be one of {BM4D_PROFILES}, got {profile!r}")
        if max_slices is not None and (isinstance(max_slices, bool) or not isinstance(max_slices, int)
                                       or max_slices < 1):
            raise ValueError(f"bm4d max_slices must be an integer >= 1 or null, got {max_slices!r}")
        self.name = name
        self.profile = profile
        self.max_slices = max_slices

    def __call__(self, noisy01, sigma):
        return self.denoise_volume(_check_slice(noisy01)[None], sigma)[0]

    def denoise_volume(self, noisy01, sigma) -> np.ndarray:
        import bm4d
        from bm4d.profiles import BM4DProfileLC

        x = _check_stack(noisy01)
        s = estimate_noise_sigma(x) if sigma is None else _resolve_sigma(x[0], sigma)
        z = np.ascontiguousarray(np.moveaxis(x, 0, -1), dtype=np.float64)  # (H, W, S)
        profile = BM4DProfileLC() if self.profile == "lc" and z.shape[2] >= 5 else \
            ("np" if self.profile == "lc" else self.profile)
        out = np.asarray(bm4d.bm4d(z, sigma_psd=s, profile=profile)).reshape(z.shape)
        return np.clip(np.moveaxis(out, -1, 0), 0.0, 1.0).astype(np.float32)


class SigmaEstimating(Denoiser):
    """Wraps a denoiser so it never sees the true sigma: it gets None and estimates it
    (the 'noise level unknown' setting)."""

    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.name = inner.name
        self.context_slices = inner.context_slices
        self.volumetric, self.max_slices = inner.volumetric, inner.max_slices

    def __call__(self, noisy01, sigma):
        return self.inner(noisy01, None)

    def denoise_with_std(self, noisy01, sigma):
        return self.inner.denoise_with_std(noisy01, None)

    def denoise_volume(self, noisy01, sigma):
        return self.inner.denoise_volume(noisy01, None)


class ModelDenoiser(Denoiser):
    """Runs a model with ``model.denoise(noisy (1,1,H,W) in [-1,1], **denoise_kw)``.

    A 2.5D model (``model.context_slices = k > 0``) takes the (1+2k,H,W) noisy stack of
    ``context_indices`` order and gets it as (1,1+2k,H,W); it still returns (1,1,H,W).
    Maps [0,1] -> [-1,1] with 2x - 1, maps the result back with (y + 1) / 2 and clips
    to [0,1]. With ``t_start="auto"`` (the diffusion model's matched start) the noise
    level is passed as ``sigma`` ([0,1] units; estimated when None). When the model's
    ``denoise`` accepts ``return_std`` and ``n_samples >= 2``, ``denoise_with_std``
    also returns the spread of the samples in [0,1] units (model std / 2).
    The model is moved to ``device`` and put in eval mode.
    """

    def __init__(self, model, name: str, device: str = "cpu", **denoise_kw):
        if not callable(getattr(model, "denoise", None)):
            raise TypeError(f"model for {name!r} has no callable denoise() method")
        import torch

        self._torch = torch
        self.name = name
        self.device = torch.device(device)
        if hasattr(model, "to"):
            model = model.to(self.device)
        if hasattr(model, "eval"):
            model.eval()
        self.model = model
        self.context_slices = int(getattr(model, "context_slices", 0) or 0)
        if self.context_slices < 0:
            raise ValueError(f"{name!r}: model.context_slices must be >= 0, got {self.context_slices}")
        self.denoise_kw = dict(denoise_kw)
        params = inspect.signature(model.denoise).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = set(self.denoise_kw) - set(params)
        if unknown and not takes_any:
            raise TypeError(f"{name!r}: model.denoise() takes no argument(s) {sorted(unknown)}")
        self.gives_std = "return_std" in params and int(self.denoise_kw.get("n_samples", 1)) >= 2

    def __call__(self, noisy01, sigma):
        return self._run(noisy01, sigma, want_std=False)[0]

    def denoise_with_std(self, noisy01, sigma):
        return self._run(noisy01, sigma, want_std=self.gives_std)

    def _run(self, noisy01, sigma, want_std: bool):
        torch = self._torch
        k = self.context_slices
        x = _check_slice(noisy01) if k == 0 else _check_stack(noisy01, 1 + 2 * k)
        first = x if k == 0 else x[0]  # the slice being denoised
        kw = dict(self.denoise_kw)
        if kw.get("t_start") == "auto":
            kw["sigma"] = _resolve_sigma(first, sigma)
        if want_std:
            kw["return_std"] = True
        tensor = torch.from_numpy(to_model_units(x))
        tensor = tensor[None] if k else tensor[None, None]  # (1, 1+2k, H, W)
        with torch.no_grad():
            out = self.model.denoise(tensor.to(self.device), **kw)
        mean, std = out if want_std else (out, None)
        if tuple(mean.shape) != (1, 1) + first.shape:
            raise ValueError(
                f"{self.name}: model.denoise returned shape {tuple(mean.shape)}, "
                f"expected {(1, 1) + first.shape}"
            )
        pred01 = np.clip(from_model_units(mean[0, 0].float().cpu().numpy()), 0.0, 1.0)
        std01 = None if std is None else std[0, 0].float().cpu().numpy() / 2.0
        return pred01.astype(np.float32), std01


def plain_dict(cfg) -> dict:
    """A config entry (dict or OmegaConf node) as a plain dict."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise ValueError(f"denoiser config must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def _check_model_kind(name: str, kind: str, key: str, model) -> None:
    """ValueError when a method of type ``ddpm`` gets one of our U-Nets or ``unet`` one of our
    DDPMs (``--model KEY=PATH`` loads either), before any slice is scored."""
    from models.ddpm_conditioned import ConditionDDPM
    from models.supervised_unet import SupervisedUNet

    wanted = {"ddpm": ConditionDDPM, "unet": SupervisedUNet}[kind]
    if isinstance(model, (ConditionDDPM, SupervisedUNet)) and not isinstance(model, wanted):
        raise ValueError(f"denoiser {name!r} (type {kind}) needs a {wanted.__name__}; the {key!r} model is a "
                         f"{type(model).__name__}")


def build_denoiser(cfg, models: dict, device: str = "cpu") -> Denoiser:
    """Builds a denoiser from a config entry.

    cfg: {name: str, type: noisy|nlm|bm3d|bm4d|unet|ddpm, model: key, params: {...}, sigma: known|estimate,
      sets: [same-subject, unseen]}
      ``model`` names the entry of ``models`` to use (default: the type), e.g. a shipped
      pretrained DDPM next to the one just trained.
      params go to the constructor (nlm, bm3d, bm4d, noisy: none) or, for unet/ddpm, to
      ``model.denoise`` (e.g. sampler, steps, eta, n_samples, t_start). sigma (default
      "known") = "estimate" hides the true noise level from the method. sets (default both)
      lists the slice sets the method is scored on (e.g. an expensive method on ``unseen`` only).
    models: maps model keys ("unet", "ddpm", ...) to loaded objects with a ``denoise`` method.
    device: where model-based denoisers run.
    """
    entry = plain_dict(cfg)
    unknown = set(entry) - {"name", "type", "model", "params", "sigma", "sets"}
    if unknown:
        raise ValueError(f"denoiser config has unknown keys {sorted(unknown)}: {entry}")
    kind = entry.get("type")
    if kind not in DENOISER_TYPES:
        raise ValueError(f"denoiser type must be one of {DENOISER_TYPES}, got {kind!r}")
    name = str(entry.get("name") or kind)
    params = dict(entry.get("params") or {})
    sigma_mode = entry.get("sigma", "known")
    if sigma_mode not in ("known", "estimate"):
        raise ValueError(f"denoiser {name!r}: sigma must be 'known' or 'estimate', got {sigma_mode!r}")
    try:
        if kind in ("unet", "ddpm"):
            key = entry.get("model", kind)
            model = models.get(key)
            if model is None:
                raise ValueError(f"denoiser {name!r} needs the {key!r} model, none was given")
            _check_model_kind(name, kind, key, model)
            denoiser = ModelDenoiser(model, name, device=device, **params)
        else:
            cls = {"noisy": NoisyInput, "nlm": NLMDenoiser, "bm3d": BM3DDenoiser, "bm4d": BM4DDenoiser}[kind]
            denoiser = cls(name=name, **params)
    except TypeError as err:
        raise ValueError(f"denoiser {name!r} ({kind}): bad params {params}: {err}") from err
    denoiser = SigmaEstimating(denoiser) if sigma_mode == "estimate" else denoiser
    if entry.get("sets") is not None:
        sets = entry["sets"]
        if isinstance(sets, str) or not sets or any(x not in METHOD_SETS for x in sets):
            raise ValueError(f"denoiser {name!r}: sets must be a non-empty list of {METHOD_SETS}, got {sets!r}")
        denoiser.sets = tuple(sets)
    return denoiser
