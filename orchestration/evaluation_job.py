"""From a run config to the evaluation: test slices of the data module and of the unseen
test volumes, denoisers, ``evaluate``."""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from diffusion_modules.diffusion_utils.manifest import infer_modality, volume_entry, volume_paths
from diffusion_modules.diffusion_utils.sampling import SamplingOptions
from evaluation.denoisers import build_denoiser, plain_dict
from evaluation.loop import evaluate
from evaluation.reporting import UNSEEN
from utils.initialize_configs import instantiate_from_configs, validate_target_config
from utils.intensity import MODALITIES, check_modality, normalize
from utils.paths import resolve_path
from utils.planes import ACQUISITION, PLANES, acquisition_plane, cut_plane
from utils.volume_io import file_sha256, is_nifti, load_volume, source_stem, voxel_fingerprint

PYDICOM_PREFIX = "pydicom:"  # pydicom:CT_small.dcm = a test file shipped inside the pydicom package
TEST_VOLUME_KEYS = ("path", "modality", "name", "label", "max_slices", "plane")


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


# ----------------------------------------------------------------------------- unseen volumes
def volume_path(path) -> Path:
    """Path of a config volume: ``pydicom:<file>`` is one of the test files inside the
    installed pydicom package (``pydicom.data.get_testdata_file``, never downloaded);
    anything else is read like the data module does (relative to the repository root)."""
    text = str(path)
    if not text.startswith(PYDICOM_PREFIX):
        return resolve_path(text)
    from pydicom.data import get_testdata_file

    name = text[len(PYDICOM_PREFIX):]
    found = get_testdata_file(name, download=False) if name else None
    if found is None:
        raise FileNotFoundError(f"{text}: the installed pydicom ships no test file {name!r}")
    return Path(found)


def parse_test_volumes(entries, default_max) -> list[dict]:
    """``evaluation.test_volumes`` entries (a path string or {path, modality, name, label,
    max_slices, plane}) as dicts with every key; names unique."""
    out = []
    for i, entry in enumerate(entries or []):
        entry = volume_entry(entry, TEST_VOLUME_KEYS, "evaluation.test_volumes", i)
        path = volume_path(entry["path"])
        name = entry.get("name") or source_stem(path)
        name = name[:-4] if name.lower().endswith(".dcm") else name
        plane = str(entry.get("plane") or ACQUISITION).lower()
        if plane not in PLANES + (ACQUISITION,):
            raise ValueError(f"evaluation.test_volumes entry {name!r}: plane {plane!r} is not one of "
                             f"{PLANES + (ACQUISITION,)}")
        out.append({
            "path": path, "name": str(name), "label": entry.get("label"), "plane": plane,
            "modality": check_modality(entry["modality"]) if entry.get("modality") else None,
            "max_slices": entry["max_slices"] if "max_slices" in entry else default_max,
        })
    names = [t["name"] for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluation.test_volumes names must be unique, got {names}")
    return out


def training_volume_paths(cfg) -> list[Path]:
    """The volume paths of the data section (``data.params.volumes``, globs and manifests
    expanded; none if absent)."""
    params = (cfg.get("data") or {}).get("params") or {}
    volumes = params.get("volumes") or []
    return volume_paths(volumes) if volumes else []  # globs and manifests expanded


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


def _voxel_shape(path: Path):
    """The sorted voxel counts of a NIfTI file from its header (the RAS array's axes are a
    permutation of them; a trailing axis of 1 dropped), None when unknown without loading."""
    if not is_nifti(path):
        return None
    import nibabel as nib

    try:
        shape = nib.load(str(path)).shape
    except Exception:  # unreadable: load_volume names it
        return None
    return tuple(sorted(shape[:3])) if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1) else None


