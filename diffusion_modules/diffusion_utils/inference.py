"""Inference speed options of a diffusion model's network: bf16 autocast, channels_last,
torch.compile and CUDA graphs, as one typed object (``InferenceOptions``) and one context
(``optimized_networks``) that applies them to the networks for the length of a call.

Only the network runs differently: inside the context each given module's ``forward`` is
replaced (an instance attribute, removed again on exit) by a wrapper that makes the input
channels_last, runs the class's own ``forward`` (compiled, or not) under
``torch.autocast(bfloat16)`` and returns float32, so the sampler's arithmetic (the DDIM
update, clipping, the ensemble mean) stays in float32 whatever the options. Weights that take
gradients and were turned channels_last are turned back on exit, so a model in training (an
optimizer holding its parameters) is left as it was found; weights that take none (an EMA
copy, a model loaded for inference with ``requires_grad_(False)``) stay channels_last, so the
next call neither converts them again nor, with CUDA graphs, re-records its graphs.

- ``precision``: ``fp32`` or ``bf16`` (autocast: convolutions, matmuls and attention in
  bfloat16 with float32 accumulation; on CPU and on CUDA devices that support it).
- ``channels_last``: NHWC weights and inputs (cuDNN / oneDNN convolution layouts).
- ``compile``: ``torch.compile`` of the network's ``forward`` (compiled once per class and
  mode, per process; new shapes recompile, so batch the same tile size).
- ``cuda_graphs``: ``torch.compile(mode="reduce-overhead")``, which records CUDA graphs for
  each input shape and replays them (implies ``compile``). On a CPU device it is plain
  compile (inductor records no graphs there), with a warning.
"""
from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Iterator, Mapping

import torch

from utils.config_keys import check_keys
from utils.initialize_configs import ConfigError

PRECISIONS = ("fp32", "bf16")
#: short names of the options in ``InferenceOptions.parse`` / ``describe`` (benchmark rows, CLI)
TOKENS = {"fp32": ("precision", "fp32"), "bf16": ("precision", "bf16"), "cl": ("channels_last", True),
          "channels_last": ("channels_last", True), "compile": ("compile", True), "graphs": ("cuda_graphs", True),
          "cuda_graphs": ("cuda_graphs", True)}


@dataclass(frozen=True)
class InferenceOptions:
    """How the network runs when a model denoises (module docstring). The default is the
    plain float32 eager path; ``model.denoise(noisy, inference=...)`` takes this object, a
    mapping of its fields or None (the default)."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False

    TYPES = {"precision": (str,), "channels_last": (bool,), "compile": (bool,), "cuda_graphs": (bool,)}

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} unknown; expected one of {PRECISIONS}")
        for name in ("channels_last", "compile", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_mapping(cls, values: Mapping | None, path: str = "inference") -> "InferenceOptions":
        """Options from a config mapping; an unknown key or a wrong type is a ConfigError
        naming ``path.key``, a bad value one naming ``path``."""
        values = dict(values or {})
        check_keys(values, [f.name for f in fields(cls)], cls.TYPES, path)
        try:
            return cls(**values)
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from err

    @classmethod
    def coerce(cls, value, path: str = "inference") -> "InferenceOptions | None":
        """None, an ``InferenceOptions`` or a mapping of its fields (checked) -> options or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls.from_mapping(value, path)
        raise ConfigError(f"{path}: expected a mapping of {', '.join(f.name for f in fields(cls))} or null, "
                          f"got {value!r} ({type(value).__name__})")

    @classmethod
    def parse(cls, text: str) -> "InferenceOptions":
        """From a '+'-joined row name such as ``bf16+cl+compile`` (tokens of ``TOKENS``)."""
        values = {}
        for token in filter(None, text.split("+")):
            if token not in TOKENS:
                raise ValueError(f"option {token!r} unknown in {text!r}; expected '+'-joined tokens of "
                                 f"{', '.join(TOKENS)}")
            key, value = TOKENS[token]
            values[key] = value
        return cls(**values)

    def describe(self) -> str:
        """The short row name, e.g. ``bf16+cl+compile`` (``parse`` reads it back)."""
        parts = [self.precision] + [name for name, on in (("cl", self.channels_last), ("compile", self.compile),
                                                           ("graphs", self.cuda_graphs)) if on]
        return "+".join(parts)

    def as_mapping(self) -> dict:
        return asdict(self)

    @property
    def plain(self) -> bool:
        """True for the default eager float32 path (nothing to apply)."""
        return self == InferenceOptions()

    @property
    def compile_mode(self) -> str | None:
        """The ``torch.compile`` mode, or None for eager."""
        if self.cuda_graphs:
            return "reduce-overhead"
        return "default" if self.compile else None


