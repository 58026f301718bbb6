"""The 2.5D condition: a slice and its ``context_slices`` k neighbours on each side.

The stack's channel order is [z, z-k, ..., z-1, z+1, ..., z+k]: the slice itself first, so
k = 0 is the single noisy slice. Neighbours are taken along the through-plane axis of the
slices' plane and reflected at the first and last slice (np.pad's "reflect": z-1 of slice 0
is slice 1). Each neighbour carries noise of its own, at the centre's level. Used by the
datasets (hdf5dataset.py), the DataModule and the models (which check their input width).
"""
import numpy as np

from diffusion_modules.diffusion_utils.noise import NOISE_TYPES, noise_at_level


def check_context_slices(value, where: str = "context_slices") -> int:
    """``value`` as the number of neighbouring slices on each side (an int >= 0); ValueError
    naming ``where`` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{where} must be an integer >= 0 (neighbouring slices on each side of the "
                         f"denoised slice), got {value!r}")
    return int(value)


def context_indices(z: int, k: int, n_slices: int) -> list[int]:
    """Slice indices of the condition stack of slice z with k neighbours on each side, in
    channel order [z, z-k, ..., z-1, z+1, ..., z+k], reflected at the first and last slice
    of a volume of ``n_slices`` (np.pad's "reflect": z-1 of slice 0 is slice 1, z+1 of the
    last is the one before it; repeated for k >= n_slices; a 1-slice volume repeats it)."""
    def reflect(i: int) -> int:
        if n_slices == 1:
            return 0
        period = 2 * (n_slices - 1)
        i %= period
        return period - i if i >= n_slices else i

    return [int(z)] + [reflect(z + d) for d in range(-k, 0)] + [reflect(z + d) for d in range(1, k + 1)]


def neighbour_noise(noise, sigma: float):
    """The noise model of a stack's neighbour slices: ``noise`` at the centre's drawn level
    ``sigma`` where its level is that sigma (gaussian, rician: one draw of a [lo, hi] range
    for the whole stack); any other model (low-dose CT: its level is i0) as it is."""
    kind = next((name for name, cls in NOISE_TYPES.items() if type(noise) is cls), None)
    if kind is not None and NOISE_TYPES[kind].level == "sigma":
        return noise_at_level(kind, sigma)
    return noise