def refuse_training_volumes(tests, train_paths) -> None:
    """ValueError naming both when a test volume has the path of a training volume, shares
    a file's content with one (sha256 of the bytes: an identical NIfTI, or a DICOM file of
    a training series), or has its voxels (``utils.volume_io.voxel_fingerprint`` of the RAS
    arrays: the same volume in another container, e.g. a .nii.gz re-saved as .nii or as a
    DICOM series). Only training files of a size some test file has are hashed, and only
    training volumes whose header shape matches a test volume's (DICOM: always) are loaded;
    built .h5 training files are compared by their bytes alone."""
    test_files = {t["name"]: [(f, f.stat().st_size) for f in _files(t["path"])] for t in tests}
    sizes = {size for files in test_files.values() for _, size in files}
    digests = {}

    def digest(f):
        if f not in digests:
            digests[f] = file_sha256(f)
        return digests[f]

    for t in tests:
        for train in train_paths:
            if t["path"].resolve() == train.resolve():
                raise ValueError(f"evaluation.test_volumes entry {t['name']!r} ({t['path']}) is the training "
                                 f"volume {train} of the data section (same path): test volumes must be "
                                 "volumes no training split touches")
            train_digests = {digest(f) for f in _files(train) if f.stat().st_size in sizes}
            shared = {digest(f) for f, _ in test_files[t["name"]]} & train_digests
            if shared:
                raise ValueError(f"evaluation.test_volumes entry {t['name']!r} ({t['path']}) has the content of "
                                 f"the training volume {train} of the data section (sha256 "
                                 f"{min(shared)[:12]}...): test volumes must be volumes no training split touches")
    voxels = {}
    for t in tests:
        volume = load_test_volume(t["path"])[0]
        voxels[voxel_fingerprint(volume)] = (t, tuple(sorted(volume.shape)))
    shapes = {shape for _, shape in voxels.values()}
    for train in train_paths:
        if not train.exists() or train.suffix.lower() == ".h5" or _voxel_shape(train) not in shapes | {None}:
            continue
        t, _ = voxels.get(voxel_fingerprint(load_test_volume(train)[0]), (None, None))
        if t is not None:
            raise ValueError(f"evaluation.test_volumes entry {t['name']!r} ({t['path']}) has the voxels of the "
                             f"training volume {train} of the data section (the same volume in another file): "
                             "test volumes must be volumes no training split touches")


def load_test_volume(path: Path):
    """``utils.volume_io.load_volume`` of a NIfTI file, a DICOM series folder
    or a single DICOM file (read as a series of one slice): RAS array, zooms, DICOM modality."""
    if path.is_dir() or is_nifti(path) or not path.exists():
        return load_volume(path)
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / path.name
        try:
            link.symlink_to(path.resolve())
        except OSError:
            shutil.copyfile(path, link)
        try:
            return load_volume(tmp)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def unseen_slices(tests) -> list[dict]:
    """Clean [0,1] slices of the test volumes (the project's loader, plane cut and
    normalization, as for training data), ``max_slices`` evenly spaced per volume,
    with set "unseen" and the entry's label. Each carries the whole volume ("volume":
    all its slices, (S,H,W) float32 [0,1], one array per volume; "clean" a view of it) and
    its position in it ("volume_index" = "slice_index"), for 2.5D and 3-D methods."""
    out = []
    for t in tests:
        ras, zooms, found = load_test_volume(t["path"])
        modality = t["modality"] or (found if found in MODALITIES else None) or infer_modality(t["path"])
        plane = acquisition_plane(zooms) if t["plane"] == ACQUISITION else t["plane"]
        volume, spacing = cut_plane(ras, zooms, plane)
        x01, norm = normalize(volume, modality)
        x01 = np.ascontiguousarray(x01, dtype=np.float32)
        slices = [{"clean": x01[z], "source": t["name"], "modality": modality, "slice_index": z,
                   "spacing": spacing, "norm": dict(norm), "set": UNSEEN, "label": t["label"],
                   "volume": x01, "volume_index": z}
                  for z in range(x01.shape[0])]
        out += limit_slices(slices, t["max_slices"])
    return out


