"""Noise models on images scaled to [0,1] (numpy).

Every model is called as ``noise(clean01, rng) -> (noisy01 float32, sigma_used float)``:
clean01 is a float array in [0,1], rng a ``np.random.Generator``; noisy01 is NOT clipped;
sigma_used is the (Gaussian-equivalent) noise std on the [0,1] scale. Gaussian draws are
float64 (``rng.standard_normal(shape) * sigma``, added to the slice in float64, then cast
to float32), so training, validation and the evaluation (evaluation.loop) draw the same
noise from the same generator. Each class names its level parameter in ``level``
("sigma" or "i0"); ``noise_at_level`` builds a model at one fixed level.

- GaussianNoise(sigma | variance): additive N(0, sigma^2); sigma is a std on [0,1] images,
  variance = sigma^2 (the seed code's wording). Either may be a [lo, hi] range, sampled
  uniformly per call (variance ranges are sampled uniformly in sigma).
- RicianNoise(sigma): MR magnitude noise sqrt((x + n1)^2 + n2^2), n1, n2 ~ N(0, sigma^2);
  the background (x = 0) then has mean sigma * sqrt(pi/2).
- LowDoseCTNoise(i0, pixel_mm, norm): projection-domain low-dose CT. The [0,1] slice is
  mapped to HU with ``norm``, to attenuation mu = 0.0192 * (1 + HU/1000) per mm, forward
  projected (skimage radon, n_angles over 180 degrees, times pixel_mm), photon counts
  drawn ~ Poisson(i0 * exp(-line integral)), turned back into line integrals with
  -log(max(counts, 1) / i0); the difference to the noiseless line integrals is
  reconstructed with filtered back projection (ramp filter) and added to the slice.
  i0 is photons per detector bin (fewer photons: more noise); about 1.1 s per 256x256
  slice with 360 angles. Works on whole slices, not patches.

``build_noise(cfg)`` builds a model from {"type": "gaussian"|"rician"|"lowdose_ct", ...}.
"""

import math

import numpy as np

from utils.intensity import CT_WINDOW_HU, to_physical

MU_WATER_PER_MM = 0.0192


