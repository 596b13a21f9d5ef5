"""What every benchmark family shares: the case protocol, the ``Impl`` record, the baselines.

A family module (``divergences``, ``sparse``, ``fused_linear``, ``attention``, ``relational``)
defines frozen dataclasses derived from ``BenchCase``, one per problem, and
``preset_cases(preset, device_type, dtypes=None)``. The harness only talks to this protocol:

* ``make_inputs(device, seed)`` -> ``(args, leaves)``: ``fn(*args)`` is the loss; ``leaves`` are
  the tensors that get a gradient (the student's), cleared before every call;
* ``implementations(device, selected)`` -> ``[Impl]``: fastkd backends, then eager PyTorch,
  ``torch.compile`` of that same eager function and Liger-Kernel where it has the loss;
* ``bytes`` / ``flops``: the memory traffic or the arithmetic one call needs, counted explicitly
  in code (None where the family defines no such count), for GB/s and TFLOP/s;
* ``scaled(factor)``: the same case with its batch dimension scaled (``--plot``'s size sweep);
  ``size`` names that dimension and its value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASELINES = ("eager", "compile", "liger")
_DISPLAY = {"compile": "torch.compile", "eager": "eager"}


@dataclass
class Impl:
    """A named way to compute one case: ``fn(*args) -> scalar loss``."""

    name: str          # what --backend filters on: cpp, torch, triton, cuda, eager, compile, liger
    kind: str          # "fastkd" or "baseline"
    fn: Callable
    warmup: int = 1    # untimed calls before timing (torch.compile compiles on the first)

    @property
    def display(self) -> str:
        if self.kind == "fastkd":
            return f"fastkd[{self.name}]"
        return _DISPLAY.get(self.name, self.name)


def fastkd_backends(device, family: str = "kd") -> List[str]:
    """fastkd backends that run ``family`` natively on ``device`` (never the Triton interpreter
    on CPU), fastest first as the automatic choice orders them."""
    import fastkd

    dev = torch.device(device)
    names = [b for b, why in fastkd.available_backends(dev, family).items() if why is None]
    if dev.type != "cuda":
        names = [b for b in names if b != "triton"]
    order = {"cuda": 0, "triton": 1, "cpp": 2, "torch": 3}
    return sorted(names, key=lambda b: order.get(b, 9))


def implementations_for(device, backend_family: str, fastkd_fn: Callable[[str], Callable],
                        eager_fn: Callable, liger_fn: Optional[Callable] = None,
                        selected: Optional[List[str]] = None) -> List[Impl]:
    """fastkd on each available backend (``fastkd_fn(backend)``), eager, torch.compile of eager,
    and Liger (CUDA only, when given); ``selected`` keeps only the names listed."""
    dev = torch.device(device)
    out = [Impl(b, "fastkd", fastkd_fn(b)) for b in fastkd_backends(dev, backend_family)]
    out.append(Impl("eager", "baseline", eager_fn))
    out.append(Impl("compile", "baseline", torch.compile(eager_fn, dynamic=False), warmup=2))
    if dev.type == "cuda" and liger_fn is not None:
        out.append(Impl("liger", "baseline", liger_fn))
    if selected:
        out = [i for i in out if i.name in selected]
    return out


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class BenchCase:
    """Base of every case; subclasses are frozen dataclasses with a ``dtype`` field."""

    family = "?"       # the bench family: kd, sparse_kd, fused_linear, attention, relational
    loss = "?"         # the public fastkd function measured
    SIZE_FIELD = "n"          # the field ``scaled`` multiplies: the batch dimension
    SIZE_NAME = "N (rows)"    # its name on the plot's x axis
    BYTES_FORMULA = None      # how ``bytes`` / ``flops`` count, printed with the results
    FLOPS_FORMULA = None

    @property
    def name(self) -> str:
        """Short variant name without spaces: the divergence, the map kind, the relational loss."""
        raise NotImplementedError

    @property
    def shape(self) -> str:
        """The problem size as one word, e.g. ``4096x32000`` or ``N2048,D512``."""
        raise NotImplementedError

    @property
    def size(self) -> Tuple[str, int]:
        """(name of the dimension ``scaled`` changes, its value), for the plot's x axis."""
        return self.SIZE_NAME, getattr(self, self.SIZE_FIELD)

    def scaled(self, factor: float) -> "BenchCase":
        value = max(1, int(round(getattr(self, self.SIZE_FIELD) * factor)))
        return dataclasses.replace(self, **{self.SIZE_FIELD: value})

    @property
    def bytes(self) -> Optional[int]:
        return None

    @property
    def flops(self) -> Optional[int]:
        return None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        return f"{self.loss} {self.name} {self.dtype} {self.shape}"

    @property
    def series(self) -> str:
        """The label with ``*`` for the swept dimension: the cases one plotted line joins.
        (``shape`` only formats its fields, so a ``*`` in the size field prints as ``*``.)"""
        return dataclasses.replace(self, **{self.SIZE_FIELD: "*"}).label

    def make_inputs(self, device, seed: int = 0):
        raise NotImplementedError

    def implementations(self, device, selected: Optional[List[str]] = None) -> List[Impl]:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """Every field, plus what names the case; enough for ``families.case_from_dict``."""
        return {"case_type": type(self).__name__, "family": self.family, "loss": self.loss,
                "case": self.name, "shape": self.shape, **dataclasses.asdict(self)}
