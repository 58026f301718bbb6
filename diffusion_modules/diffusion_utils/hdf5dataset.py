"""Torch datasets over HDF5 files written by utils.create_training_images.save_as_hdf5.

Items are dicts (spec.md):
  x_cond  (1,H,W) float32 noisy image in [-1,1] model units (not clipped)
  x_prior (1,H,W) float32 clean image in [-1,1]
  sigma   float32 scalar, noise std on the [0,1] scale
  index   int64 item index
HDF5SliceDataset items add slice_index, source, modality, norm and spacing (mm).

Noise: noise_seed=None draws fresh noise at every read (training); an int fixes the noise
of item i with np.random.default_rng([noise_seed, i]), identical across runs, machines,
worker counts and DataModules. A training read by the key ``(i, seed, epoch)`` (what
resumable.ResumableSampler yields) draws item i's noise and augmentation from
np.random.default_rng([TRAIN_STREAM, seed, epoch, i]): fresh every epoch, yet the same in
every run with that seed, in any worker and after a resume.

Files are opened lazily, once per process, so the datasets pickle into DataLoader workers
without open HDF5 handles.

Low-dose CT noise (a model with ``per_slice = True``) is simulated on whole slices (about
1 s each) and patches are cropped from it. HDF5PatchDataset caches the noise of up to
``lowdose_cache`` realisations per slice during training (drawn among at random once
full) and one seeded realisation per slice when noise_seed is set
(rng = default_rng([noise_seed, file number, slice])). A keyed training read picks
realisation j < lowdose_cache with its generator and simulates it, on first use in a process,
from default_rng([TRAIN_STREAM, seed, file number, slice, j]).

Augmentation (augment.py) changes the clean patch before the noise is added, drawing from
the item's generator. Its voxel-size rescale reads the source window from the whole slice
(``volume``), so a downscaled patch shows real neighbouring anatomy. With per-slice noise
the augmented clean patch gets the noise cropped at the patch's place, with the same
flips/rot90 but neither rescaled nor intensity-changed: the noise keeps the scanner's
texture at its level, though it no longer lines up with the (rescaled) anatomy.

Neighbouring slices (``context_slices`` k > 0, the 2.5D condition): ``x_cond`` is the stack
(1 + 2k, H, W) of the noisy slice z, then z-k, ..., z-1, z+1, ..., z+k (``context_indices``:
reflected at the first and last slice, z-1 of slice 0 being slice 1), each neighbour the
same in-plane crop of its slice in ``volume``; ``x_prior`` stays the clean slice z. The
centre draws its augmentation and noise first, exactly as with k = 0; the neighbours then
get the same augmentation (one draw for the whole stack, the rescale reading each
neighbour's own slice) and each its own noise, drawn next from the item's generator (so
independent, fresh per (seed, epoch, item) in training, fixed by noise_seed for validation
and test) at the centre's level sigma (``neighbour_noise``). Per-slice noise: neighbour
channel c takes a realisation of its slice of its own (variant c, seeded as the centre's
with c appended), independent of the centre's and of the other channels' even where the
reflection repeats a slice.
"""

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from diffusion_modules.diffusion_utils.augment import Augmentation
from diffusion_modules.diffusion_utils.context import check_context_slices, context_indices, neighbour_noise
from diffusion_modules.diffusion_utils.noise import noise_for_volume
from utils.create_training_images import UINT16_SCALE
from utils.intensity import to_model_units
from utils.volume_io import source_stem

REQUIRED = ("volume", "patches", "slice_index", "origin")
#: first entropy word of the keyed training generators, kept apart from the noise_seed ones
TRAIN_STREAM = 0x7472


#: patches whose pixels check_layout compares with their place in ``volume`` (evenly spread)
SPOT_CHECKS = 8