def _level(value, name: str):
    """Validate a noise level: a non-negative float or a [lo, hi] range with 0 <= lo <= hi."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"noise level {name}={value} must be a finite number >= 0")
        return float(value)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"noise level {name}={value!r} must be a number or a [lo, hi] pair") from err
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi < lo:
        raise ValueError(f"noise level range {name}={value!r} must satisfy 0 <= lo <= hi")
    return (lo, hi)


def _draw(level, rng: np.random.Generator) -> float:
    """A fixed level, or one drawn uniformly from a (lo, hi) range."""
    if isinstance(level, tuple):
        return float(rng.uniform(level[0], level[1]))
    return level


class GaussianNoise:
    """Additive Gaussian noise; sigma = std on [0,1] images (or variance = sigma^2)."""

    level = "sigma"

    def __init__(self, sigma=None, variance=None):
        if (sigma is None) == (variance is None):
            raise ValueError("GaussianNoise needs exactly one of sigma (std on [0,1]) or variance (sigma^2)")
        if sigma is not None:
            self.sigma = _level(sigma, "sigma")
        else:
            variance = _level(variance, "variance")
            self.sigma = tuple(math.sqrt(v) for v in variance) if isinstance(variance, tuple) else math.sqrt(variance)

    def __call__(self, clean01: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        sigma = _draw(self.sigma, rng)
        clean = np.asarray(clean01, dtype=np.float64)
        noisy = clean + rng.standard_normal(clean.shape) * sigma
        return noisy.astype(np.float32), sigma

    def __repr__(self) -> str:
        return f"GaussianNoise(sigma={self.sigma})"


class RicianNoise:
    """Rician MR magnitude noise sqrt((x + n1)^2 + n2^2); sigma = std of n1, n2 on [0,1] images."""

    level = "sigma"

    def __init__(self, sigma):
        self.sigma = _level(sigma, "sigma")

    def __call__(self, clean01: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        sigma = _draw(self.sigma, rng)
        clean = np.asarray(clean01, dtype=np.float64)
        real = clean + rng.standard_normal(clean.shape) * sigma
        imag = rng.standard_normal(clean.shape) * sigma
        return np.sqrt(real**2 + imag**2).astype(np.float32), sigma

    def __repr__(self) -> str:
        return f"RicianNoise(sigma={self.sigma})"


class LowDoseCTNoise:
    """Projection-domain low-dose CT noise on a whole [0,1] CT slice (see module docstring).

    i0: photons per detector bin, a number or a [lo, hi] range (sampled log-uniformly).
    pixel_mm: in-plane pixel size in mm. norm: {"low", "high"} HU window of the [0,1]
    scale (default -1024..3071 HU). n_angles: projection angles over 180 degrees.
    """

    per_slice = True
    level = "i0"

    def __init__(self, i0, pixel_mm: float = 1.0, norm: dict | None = None, n_angles: int = 360):
        self.i0 = _level(i0, "i0")
        if (min(self.i0) if isinstance(self.i0, tuple) else self.i0) <= 0:
            raise ValueError(f"noise level i0={i0} must be > 0 photons")
        if not pixel_mm > 0:
            raise ValueError(f"pixel_mm={pixel_mm} must be > 0")
        if int(n_angles) < 1:
            raise ValueError(f"n_angles={n_angles} must be >= 1")
        self.pixel_mm = float(pixel_mm)
        norm = norm or {"low": CT_WINDOW_HU[0], "high": CT_WINDOW_HU[1]}
        self.low, self.high = float(norm["low"]), float(norm["high"])
        self.n_angles = int(n_angles)

    def for_volume(self, norm: dict, spacing) -> "LowDoseCTNoise":
        """A copy using a volume's HU window and in-plane pixel size (spacing[0] mm)."""
        return LowDoseCTNoise(self.i0, pixel_mm=float(spacing[0]), norm=norm, n_angles=self.n_angles)

    def __call__(self, clean01: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        from skimage.transform import iradon, radon

        clean = np.asarray(clean01, dtype=np.float32)
        if clean.ndim != 2:
            raise ValueError(f"LowDoseCTNoise needs a 2-D slice, got shape {clean.shape}")
        if isinstance(self.i0, tuple):
            i0 = float(np.exp(rng.uniform(np.log(self.i0[0]), np.log(self.i0[1]))))
        else:
            i0 = self.i0
        h, w = clean.shape
        side = max(h, w)
        hu = np.full((side, side), -1000.0)
        top, left = (side - h) // 2, (side - w) // 2
        hu[top : top + h, left : left + w] = to_physical(clean, {"low": self.low, "high": self.high})
        mu = np.clip(MU_WATER_PER_MM * (1.0 + hu / 1000.0), 0.0, None)
        theta = np.linspace(0.0, 180.0, self.n_angles, endpoint=False)
        line = radon(mu, theta=theta, circle=False) * self.pixel_mm
        counts = rng.poisson(i0 * np.exp(-line))
        noisy_line = -np.log(np.maximum(counts, 1) / i0)
        delta_mu = iradon((noisy_line - line) / self.pixel_mm, theta=theta, filter_name="ramp", circle=False, output_size=side)
        delta01 = (delta_mu * 1000.0 / MU_WATER_PER_MM / (self.high - self.low))[top : top + h, left : left + w]
        noise = delta01.astype(np.float32)
        return clean + noise, float(noise.std())

    def __repr__(self) -> str:
        return f"LowDoseCTNoise(i0={self.i0}, pixel_mm={self.pixel_mm}, n_angles={self.n_angles})"


def noise_for_volume(noise, norm: dict, spacing):
    """The noise model adapted to one volume: a model with ``for_volume`` (low-dose CT) takes
    the volume's HU window ``norm`` and pixel spacing (mm); any other is returned as it is."""
    for_volume = getattr(noise, "for_volume", None)
    return for_volume(norm, spacing) if for_volume is not None else noise


NOISE_TYPES = {"gaussian": GaussianNoise, "rician": RicianNoise, "lowdose_ct": LowDoseCTNoise}


def build_noise(cfg):
    """Build a noise model from {"type": name, **params} (dict or OmegaConf DictConfig)."""
    if cfg is None:
        raise ValueError("noise config is missing: give {'type': 'gaussian'|'rician'|'lowdose_ct', ...}")
    if hasattr(cfg, "items") and not isinstance(cfg, dict):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    params = dict(cfg)
    kind = params.pop("type", None)
    if kind not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {kind!r}: expected one of {sorted(NOISE_TYPES)}")
    try:
        return NOISE_TYPES[kind](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters {sorted(params)} for noise type {kind!r}: {err}") from err


def noise_at_level(noise_type: str, level: float, **params):
    """The ``noise_type`` model at one fixed level: sigma (std on [0,1]) for gaussian and
    rician, i0 (photons per detector bin) for lowdose_ct; params: its other parameters
    (e.g. n_angles)."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {noise_type!r}: expected one of {sorted(NOISE_TYPES)}")
    return build_noise({"type": noise_type, NOISE_TYPES[noise_type].level: level, **params})
