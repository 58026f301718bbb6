"""LightningDataModule: volumes -> cached HDF5 patch files -> train/val/test loaders.

Splits (``split`` param):
  slab:   per volume, contiguous slabs along the slice axis, train | gap | val | gap | test
          (``gap`` slices are left out between slabs so no test slice neighbours a
          training slice). Works with one volume.
  volume: whole volumes per split, in sorted-name order (train first, test last); needs
          at least 3 volumes.
  subject: whole subjects per split, seeded by ``seed`` (a subject never crosses splits; a
          manifest's split column wins); file: the split.csv of an earlier run (splits.py).
Volumes: paths, mappings, globs and CSV/TSV manifests (manifest.py). ``write_split`` writes
the assignment as split.csv (orchestration.training.train: into the run folder).
Planes (``planes`` param, see utils.create_training_images): "acquisition" or one plane
gives one HDF5 file per volume; several planes give one file per (volume, plane). Volume
split: all of a volume's planes go to the same split. Slab split: the slabs are cut along
the slice axis of the acquisition plane (else the first listed plane); only that plane
gives val/test data, and the other planes give training patches whose pixels lie inside
the train slab (a coronal slice crosses every axial slab).
Train: patches with fresh noise (optional augmentation), read through a
resumable.ResumableLoader: order, noise and augmentation follow (train_seed, epoch, item),
and Lightning checkpoints save the loader's position, so a resumed run reads what an
uninterrupted one would. Val: patches with noise fixed by ``seed``. Test: full slices with
noise fixed by ``seed`` (batch size 1, slices differ in size). No loader draws from torch's
global random generator (each has its own), so the model's random stream does not depend
on when loaders are made.
"""

import time
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from diffusion_modules.diffusion_utils.augment import Augmentation
from diffusion_modules.diffusion_utils.cache import stale_reason
from diffusion_modules.diffusion_utils.context import check_context_slices
from diffusion_modules.diffusion_utils.hdf5dataset import HDF5PatchDataset, HDF5SliceDataset, read_meta
from diffusion_modules.diffusion_utils.loader_check import check_loader_memory
from diffusion_modules.diffusion_utils.noise import build_noise
from diffusion_modules.diffusion_utils.resumable import ResumableLoader, ResumableSampler
from diffusion_modules.diffusion_utils.manifest import expand_volumes
from diffusion_modules.diffusion_utils.splits import assign_volumes, check_split_config, write_split_file
from utils.create_training_images import (check_count, convert_volumes, dataset_summary, format_summary,
                                          plane_file_names)
from utils.planes import ACQUISITION, PLANE_AXES, parse_planes
from utils.volume_io import source_fingerprint
from utils.paths import resolve_path

DEFAULT_NOISE = {"type": "gaussian", "sigma": 0.1}


def slab_split(n_slices: int, fractions, gap: int) -> tuple[range, range, range]:
    """Contiguous train | gap | val | gap | test slabs of slice indices 0..n_slices-1."""
    usable = n_slices - 2 * gap
    n_val = max(1, int(round(fractions[1] * usable)))
    n_test = max(1, int(round(fractions[2] * usable)))
    n_train = usable - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"slab split needs at least {2 * gap + 3} slices (gap {gap}), the volume has {n_slices}"
        )
    val_start = n_train + gap
    test_start = val_start + n_val + gap
    return range(0, n_train), range(val_start, val_start + n_val), range(test_start, test_start + n_test)


def split_plane_files(files: list[Path]) -> tuple[Path, dict[Path, int]]:
    """Of one volume's plane files: the one a slab split cuts (the acquisition plane when
    built, else the first) and {other file: origin column (0 row, 1 col) that runs along the
    first one's slice axis}."""
    if len(files) == 1:
        return files[0], {}
    planes = {}
    for f in files:
        with h5py.File(f, "r") as h:
            planes[f] = (str(h.attrs["plane"]), str(h.attrs["acquisition_plane"]))
    main = next((f for f in files if planes[f][0] == planes[f][1]), files[0])
    axis = PLANE_AXES[planes[main][0]][0]
    return main, {f: PLANE_AXES[planes[f][0]].index(axis) - 1 for f in files if f != main}


