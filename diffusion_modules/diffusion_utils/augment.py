"""Training augmentations of the CLEAN [0,1] patch, applied before the noise is added.

``Augmentation.from_config(cfg)`` takes the DataModule's ``augment`` setting:

- ``false`` / ``None``: nothing.
- ``true``: random flips and rot90 only, exactly as the dataset drew them before this module.
- a mapping with any of these keys (an absent key, ``null`` or ``false`` is off):

  | key | value | what it does |
  | --- | --- | --- |
  | ``flips`` | bool | horizontal flip, vertical flip (p = 0.5 each), rot90 by k ~ U{0..3} (square patches) |
  | ``rescale`` | ``[lo, hi]``, 0.2 <= lo <= hi <= 5 | voxel size: resample by f, log-uniform in [lo, hi] |
  | ``gamma`` | ``[lo, hi]``, 0.1 <= lo <= hi <= 10 | x -> x ** g, g log-uniform in [lo, hi] |
  | ``contrast`` | ``[lo, hi]``, 0 < lo <= hi <= 10 | x -> a * x, a uniform in [lo, hi] |
  | ``brightness`` | ``[lo, hi]``, -1 <= lo <= hi <= 1 | x -> x + b, b uniform in [lo, hi] |

  Suggested: ``{flips: true, rescale: [0.5, 2.0], gamma: [0.7, 1.4], contrast: [0.9, 1.1],
  brightness: [-0.05, 0.05]}``. Unknown keys and bad ranges raise ValueError naming the key.

Order: rescale, flips/rot90, gamma, then contrast and brightness together
(x -> clip(a * x ** g + b, 0, 1)). Every draw comes from the item's generator, in the
order rescale (f, then two window positions), flips (two draws, then k), g, a, b, each
only when its key is on; with flips alone the draws and the output are those of the
earlier flips/rot90 (tests/test_augment.py keeps that code as its reference).

Rescale by f: output pixel i samples the source at ``centre + (i - (n - 1) / 2) / f``
(cubic spline, result clipped to [0,1]). f < 1 shows more anatomy at coarser sampling
(like a 2 mm scan for f = 0.5 of a 1 mm one): the source window (n / f pixels) is centred
on the patch and is read from the whole slice when the caller gives a ``read`` function
(HDF5PatchDataset does), reflect-padded only where it leaves the slice (or, without
``read``, around the patch itself). Before such a downscale the source is smoothed with a
Gaussian of std ``0.5 * sqrt(1 / f**2 - 1)`` source pixels (anti-aliasing: if the source
has about 0.5 pixel of blur, the result has about 0.5 of its own, coarser, pixels).
f > 1 zooms in: the n / f window lies inside the patch at a random position. Noise is
added after all of this, so it is white at its configured level, as a scanner's would be
at that resolution.
"""

import math

import numpy as np
from scipy import ndimage as ndi

RANGE_LIMITS = {  # key: (smallest lo, largest hi); rescale, gamma and contrast need lo > 0
    "rescale": (0.2, 5.0),
    "gamma": (0.1, 10.0),
    "contrast": (0.0, 10.0),
    "brightness": (-1.0, 1.0),
}
KEYS = ("flips",) + tuple(RANGE_LIMITS)



def _range(key: str, value) -> tuple[float, float] | None:
    """Validate augment.<key>: None/False (off) or a [lo, hi] pair within RANGE_LIMITS."""
    if value is None or value is False:
        return None
    if isinstance(value, (str, bytes)) or value is True:
        raise ValueError(f"augment.{key}={value!r} must be a [lo, hi] range or null")
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"augment.{key}={value!r} must be a [lo, hi] range of two numbers") from err
    low_limit, high_limit = RANGE_LIMITS[key]
    positive = key in ("rescale", "gamma", "contrast")
    ok = math.isfinite(lo) and math.isfinite(hi) and low_limit <= lo <= hi <= high_limit and not (positive and lo <= 0)
    if not ok:
        sign = "<" if key == "contrast" else "<="
        raise ValueError(f"augment.{key}={[lo, hi]} must satisfy {low_limit} {sign} lo <= hi <= {high_limit}")
    return (lo, hi)


