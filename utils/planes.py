"""Planes of a RAS volume: which array axes become slices, rows and columns.

Volumes are (X, Y, Z) arrays on the closest RAS axes (see utils.volume_io). Slices are cut
in radiological display: axial (anterior up, patient's right on the image left), coronal
(superior up, patient's right on the image left), sagittal (superior up, anterior on the
image left). "acquisition" is the plane across the axis with the thickest voxels.
"""
from __future__ import annotations

import numpy as np

PLANES = ("axial", "coronal", "sagittal")
ACQUISITION = "acquisition"
# RAS axes (0 x: right, 1 y: anterior, 2 z: superior) that become the (slice, row, col)
# axes of each plane. Rows and columns run backwards along their RAS axis (radiological
# display), slices forwards.
PLANE_AXES = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}


def parse_planes(planes) -> str | tuple[str, ...]:
    """"acquisition", or a tuple of distinct plane names from a plane name or a list of them;
    ValueError naming the bad value and the allowed ones otherwise."""
    allowed = f"allowed: {', '.join(PLANES)} (one or a list of them) or the string '{ACQUISITION}'"
    if isinstance(planes, str):
        if planes.lower() == ACQUISITION:
            return ACQUISITION
        items = [planes]
    else:
        try:
            items = list(planes)
        except TypeError:
            raise ValueError(f"planes {planes!r} is not a plane name or a list of them; {allowed}") from None
    if not items:
        raise ValueError(f"planes is an empty list; {allowed}")
    for item in items:
        if not isinstance(item, str) or item.lower() not in PLANES:
            raise ValueError(f"unknown plane {item!r} in planes {planes!r}; {allowed}")
    names = tuple(item.lower() for item in items)
    if len(set(names)) != len(names):
        raise ValueError(f"planes {list(names)} repeats a plane; {allowed}")
    return names


def acquisition_plane(zooms) -> str:
    """The plane across the RAS axis with the thickest voxels; (x, y, z) zooms in mm.
    Ties (within 0.1%) go to axial, then coronal."""
    thickest = max(float(z) for z in zooms)
    return next(p for p in PLANES if float(zooms[PLANE_AXES[p][0]]) >= thickest * (1 - 1e-3))


def cut_plane(ras: np.ndarray, zooms, plane: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(S, H, W) slices (a view) of an (X, Y, Z) RAS array in one plane (radiological
    display, see the module docstring) and their (row, col, slice) spacing in mm."""
    s, r, c = PLANE_AXES[plane]
    volume = ras.transpose(s, r, c)[:, ::-1, ::-1]
    return volume, (float(zooms[r]), float(zooms[c]), float(zooms[s]))