def keep_patches_inside(dataset: HDF5PatchDataset, bounds: dict, size: int) -> None:
    """Drop the patches of dataset's files in bounds {file: (origin column, lo, hi)} whose
    pixels leave [lo, hi) along that in-plane axis."""
    keep = np.ones(len(dataset.rows), dtype=bool)
    for k, f in enumerate(dataset.files):
        if f in bounds:
            column, lo, hi = bounds[f]
            mine = dataset.rows[:, 0] == k
            start = dataset.meta[k]["origin"][dataset.rows[mine, 1], column]
            keep[mine] = (start >= lo) & (start + size <= hi)
    dataset.rows = dataset.rows[keep]


class DenoisingDataModule(pl.LightningDataModule):
    """Denoising data from CT/MR volumes (see module docstring).

    volumes: NIfTI files / DICOM folders / built .h5 files; strings (modality from the name),
        {path, modality, name, subject} mappings, globs or CSV/TSV manifests (manifest.py);
        relative paths from the repository root.
    cache_dir: folder for the built HDF5 files (rebuilt when missing, built from other
        content of the source (sha256) or with other settings, or inconsistent: cache.py).
    image_size, stride, slice_step, min_foreground: patching (see save_as_hdf5); integers
        >= 1 (ValueError naming the key otherwise); a given .h5 file must hold patches of
        image_size.
    planes: "acquisition" (across the thickest voxels), a plane name (axial, coronal,
        sagittal) or a list of them: one HDF5 file per (volume, plane), see the module docstring.
    noise: build_noise config, e.g. {"type": "gaussian", "sigma": 0.1} (sigma on [0,1]).
    split: {"mode": "slab"|"volume"|"subject", "fractions": [train, val, test], "gap": slices}
        or {"file": split.csv of an earlier run} (splits.py).
    convert_workers: processes converting the stale volumes (None: one per volume, at most
        the CPU count and 8, and none below 4 volumes: converted here).
    batch_size, num_workers: DataLoader settings.
    augment: augmentation of the clean training patches (never val/test): true (flips/rot90),
        false, or a mapping {flips, rescale, gamma, contrast, brightness} (see augment.py).
    seed: seed of the fixed val/test noise.
    train_seed (attribute, not a parameter): seed of the training order, noise and
        augmentation; orchestration.training.train sets it to the run's ``seed``, and None
        (a DataModule used on its own) takes ``seed``.
    in_memory: hold the train/val patches in memory (per worker) instead of reading HDF5 per item;
        setup() refuses a configuration whose loaders would not fit in the available memory
        (loader_check.check_loader_memory, with the estimate).
    lowdose_cache: low-dose CT noise realisations kept per training slice (each costs about
        1 s to simulate; more means more varied noise, fewer means faster epochs).
    context_slices: k noisy neighbouring slices on each side in every ``x_cond`` (train, val,
        test; the 2.5D condition, see context.py); the model's ``context_slices`` must be the
        same (``check_model``). With a slab split ``gap`` must be >= k, so that no stack of one
        slab reads a slice of another.
    """

    def __init__(
        self,
        volumes,
        cache_dir="cache/hdf5",
        image_size: int = 64,
        stride: int = 32,
        slice_step: int = 1,
        min_foreground: float = 0.1,
        planes="acquisition",
        noise=None,
        split=None,
        batch_size: int = 32,
        num_workers: int = 0,
        augment=False,
        seed: int = 0,
        in_memory: bool = False,
        lowdose_cache: int = 4,
        context_slices: int = 0,
        convert_workers: int | None = None,
    ):
        super().__init__()
        self.volumes = expand_volumes(volumes)  # globs and manifests expanded, every file checked
        self.convert_workers = None if convert_workers is None else check_count(convert_workers, "convert_workers")
        self.cache_dir = resolve_path(cache_dir)
        self.image_size, self.stride = check_count(image_size, "image_size"), check_count(stride, "stride")
        self.slice_step = check_count(slice_step, "slice_step")
        self.min_foreground = float(min_foreground)
        self.planes = parse_planes(planes)
        targets = [t for v in self.volumes for t in self._targets(v)]
        clashes = sorted({str(t) for t in targets if targets.count(t) > 1})
        if clashes:
            raise ValueError(f"volumes and planes {self.planes!r} give the same HDF5 file(s) {clashes}: rename the volumes")
        self.noise_cfg = dict(DEFAULT_NOISE if noise is None else noise)
        self.noise = build_noise(self.noise_cfg)
        self.split = check_split_config(split)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.augment = Augmentation.from_config(augment)
        self.seed, self.in_memory = int(seed), bool(in_memory)
        order = [v["name"] for v in sorted(self.volumes, key=lambda v: min(self._targets(v)))]
        self.assignment = assign_volumes(self.volumes, self.split, self.seed, order)  # {name: split}
        self.train_seed: int | None = None
        if int(lowdose_cache) < 1:
            raise ValueError(f"lowdose_cache must be >= 1 noise realisation per slice, got {lowdose_cache}")
        self.lowdose_cache = int(lowdose_cache)
        self.context_slices = check_context_slices(context_slices)
        if self.split["mode"] == "slab" and self.split["gap"] < self.context_slices:
            raise ValueError(f"context_slices={self.context_slices} reads {self.context_slices} slice(s) beyond each "
                             f"slab, but the slab split's gap is {self.split['gap']}: training stacks would read "
                             f"val/test slices; set split.gap >= {self.context_slices}")
        self.train_set = self.val_set = self.test_set = None
        several = self.planes != ACQUISITION and len(self.planes) > 1 and not all(v["h5"] for v in self.volumes)
        if several and self.split["mode"] == "slab" and getattr(self.augment, "rescale", None) is not None:
            raise ValueError(
                "augment rescale reads the anatomy around a patch, which in the planes that are not "
                "slab-split reaches across the train slab into val/test: with several planes use "
                "split mode 'volume' or turn rescale off"
            )

    def _targets(self, volume: dict) -> list[Path]:
        """The volume's HDF5 files, one per plane (a given .h5 file as it is)."""
        if volume["h5"]:
            return [volume["path"]]
        return [self.cache_dir / name for name in plane_file_names(volume["name"], self.planes)]

    def prepare_data(self) -> None:
        """Build the HDF5 file of every volume that is missing or stale (``cache.stale_reason``:
        other source content, settings or plane, or inconsistent), in ``convert_workers``
        processes with one progress bar, and print the dataset's summary when it converted
        any; idempotent. A given .h5 file is checked (hdf5dataset.read_meta) and must hold
        patches of ``image_size``."""
        settings = dict(image_size=self.image_size, stride=self.stride, slice_step=self.slice_step,
                        min_foreground=self.min_foreground)
        jobs = []
        for volume in self.volumes:
            if not volume["path"].exists():
                raise FileNotFoundError(f"volume does not exist: {volume['path']} ({volume['where']})")
            if volume["h5"]:
                size = read_meta(volume["path"])["patch_size"]
                if size != self.image_size:
                    raise ValueError(f"{volume['path']}: field 'image_size' (its patches) is {size}, the data "
                                     f"config's image_size is {self.image_size}: rebuild the file or change image_size")
                continue
            planes = [ACQUISITION] if self.planes == ACQUISITION else self.planes
            fingerprint = source_fingerprint(volume["path"])
            wanted = dict(modality=volume["modality"], **settings)
            if any(stale_reason(t, volume["path"], fingerprint, wanted, p) for t, p in zip(self._targets(volume), planes)):
                jobs.append(dict(inputpath=volume["path"], datasetname=volume["name"], targetdir=self.cache_dir,
                                 modality=volume["modality"], progress=False, **settings,
                                 planes=self.planes if self.planes == ACQUISITION else list(self.planes)))
        if jobs:
            workers = self.convert_workers or (1 if len(jobs) < 4 else None)
            start = time.time()
            convert_volumes(jobs, workers, progress=len(jobs) > 1)
            if len(jobs) > 1:
                print(f"converted {len(jobs)} of {len(self.volumes)} volumes in {time.time() - start:.1f} s "
                      f"into {self.cache_dir}\n{format_summary(self.summary())}")

    def summary(self) -> dict:
        """``utils.create_training_images.dataset_summary`` of the built files."""
        return dataset_summary([{"name": v["name"], "subject": v["subject"], "files": self._targets(v)}
                                for v in self.volumes])

    def write_split(self, path) -> Path:
        """Write the volume assignment as split.csv (name, path, subject, split) to ``path``."""
        return write_split_file(path, self.volumes, self.assignment)

    def split_slices(self) -> dict[str, dict[Path, list[int]]]:
        """{"train"|"val"|"test": {h5 file: sorted slice indices}} from the split config.
        With several planes and a slab split, the planes that are not slab-split are listed
        under train with all their slices, but setup() keeps only their patches inside the
        train slab."""
        return self._split()[0]

    def _split(self) -> tuple[dict, dict]:
        """split_slices() and {h5 file: (origin column, lo, hi)}: the training patches of such
        a file must lie in [lo, hi) along that in-plane axis (the train slab)."""
        groups = [self._targets(v) for v in self.volumes]
        n_slices = {f: read_meta(f)["n_slices"] for files in groups for f in files}
        out, bounds = {"train": {}, "val": {}, "test": {}}, {}
        if self.split["mode"] == "slab":
            for files in groups:
                main, others = split_plane_files(files)
                parts = slab_split(n_slices[main], self.split["fractions"], self.split["gap"])
                for name, part in zip(out, parts):
                    out[name][main] = list(part)
                for f, column in others.items():  # rows/cols run backwards along the RAS axis
                    out["train"][f] = list(range(n_slices[f]))
                    bounds[f] = (column, n_slices[main] - parts[0].stop, n_slices[main] - parts[0].start)
        else:
            for volume, files in zip(self.volumes, groups):
                for f in files:
                    out[self.assignment[volume["name"]]][f] = list(range(n_slices[f]))
        return out, bounds

    def setup(self, stage: str | None = None) -> None:
        """Build missing HDF5 files and the three datasets."""
        self.prepare_data()
        parts, bounds = self._split()
        check_loader_memory(self, parts, getattr(getattr(self, "trainer", None), "num_devices", 1) or 1)  # RAM
        self.train_set = HDF5PatchDataset(
            list(parts["train"]), parts["train"], self.noise, noise_seed=None, augment=self.augment,
            lowdose_cache=self.lowdose_cache, in_memory=self.in_memory, context_slices=self.context_slices)
        keep_patches_inside(self.train_set, bounds, self.image_size)
        self.val_set = HDF5PatchDataset(list(parts["val"]), parts["val"], self.noise, noise_seed=self.seed,
                                        in_memory=self.in_memory, context_slices=self.context_slices)
        self.test_set = HDF5SliceDataset(list(parts["test"]), parts["test"], self.noise, noise_seed=self.seed,
                                         context_slices=self.context_slices)
        for name, dataset in (("train", self.train_set), ("val", self.val_set)):
            if len(dataset) == 0:
                raise ValueError(
                    f"the {name} split has no patch with a foreground fraction >= {self.min_foreground}: "
                    "lower min_foreground or change the split"
                )

    def check_model(self, model) -> None:
        """ValueError unless ``model.context_slices`` (0 for a model without it) is this data's:
        a model trained on other stacks than it sees would fail, or learn nothing of them."""
        model_k = int(getattr(model, "context_slices", 0))
        if model_k != self.context_slices:
            raise ValueError(f"the model's context_slices is {model_k} but the data's (data.params.context_slices) "
                             f"is {self.context_slices}: the model takes a stack of {1 + 2 * model_k} slice(s), the "
                             f"data gives {1 + 2 * self.context_slices}; set both to the same value")

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup()
        seed = self.seed if self.train_seed is None else int(self.train_seed)
        trainer = getattr(self, "trainer", None)  # under DDP each rank reads its share
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(self.train_set, seed, num_replicas=replicas, rank=rank, shuffle=True)
        return ResumableLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                               num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                               generator=torch.Generator().manual_seed(seed))

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup()
        return self._make(self.val_set, self.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup()
        return self._make(self.test_set, 1, shuffle=False)

    def _make(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # not torch's global generator
        )

    def test_slices(self) -> list[dict]:
        """Clean held-out test slices, sorted by (source, slice_index): dicts with
        clean (H,W) float32 [0,1], source, modality, slice_index, spacing (row, col, slice mm), norm,
        volume (the source's whole test slab, (S,H,W) float32 [0,1], one array shared by its
        slices, clean a view of it) and volume_index (the slice's position in it)."""
        if self.test_set is None:
            self.setup()
        by_file = {}
        for i, (k, z) in enumerate(self.test_set.items):
            by_file.setdefault(k, []).append((int(z), i))
        out = []
        for k, entries in by_file.items():
            entries.sort()
            zs = [z for z, _ in entries]
            if zs != list(range(zs[0], zs[0] + len(zs))):
                raise ValueError(f"the test slices of {self.test_set.files[k]} are not one slab: {zs}")
            volume = np.stack([self.test_set.clean_slice(i) for _, i in entries]).astype(np.float32, copy=False)
            meta = self.test_set.meta[k]
            for j, z in enumerate(zs):
                out.append(
                    {
                        "clean": volume[j],
                        "source": meta["source"],
                        "modality": meta["modality"],
                        "slice_index": z,
                        "spacing": meta["spacing"],
                        "norm": dict(meta["norm"]),
                        "volume": volume,
                        "volume_index": j,
                    }
                )
        return sorted(out, key=lambda d: (d["source"], d["slice_index"]))
