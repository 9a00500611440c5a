"""Training objectives: how a system learns from a batch. The loop (:mod:`imedsam.train.loop`) knows none by
name; a system names its objective in its registry entry (:class:`imedsam.models.spec.SystemSpec.objective`).

* ``implicit_points`` (I-MedSAM): coarse + fine losses on sampled query points of the implicit decoder.
* ``iterative_clicks`` (SAM-Med2D): a box or point pass, then decoder-only passes with clicks from the error.
* ``multiclass_stacks`` (MA-SAM): stacks of adjacent slices, CE + Dice over every class, prompt-free.

A new objective is a module here with a class derived from :class:`~imedsam.train.objectives.base.Objective`
and one line in :data:`OBJECTIVES`.
"""

from __future__ import annotations

from pydantic import BaseModel

from imedsam.errors import ImedsamError
from imedsam.train.objectives.base import Objective
from imedsam.train.objectives.implicit_points import ImplicitPointsObjective
from imedsam.train.objectives.iterative_clicks import IterativeClickObjective
from imedsam.train.objectives.multiclass_stacks import MulticlassStacksObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "implicit_points": ImplicitPointsObjective,
    "iterative_clicks": IterativeClickObjective,
    "multiclass_stacks": MulticlassStacksObjective,
}

__all__ = ["OBJECTIVES", "Objective", "get_objective", "objective_config"]


def get_objective(name: str, system: str = "") -> type[Objective]:
    if name not in OBJECTIVES:
        trainable = ", ".join(sorted(OBJECTIVES))
        raise ImedsamError(f"model.system {system!r} has no training objective here (a zero-shot backbone, or a "
                           f"system whose objective is not built yet); the objectives are {trainable}")
    return OBJECTIVES[name]


def objective_config(name: str) -> type[BaseModel]:
    """The config class of an objective (the ``objective`` section of a training config)."""
    if not name:
        return _NoObjective
    return get_objective(name).Config


class _NoObjective(BaseModel):
    model_config = {"extra": "forbid"}