def check_layout(f: h5py.File, path) -> None:
    """ValueError naming ``path`` and the field when an HDF5 patch file disagrees with itself:
    ``volume`` not (slices, rows, cols); ``patches`` not (N, S, S) or S not its ``image_size``
    attribute; ``slice_index``/``origin`` not one entry per patch; a slice index outside the
    volume; an origin whose patch leaves the slice; or a patch (SPOT_CHECKS evenly spread
    ones) that is not the volume's pixels at its slice and origin."""
    def bad(field: str, what: str):
        raise ValueError(f"{path}: inconsistent field {field!r}: {what}; rebuild the file with "
                         "utils.create_training_images")

    volume, patches, index, origin = (f[k] for k in REQUIRED)
    if volume.ndim != 3 or 0 in volume.shape:
        bad("volume", f"shape {volume.shape}, expected (slices, rows, cols)")
    if patches.ndim != 3 or patches.shape[1] != patches.shape[2]:
        bad("patches", f"shape {patches.shape}, expected (N, S, S)")
    n, size = patches.shape[:2]
    if "image_size" in f.attrs and int(f.attrs["image_size"]) != size:
        bad("image_size", f"attribute {f.attrs['image_size']} but the patches are {size} x {size}")
    if index.shape != (n,):
        bad("slice_index", f"shape {index.shape}, expected ({n},): one per patch")
    if origin.shape != (n, 2):
        bad("origin", f"shape {origin.shape}, expected ({n}, 2): (row, col) per patch")
    z, o = index[:].astype(np.int64), origin[:].astype(np.int64)
    slices, rows, cols = volume.shape
    wrong = np.flatnonzero((z < 0) | (z >= slices))
    if wrong.size:
        bad("slice_index", f"patch {wrong[0]} lies at slice {z[wrong[0]]}, the volume has {slices} slices")
    wrong = np.flatnonzero((o < 0).any(axis=1) | (o[:, 0] + size > rows) | (o[:, 1] + size > cols))
    if wrong.size:
        bad("origin", f"patch {wrong[0]} of {size} x {size} at (row, col) {tuple(o[wrong[0]])} leaves the "
                      f"{rows} x {cols} slices")
    for i in np.unique(np.round(np.linspace(0, n - 1, min(n, SPOT_CHECKS))).astype(int)) if n else []:
        r, c = o[i]
        if not np.array_equal(patches[i], volume[z[i], r : r + size, c : c + size]):
            bad("patches", f"patch {i} is not the volume's pixels at slice {z[i]}, (row, col) ({r}, {c}): "
                           "its slice_index or origin is wrong")


