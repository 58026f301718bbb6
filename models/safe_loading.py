"""Loading this project's LightningModules from a checkpoint file, safely.

``SafeCheckpointLoading`` is a mixin of ``DDPM`` (so ``ConditionDDPM``) and ``SupervisedUNet``
that replaces Lightning's ``load_from_checkpoint``: the file is read with
``torch.load(weights_only=True)`` only, passed explicitly (neither an old torch nor
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 unpickles code); the model, UNet config included, is built
with the default target allowlist only; hyper-parameters retired by later versions are dropped.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import torch

from utils.initialize_configs import checkpoint_targets

#: Hyper-parameters that earlier versions saved and this one no longer takes, dropped from a
#: checkpoint by ``load_from_checkpoint``: ``val_denoise_steps`` (the DDIM
#: steps of the validation PSNR, now ``orchestration.callbacks.ValidationScores`` with the
#: run config's ``sampling``).
RETIRED_HPARAMS = frozenset({"val_denoise_steps"})


class SafeCheckpointLoading:
    """Mixin of a LightningModule: a ``load_from_checkpoint`` that never unpickles code."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only=True, **kwargs):
        """Lightning's ``load_from_checkpoint``, safe and for checkpoints of earlier versions too.

        The file is read with ``torch.load(weights_only=True)`` only, passed explicitly, so
        neither an old torch nor TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 unpickles code
        (another ``weights_only`` is refused); the model, UNet config included, is built with
        the default target allowlist only (``utils.initialize_configs.checkpoint_targets``).
        A hyper-parameter of ``RETIRED_HPARAMS`` is dropped before the model is built (Lightning
        would pass it on to ``__init__``, which takes ``**kwargs``). A local file is read once,
        into memory, and both the check and Lightning load from that copy."""
        if weights_only is not None and weights_only is not True:  # None: the default, True
            raise ValueError(f"{cls.__name__}.load_from_checkpoint({checkpoint_path!r}): weights_only="
                             f"{weights_only!r} refused; checkpoints are read with weights_only=True only")
        if hparams_file is None:
            checkpoint_path = _without_retired_hparams(checkpoint_path, map_location)
        with checkpoint_targets():
            return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, True, **kwargs)

def _without_retired_hparams(source, map_location):
    """What Lightning then loads: a binary file object (left at its position), or a local
    path's bytes read once into memory (so the file cannot change between this read and
    Lightning's), or, when the hyper-parameters hold a key of ``RETIRED_HPARAMS``, an
    in-memory copy without that key. Read with ``torch.load(weights_only=True)``, passed
    explicitly; the tensors where ``map_location`` puts them (default: their saved device
    when CUDA is available, else the CPU), so the copy loads onto the same devices."""
    if isinstance(source, (str, Path)) and "://" in str(source):
        return source  # a URL: left to Lightning, which is given weights_only=True too
    name = source if isinstance(source, (str, Path)) else getattr(source, "name", "the checkpoint file object")
    if isinstance(source, (str, Path)):
        source = io.BytesIO(Path(source).read_bytes())
    start = source.tell()
    where = map_location if map_location is not None else (None if torch.cuda.is_available() else "cpu")
    try:
        ckpt = torch.load(source, map_location=where, weights_only=True)
    except Exception as err:  # UnpicklingError of a pickle that would run code, a truncated or foreign file...
        lines = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        raise ValueError(f"{name}: cannot be read as a checkpoint with torch.load(weights_only=True) (refusing to "
                         f"unpickle anything but tensors and plain data): {type(err).__name__}"
                         f"{': ' + lines[0][:200] if lines else ''}") from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, Mapping) or not RETIRED_HPARAMS & set(hparams):
        source.seek(start)
        return source
    ckpt["hyper_parameters"] = {k: v for k, v in hparams.items() if k not in RETIRED_HPARAMS}
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    buffer.seek(0)
    return buffer
