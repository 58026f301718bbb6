"""The DataModule's HDF5 cache of a volume (utils.create_training_images.save_as_hdf5): a built
file is reused only while it holds the same content of the source (sha256, never the file
times: a source replaced by an older file is noticed) built with the same settings, and is
consistent with itself (hdf5dataset.check_layout); otherwise it is rebuilt."""
from __future__ import annotations

import warnings
from pathlib import Path

import h5py

from diffusion_modules.diffusion_utils.hdf5dataset import REQUIRED, check_layout
from utils.create_training_images import FORMAT_VERSION
from utils.planes import ACQUISITION


def _same(stored, wanted) -> bool:
    """A stored attribute equals the wanted value (read back as the wanted value's type)."""
    if stored is None:
        return False
    try:
        return type(wanted)(stored.decode() if isinstance(stored, bytes) else stored) == wanted
    except (TypeError, ValueError):
        return False


def stale_reason(target: Path, source: Path, fingerprint: str, settings: dict, plane: str) -> str | None:
    """None when ``target`` can be reused for ``source``, else why not: missing or
    unreadable, another format_version, source name, source content (``fingerprint``:
    utils.volume_io.source_fingerprint), setting (``settings``: modality, image_size, stride,
    slice_step, min_foreground) or plane (a plane name, or "acquisition": the file's own
    acquisition plane), a missing dataset, or an inconsistent file (a warning names the
    file and the field, see hdf5dataset.check_layout)."""
    if not target.is_file():
        return "missing"
    wanted = {"format_version": FORMAT_VERSION, "source": source.name, "source_sha256": fingerprint, **settings}
    try:
        with h5py.File(target, "r") as f:
            attrs = f.attrs
            for key, value in wanted.items():
                if not _same(attrs.get(key), value):
                    return f"attribute {key} is {attrs.get(key)!r}, wanted {value!r}"
            own = attrs.get("acquisition_plane") if plane == ACQUISITION else plane
            if str(attrs.get("plane")) != str(own):
                return f"plane {attrs.get('plane')!r}, wanted {own!r}"
            missing = [k for k in REQUIRED if k not in f]
            if missing:
                return f"lacks the dataset(s) {missing}"
            try:
                check_layout(f, target)
            except ValueError as err:
                warnings.warn(f"rebuilding the cache {target}: {err}")
                return str(err)
    except OSError as err:
        return f"unreadable ({err})"
    return None