def read_meta(path: Path) -> dict:
    """Check an HDF5 file's layout (``check_layout``); return its metadata (modality, norm,
    spacing, source, n_slices, patch_size, slice_index, origin)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HDF5 file does not exist: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 file: {err}") from err
    with f:
        missing = [k for k in REQUIRED if k not in f]
        if missing:
            raise ValueError(f"{path} lacks the dataset(s) {missing}: rebuild it with utils.create_training_images")
        check_layout(f, path)
        attrs = f.attrs
        modality = str(attrs.get("modality", ""))
        norm = {"modality": modality, "low": float(attrs["norm_low"]), "high": float(attrs["norm_high"])}
        return {
            "modality": modality,
            "norm": norm,
            "spacing": tuple(float(s) for s in attrs["spacing"]),
            "source": source_stem(path),
            "n_slices": int(f["volume"].shape[0]),
            "patch_size": int(f["patches"].shape[1]),
            "slice_index": f["slice_index"][:],
            "origin": f["origin"][:],
        }


def to_item(clean01: np.ndarray, noisy01: np.ndarray, sigma: float, index: int) -> dict:
    """Batch dict in model units [-1,1]; ``noisy01`` (H, W), or a (1 + 2k, H, W) stack."""
    noisy = np.asarray(noisy01, dtype=np.float32)
    return {
        "x_cond": torch.from_numpy(to_model_units(noisy[None] if noisy.ndim == 2 else noisy)),
        "x_prior": torch.from_numpy(to_model_units(np.asarray(clean01, dtype=np.float32)[None])),
        "sigma": torch.tensor(sigma, dtype=torch.float32),
        "index": torch.tensor(index, dtype=torch.int64),
    }


class _HDF5Base(Dataset):
    """Shared file handling: sorted files, metadata, lazy per-process handles."""

    def __init__(self, files, slices, noise, noise_seed, context_slices=0):
        self.context_slices = check_context_slices(context_slices)
        if not files:
            raise ValueError("no HDF5 files given")
        self.files = sorted(Path(f) for f in files)
        self.meta = [read_meta(f) for f in self.files]
        if slices is not None:
            slices = {Path(k): v for k, v in slices.items()}
            unknown = sorted(str(k) for k in slices if k not in self.files)
            if unknown:
                raise ValueError(f"slices given for files not in the dataset: {unknown}")
        self.slices = slices
        self.noise = noise
        self.noise_seed = None if noise_seed is None else int(noise_seed)
        self._noise = [noise_for_volume(self.noise, m["norm"], m["spacing"]) for m in self.meta]
        self._handles = {}
        self._pid = None
        self._fresh_rng = None

    def _allowed(self, k: int) -> np.ndarray:
        """Allowed slice indices of file k: all without a filter, none if the filter omits the file."""
        if self.slices is None:
            return np.arange(self.meta[k]["n_slices"])
        return np.asarray(sorted(int(s) for s in self.slices.get(self.files[k], [])), dtype=int)

    def _check_process(self) -> None:
        """Drop handles and the fresh-noise generator inherited from another process. The
        generator is seeded from torch's seed of this process (set by the run's ``seed`` via
        Lightning's seed_everything, per DataLoader worker), so a seeded run draws the same
        training noise and augmentation every time."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
            self._fresh_rng = np.random.default_rng(torch.initial_seed())

    def _data(self, k: int, name: str) -> h5py.Dataset:
        """Dataset `name` of file k, opened once per process."""
        self._check_process()
        key = (k, name)
        if key not in self._handles:
            if k not in self._handles:
                self._handles[k] = h5py.File(self.files[k], "r")
            self._handles[key] = self._handles[k][name]
        return self._handles[key]

    def _neighbours(self, k: int, z: int) -> list[int]:
        """Slice indices of the neighbours of slice z of file k, in channel order (context_indices)."""
        return context_indices(z, self.context_slices, self.meta[k]["n_slices"])[1:]

    def _rng(self, index: int, draw: tuple[int, int] | None = None) -> np.random.Generator:
        """Seeded per item when noise_seed is set; else per (seed, epoch, item) for a keyed
        read (``draw`` = (seed, epoch)), else this process's fresh generator."""
        if self.noise_seed is not None:
            return np.random.default_rng([self.noise_seed, index])
        if draw is not None:
            return np.random.default_rng([TRAIN_STREAM, *draw, index])
        self._check_process()
        return self._fresh_rng

    def _key(self, key) -> tuple[int, tuple[int, int] | None]:
        """(index, draw) of a read: an int index, or a key (index, seed, epoch)."""
        if isinstance(key, (tuple, list)):
            index, draw = int(key[0]), (int(key[1]), int(key[2]))
        else:
            index, draw = int(key), None
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return index, draw

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_pid"], state["_fresh_rng"] = {}, None, None
        return state