#: torch.compile's backend; tests on CPU set "aot_eager" to run the compiled path in seconds
#: (graph capture without inductor's C++ code generation)
COMPILE_BACKEND = "inductor"


@functools.lru_cache(maxsize=None)
def compiled_forward(cls: type, mode: str, backend: str = "inductor"):
    """``torch.compile`` of ``cls.forward`` (the module passed as its first argument), one
    per class, mode and backend, so a model's training and EMA copies share the compiled code."""
    if backend != "inductor":  # modes are inductor's
        return torch.compile(cls.forward, backend=backend)
    return torch.compile(cls.forward, mode=mode)


class FastForward:
    """The wrapper installed as a module's ``forward`` (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, options: InferenceOptions):
        self.module, self.options = module, options
        mode = options.compile_mode
        self.fn = type(module).forward if mode is None else compiled_forward(type(module), mode, COMPILE_BACKEND)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        options = self.options
        if options.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if options.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are consumed
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=options.precision == "bf16"):
            out = self.fn(self.module, x, *args, **kwargs)
        # float32, standard layout; a copy under CUDA graphs, whose output buffer the next replay overwrites
        return out.to(torch.float32, memory_format=torch.contiguous_format, copy=options.cuda_graphs)


def check_device(options: InferenceOptions, device: torch.device) -> None:
    """ValueError for bf16 on a CUDA device without bfloat16; a warning for CUDA graphs off CUDA."""
    if options.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16: the CUDA device {device} does not support bfloat16; use fp32")
    if options.cuda_graphs and device.type != "cuda":
        warnings.warn(f"cuda_graphs on a {device.type} device: compiled without graphs (CUDA graphs need CUDA)")


def _to_memory_format(module: torch.nn.Module, memory_format) -> list[torch.Tensor]:
    """Turn the 4-D parameters and buffers of ``module`` to ``memory_format`` in place (their
    ``.data``: optimizers keep the same Parameter objects); returns those that changed."""
    changed = []
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.ndim == 4 and not tensor.is_contiguous(memory_format=memory_format):
            tensor.data = tensor.data.contiguous(memory_format=memory_format)
            changed.append(tensor)
    return changed


@contextmanager
def optimized_networks(modules: Iterable[torch.nn.Module | None], options, device=None) -> Iterator[None]:
    """Run ``modules`` (None entries skipped) with ``options`` (``InferenceOptions``, a mapping
    or None) inside the block; everything is restored on exit, also after an error."""
    options = InferenceOptions.coerce(options)
    modules = list({id(m): m for m in modules if m is not None}.values())
    if options is None or options.plain or not modules:
        yield
        return
    check_device(options, torch.device(device) if device is not None else next(modules[0].parameters()).device)
    changed, installed = [], []
    try:
        for module in modules:
            if "forward" in module.__dict__:
                raise RuntimeError(f"{type(module).__name__} already runs with inference options (nested call)")
            if options.channels_last:
                changed += _to_memory_format(module, torch.channels_last)
            module.forward = FastForward(module, options)
            installed.append(module)
        yield
    finally:
        for module in installed:
            del module.forward
        for tensor in changed:
            if tensor.requires_grad:  # in training; no-grad weights keep the layout for the next call
                tensor.data = tensor.data.contiguous()
