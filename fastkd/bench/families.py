"""The benchmark families, in the order the table prints them, and ``--loss`` name resolution."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from . import attention, divergences, fused_linear, relational, sparse
from .case import BenchCase

# family -> (module, the public losses it measures)
FAMILIES = {
    "kd": (divergences, ("kd_loss",)),
    "sparse_kd": (sparse, ("sparse_kd_loss",)),
    "fused_linear": (fused_linear, ("fused_linear_kd_loss",)),
    "attention": (attention, ("attention_transfer_loss", "attention_map_loss",
                              "attention_relation_loss")),
    "relational": (relational, ("rkd_distance_loss", "rkd_angle_loss",
                                "similarity_preserving_loss")),
}
LOSSES = tuple(loss for _, losses in FAMILIES.values() for loss in losses)
_CASE_TYPES = {c.__name__: c for c in (divergences.Case, sparse.SparseCase,
                                       fused_linear.FusedLinearCase, attention.TransferCase,
                                       attention.MapCase, attention.RelationCase,
                                       relational.RelationalCase)}


def _aliases() -> Dict[str, str]:
    """Every accepted --loss word -> a family or loss name: the names, and loss names without
    their ``_loss`` suffix (``rkd_angle``), ``sparse`` and ``lm`` for the LM-head families."""
    out = {f: f for f in FAMILIES}
    for loss in LOSSES:
        out[loss] = loss
        out[loss[:-len("_loss")]] = loss
    out["sparse"] = "sparse_kd"
    out["fused_linear_kd"] = "fused_linear"
    return out


NAMES = _aliases()


def resolve(words: Sequence[str]) -> List[str]:
    """--loss words -> family and loss names; raises ValueError naming an unknown word."""
    out = []
    for w in words:
        key = w.strip().lower()
        if key == "lm":
            out += ["sparse_kd", "fused_linear"]
        elif key in NAMES:
            out.append(NAMES[key])
        else:
            raise ValueError(f"unknown loss {w!r}; choose from families "
                             f"{', '.join(FAMILIES)} (or lm) or losses {', '.join(LOSSES)}")
    return out


def wanted(case: BenchCase, names: Optional[Sequence[str]]) -> bool:
    return not names or case.family in names or case.loss in names


def preset_cases(preset: str, device_type: str, losses: Optional[Sequence[str]] = None,
                 dtypes: Optional[Sequence[str]] = None, divergences_=None,
                 kd_shapes=None) -> List[BenchCase]:
    """Every family's preset cases in table order, filtered by ``losses`` (resolved names);
    ``dtypes`` replaces every family's dtypes, ``divergences_`` and ``kd_shapes`` kd's."""
    out: List[BenchCase] = []
    for family, (module, fam_losses) in FAMILIES.items():
        if losses and family not in losses and not set(fam_losses) & set(losses):
            continue
        if family == "kd":
            found = module.preset_cases(preset, device_type, dtypes, divergences_, kd_shapes)
        else:
            found = module.preset_cases(preset, device_type, dtypes)
        out += [c for c in found if wanted(c, losses)]
    return out


def case_from_dict(d: dict) -> BenchCase:
    """Inverse of ``BenchCase.to_dict`` (the child process gets its case this way)."""
    cls = _CASE_TYPES[d["case_type"]]
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in d.items() if k in fields})


def describe(family: str) -> str:
    """The first line of the family module's docstring."""
    return (FAMILIES[family][0].__doc__ or family).strip().splitlines()[0]