class HDF5PatchDataset(_HDF5Base):
    """Patches of many HDF5 files; slices: optional {file: allowed slice indices}.

    augment: augmentation of the clean patch before the noise is added: true (flips/rot90),
        false, a mapping or an Augmentation (see augment.py).
    lowdose_cache: noise realisations kept per slice for per-slice noise models in training.
    in_memory: read each file's patches into memory once per process (2 bytes per pixel)
    instead of one HDF5 read per item.
    context_slices: k neighbouring slices on each side in ``x_cond`` (module docstring).
    """

    def __init__(self, files, slices=None, noise=None, noise_seed=None, augment=False, lowdose_cache=4, in_memory=False,
                 context_slices=0):
        super().__init__(files, slices, noise, noise_seed, context_slices)
        if noise is None:
            raise ValueError("HDF5PatchDataset needs a noise model (see noise.build_noise)")
        self.augment = Augmentation.from_config(augment)
        self.lowdose_cache = int(lowdose_cache)
        self.in_memory = bool(in_memory)
        rows = []
        for k, meta in enumerate(self.meta):
            keep = np.flatnonzero(np.isin(meta["slice_index"], self._allowed(k)))
            rows.append(np.stack([np.full(keep.size, k), keep], axis=1))
        self.rows = np.concatenate(rows).astype(np.int64)
        self._slice_noise = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _per_slice_noise(self, k: int, z: int, rng: np.random.Generator, draw=None,
                         variant: int = 0) -> tuple[np.ndarray, float]:
        """(noise in [0,1] units, sigma) of slice z of file k, cached (see module docstring);
        ``variant`` c > 0: the realisations of neighbour channel c, seeded with c appended."""
        extra = (variant,) if variant else ()
        if draw is not None and self.noise_seed is None:  # keyed: realisation j, seeded
            j = int(rng.integers(self.lowdose_cache))
            key = (k, z, draw[0], j, *extra)
            if key not in self._slice_noise:
                clean = self._data(k, "volume")[z].astype(np.float32) / UINT16_SCALE
                noisy, sigma = self._noise[k](clean, np.random.default_rng([TRAIN_STREAM, draw[0], k, z, j, *extra]))
                self._slice_noise[key] = (noisy - clean, sigma)
            return self._slice_noise[key]
        key = (k, z, *extra)
        cache = self._slice_noise.setdefault(key, [])
        limit = 1 if self.noise_seed is not None else self.lowdose_cache
        if len(cache) < limit:
            clean = self._data(k, "volume")[z].astype(np.float32) / UINT16_SCALE
            slice_rng = rng if self.noise_seed is None else np.random.default_rng([self.noise_seed, k, z, *extra])
            noisy, sigma = self._noise[k](clean, slice_rng)
            cache.append((noisy - clean, sigma))
            return cache[-1]
        return cache[int(rng.integers(len(cache)))]

    def _array(self, k: int, name: str):
        """Dataset ``name`` of file k: the HDF5 dataset, or with in_memory a read-only memory map
        of it (a contiguous, uncompressed dataset, as save_as_hdf5 writes them: one copy in the
        page cache, shared by every loader worker), else its in-memory copy."""
        data = self._data(k, name)
        if not self.in_memory:
            return data
        key = (k, name + "[()]")
        if key not in self._handles:
            offset = data.id.get_offset()
            if offset is not None and data.chunks is None and data.compression is None:
                self._handles[key] = np.memmap(self.files[k], dtype=data.dtype, mode="r", offset=offset,
                                               shape=data.shape)
            else:
                self._handles[key] = data[()]
        return self._handles[key]

    def _reader(self, k: int, z: int, r: int, c: int):
        """read(r0, r1, c0, c1): rows/cols of slice z of file k relative to (r, c) in [0,1],
        reflect-padded where they leave the slice (the source of the rescale)."""
        volume = self._array(k, "volume")
        rows, cols = volume.shape[1:]

        def read(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
            a0, a1, b0, b1 = max(r + r0, 0), min(r + r1, rows), max(c + c0, 0), min(c + c1, cols)
            block = volume[z, a0:a1, b0:b1].astype(np.float32) / UINT16_SCALE
            pad = ((a0 - r - r0, r + r1 - a1), (b0 - c - c0, c + c1 - b1))
            return np.pad(block, pad, mode="reflect") if any(sum(p) for p in pad) else block

        return read

    def __getitem__(self, key) -> dict:
        index, draw = self._key(key)
        k, row = (int(v) for v in self.rows[index])
        clean = self._array(k, "patches")[row].astype(np.float32) / UINT16_SCALE
        rng = self._rng(index, draw)
        z = int(self.meta[k]["slice_index"][row])
        r, c = (int(v) for v in self.meta[k]["origin"][row])
        read = self._reader(k, z, r, c) if self.augment.rescale is not None else None
        per_slice, p = getattr(self._noise[k], "per_slice", False), {}
        if per_slice:
            noise, sigma = self._per_slice_noise(k, z, rng, draw)
            noise = noise[r : r + clean.shape[0], c : c + clean.shape[1]]
            if self.augment:
                p = self.augment.draw(rng, clean.shape)
                clean, noise = self.augment.apply(clean, p, read), self.augment.orient(noise, p)
            noisy = clean + noise
        else:
            if self.augment:
                p = self.augment.draw(rng, clean.shape)
                clean = self.augment.apply(clean, p, read)
            noisy, sigma = self._noise[k](clean, rng)
        if self.context_slices:
            noisy = np.stack([noisy] + self._context(k, z, r, c, clean.shape, p, rng, draw, sigma, per_slice))
        return to_item(clean, noisy, sigma, index)

    def _context(self, k, z, r, c, shape, p, rng, draw, sigma, per_slice) -> list[np.ndarray]:
        """The noisy neighbours of the patch at (r, c) of slice z of file k, in channel order,
        with the centre's augmentation parameters ``p`` and each its own noise (module docstring)."""
        volume, (h, w) = self._array(k, "volume"), shape
        level = None if per_slice else neighbour_noise(self._noise[k], sigma)
        out = []
        for channel, zn in enumerate(self._neighbours(k, z), start=1):
            clean = volume[zn, r : r + h, c : c + w].astype(np.float32) / UINT16_SCALE
            if self.augment:
                clean = self.augment.apply(clean, p, self._reader(k, zn, r, c) if "f" in p else None)
            if per_slice:
                noise, _ = self._per_slice_noise(k, zn, rng, draw, variant=channel)
                out.append(clean + self.augment.orient(noise[r : r + h, c : c + w], p))
            else:
                out.append(level(clean, rng)[0])
        return out


class HDF5SliceDataset(_HDF5Base):
    """Full slices of many HDF5 files (evaluation); slices: optional {file: allowed slice indices}.

    noise=None returns clean-only items (x_cond equals x_prior, sigma 0). context_slices: k
    neighbouring full slices on each side in ``x_cond``, each with its own noise, drawn after
    the centre's from the item's generator (at the centre's sigma; per-slice models at their
    own level), as in HDF5PatchDataset.
    """

    def __init__(self, files, slices=None, noise=None, noise_seed=None, context_slices=0):
        super().__init__(files, slices, noise, noise_seed, context_slices)
        self.items = [(k, int(z)) for k in range(len(self.files)) for z in self._allowed(k)]

    def __len__(self) -> int:
        return len(self.items)

    def clean_slice(self, index: int) -> np.ndarray:
        """Clean slice `index` as (H, W) float32 in [0,1]."""
        k, z = self.items[index]
        return self._data(k, "volume")[z].astype(np.float32) / UINT16_SCALE

    def __getitem__(self, key) -> dict:
        index, draw = self._key(key)
        k, z = self.items[index]
        clean = self.clean_slice(index)
        rng = None if self.noise is None else self._rng(index, draw)
        if self.noise is None:
            noisy, sigma = clean, 0.0
        else:
            noisy, sigma = self._noise[k](clean, rng)
        if self.context_slices:
            level = None if self.noise is None else neighbour_noise(self._noise[k], sigma)
            volume = self._data(k, "volume")
            stack = [volume[zn].astype(np.float32) / UINT16_SCALE for zn in self._neighbours(k, z)]
            noisy = np.stack([noisy] + [s if level is None else level(s, rng)[0] for s in stack])
        meta = self.meta[k]
        item = to_item(clean, noisy, sigma, index)
        item.update(
            slice_index=z,
            source=meta["source"],
            modality=meta["modality"],
            norm=dict(meta["norm"]),
            spacing=torch.tensor(meta["spacing"], dtype=torch.float32),
        )
        return item