def checked_test_volumes(cfg) -> list[dict]:
    """The parsed ``evaluation.test_volumes`` of a run config, none of them a training volume
    (ValueError otherwise); cheap, so the main job calls it before training."""
    ev = cfg.get("evaluation") or {}
    tests = parse_test_volumes(ev.get("test_volumes"), ev.get("max_slices_per_source"))
    refuse_training_volumes(tests, training_volume_paths(cfg))
    return tests


def run_evaluation(cfg, models: dict, *, out_dir, device: str | None = None, tests: list | None = None) -> dict:
    """Config -> test slices -> denoisers -> ``evaluate``.

    cfg: run config with ``data`` ({target, params} of the data module) and
      ``evaluation``: levels or sigmas (list of noise levels: sigma on [0,1] for
      gaussian/rician, i0 photons for lowdose_ct; ``levels`` wins when both are set),
      noise_seed, max_slices_per_source (int|null), methods (list of {name, type, params,
      sigma}), n_examples, and optionally noise_type ("gaussian"), noise_params (other
      noise model parameters, e.g. {n_angles: 180}), save_predictions (true) and
      test_volumes: volumes no training split touches (path string or {path, modality,
      name, label, max_slices, plane}; NIfTI, DICOM folder, a DICOM file or
      ``pydicom:<test file>``), scored as the set "unseen" beside the data module's
      test slabs ("same-subject"). A test volume with the path or the content of a
      volume of ``data.params.volumes`` is refused (ValueError). With lowdose_ct noise,
      non-CT test volumes are skipped with a warning.
    sampling: defaults for every ddpm method's ``denoise`` arguments (a method's own
      params win).
    models: loaded models by key ("ddpm", "unet", "ddpm_pretrained", ...); methods whose
      model is missing or None are skipped with a warning.
    device: where models run (default cuda if available, else cpu).
    tests: ``checked_test_volumes(cfg)`` when the caller has already checked them (the main
      job, before training), so the volumes are not read and compared twice.
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
    noise_type = str(ev.get("noise_type", "gaussian"))
    validate_target_config(cfg["data"], "data", allow_targets=cfg.get("allow_targets"))  # before any volume is read
    tests = checked_test_volumes(cfg) if tests is None else tests

    datamodule = instantiate_from_configs(cfg["data"], "data", allow_targets=cfg.get("allow_targets"))
    datamodule.prepare_data()
    datamodule.setup("test")
    slices = limit_slices(datamodule.test_slices(), ev.get("max_slices_per_source"))
    unseen = unseen_slices(tests)
    if noise_type == "lowdose_ct":
        skipped = sorted({s["source"] for s in unseen if s["modality"] != "ct"})
        if skipped:
            warnings.warn(f"lowdose_ct noise needs CT slices: skipping the test volume(s) {skipped}")
        unseen = [s for s in unseen if s["modality"] == "ct"]
    slices += unseen

    sampling = SamplingOptions.from_mapping(plain_dict(cfg.get("sampling") or {}))
    denoisers = []
    for i, entry in enumerate(ev["methods"]):
        kind = entry.get("type")
        key = entry.get("model", kind)
        if kind in ("ddpm", "unet") and models.get(key) is None:
            warnings.warn(f"skipping method {entry.get('name')!r}: no {key!r} model given")
            continue
        if kind == "ddpm":  # the run's sampling options, a method's own params winning
            options = sampling.updated(entry.get("params"), f"evaluation.methods[{i}].params")
            entry = {**entry, "params": options.as_kwargs()}
        denoisers.append(build_denoiser(entry, models, device=device))

    return evaluate(
        denoisers,
        slices,
        levels,
        out_dir,
        noise_seed=int(ev.get("noise_seed", 0)),
        noise_type=noise_type,
        save_predictions=bool(ev.get("save_predictions", True)),
        n_examples=int(ev.get("n_examples", 1)),
        noise_params=plain_dict(ev.get("noise_params") or {}),
    )