def _reflect_reader(patch: np.ndarray):
    """read(r0, r1, c0, c1) of rows r0..r1-1, cols c0..c1-1 of `patch`, reflect-padded outside."""

    def read(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        h, w = patch.shape
        pad = ((max(0, -r0), max(0, r1 - h)), (max(0, -c0), max(0, c1 - w)))
        padded = np.pad(patch, pad, mode="reflect") if any(sum(p) for p in pad) else patch
        return padded[r0 + pad[0][0] : r1 + pad[0][0], c0 + pad[1][0] : c1 + pad[1][0]]

    return read


def rescale(read, shape: tuple[int, int], f: float, u: float = 0.5, v: float = 0.5) -> np.ndarray:
    """(h, w) float32 [0,1] image resampled by factor f (see module docstring).

    read(r0, r1, c0, c1) returns the source rows r0..r1-1, cols c0..c1-1 in patch
    coordinates (any extent, padded by the reader); u, v in [0,1) place the zoomed-in
    window inside the patch when f > 1 (0.5: centred).
    """
    h, w = shape
    sigma = 0.5 * math.sqrt(1.0 / f**2 - 1.0) if f < 1 else 0.0
    cy = (h - 1) / 2 + (u - 0.5) * max(0.0, (h - 1) * (1 - 1 / f))
    cx = (w - 1) / 2 + (v - 0.5) * max(0.0, (w - 1) * (1 - 1 / f))
    ys = cy + (np.arange(h) - (h - 1) / 2) / f
    xs = cx + (np.arange(w) - (w - 1) / 2) / f
    margin = int(math.ceil(4 * sigma)) + 6  # Gaussian support + spline prefilter decay (0.27 ** 6)
    r0, c0 = int(math.floor(ys[0])) - margin, int(math.floor(xs[0])) - margin
    r1, c1 = int(math.ceil(ys[-1])) + margin + 1, int(math.ceil(xs[-1])) + margin + 1
    region = np.asarray(read(r0, r1, c0, c1), dtype=np.float64)
    if sigma > 0:
        region = ndi.gaussian_filter(region, sigma, mode="reflect", truncate=4.0)
    grid = np.meshgrid(ys - r0, xs - c0, indexing="ij")
    out = ndi.map_coordinates(region, grid, order=3, mode="nearest")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class Augmentation:
    """Augmentation of clean [0,1] patches built from the ``augment`` config (module docstring).

    ``aug(clean01, rng, read=None)`` returns the augmented float32 patch; ``bool(aug)`` is
    False when nothing is on. For callers that must apply the same flips to another array
    (per-slice noise): ``p = aug.draw(rng, shape)``, ``aug.apply(clean01, p, read)``,
    ``aug.orient(other, p)``.
    """

    def __init__(self, flips: bool = False, rescale=None, gamma=None, contrast=None, brightness=None):
        if not isinstance(flips, (bool, np.bool_)):
            raise ValueError(f"augment.flips={flips!r} must be true or false")
        self.flips = bool(flips)
        self.rescale = _range("rescale", rescale)
        self.gamma = _range("gamma", gamma)
        self.contrast = _range("contrast", contrast)
        self.brightness = _range("brightness", brightness)

    @classmethod
    def from_config(cls, cfg) -> "Augmentation":
        """true (flips/rot90), false/None (nothing), a mapping of KEYS, or an Augmentation."""
        if isinstance(cfg, Augmentation):
            return cfg
        if cfg is None or isinstance(cfg, (bool, np.bool_)):
            return cls(flips=bool(cfg))
        if not hasattr(cfg, "keys"):
            raise ValueError(f"augment={cfg!r} must be true, false or a mapping with keys {list(KEYS)}")
        unknown = sorted(str(k) for k in cfg.keys() if k not in KEYS)
        if unknown:
            raise ValueError(f"unknown augment key(s) {unknown}: allowed {list(KEYS)}")
        return cls(**{k: cfg[k] for k in cfg.keys()})

    def __bool__(self) -> bool:
        return self.flips or any(r is not None for r in (self.rescale, self.gamma, self.contrast, self.brightness))

    def config(self) -> dict:
        """The active settings as a plain mapping (ranges as lists)."""
        out = {"flips": self.flips}
        out.update({k: list(getattr(self, k)) for k in RANGE_LIMITS if getattr(self, k) is not None})
        return out

    def __repr__(self) -> str:
        return f"Augmentation({self.config()})"

    def draw(self, rng: np.random.Generator, shape: tuple[int, int]) -> dict:
        """Draw every random parameter of one item from rng (order in the module docstring)."""
        p = {}
        if self.rescale is not None:
            lo, hi = self.rescale
            p["f"] = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            p["u"], p["v"] = float(rng.random()), float(rng.random())
        if self.flips:
            p["fliplr"] = bool(rng.random() < 0.5)
            p["flipud"] = bool(rng.random() < 0.5)
            p["k"] = int(rng.integers(4)) if shape[0] == shape[1] else 0
        if self.gamma is not None:
            p["g"] = math.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1])))
        if self.contrast is not None:
            p["a"] = float(rng.uniform(*self.contrast))
        if self.brightness is not None:
            p["b"] = float(rng.uniform(*self.brightness))
        return p

    @staticmethod
    def orient(x: np.ndarray, p: dict) -> np.ndarray:
        """The flips/rot90 of p applied to x (identity when p holds none)."""
        if p.get("fliplr"):
            x = x[:, ::-1]
        if p.get("flipud"):
            x = x[::-1, :]
        if p.get("k"):
            x = np.rot90(x, k=p["k"])
        return np.ascontiguousarray(x)

    def apply(self, clean01: np.ndarray, p: dict, read=None) -> np.ndarray:
        """Augment clean01 (h, w) with drawn parameters p; read: optional source reader (see rescale)."""
        x = np.asarray(clean01, dtype=np.float32)
        if "f" in p and p["f"] != 1.0:
            x = rescale(read or _reflect_reader(x), x.shape, p["f"], p["u"], p["v"])
        x = self.orient(x, p)
        if "g" in p:
            x = np.power(x, np.float32(p["g"]))
        if "a" in p or "b" in p:
            x = np.clip(np.float32(p.get("a", 1.0)) * x + np.float32(p.get("b", 0.0)), 0.0, 1.0)
        return np.ascontiguousarray(x, dtype=np.float32)

    def __call__(self, clean01: np.ndarray, rng: np.random.Generator, read=None) -> np.ndarray:
        """The augmented float32 [0,1] patch, all draws from rng."""
        return self.apply(clean01, self.draw(rng, np.shape(clean01)), read)
