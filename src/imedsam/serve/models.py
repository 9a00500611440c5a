"""The models a server offers, by name: the default model and the complete runs under ``--runs``. A client picks
one by its name; nothing it sends is ever used as a path. Models are built on first use, once."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path

from imedsam.errors import ImedsamError
from imedsam.infer.segmenter import Segmenter
from imedsam.serve.settings import ServeSettings


@dataclass(frozen=True)
class ModelEntry:
    """One offered model: ``name`` (what clients send), the registry model or the run folder it is built from,
    and what it can do."""

    name: str
    model: str | None
    adapter: Path | None
    prompt_types: tuple[str, ...]
    has_uncertainty: bool
    prompt_free: bool
    volume: bool = False  # segments whole volumes from stacks of slices (MA-SAM): auto / 3-D box only

    def public(self) -> dict:
        return {"name": self.name, "prompt_types": list(self.prompt_types), "uncertainty": self.has_uncertainty,
                "prompt_free": self.prompt_free, "volume": self.volume,
                "kind": "run" if self.adapter is not None else "model"}


def _entry(name: str, model: str | None, adapter: Path | None) -> ModelEntry:
    from imedsam.models.registry import saved_config, system_class

    cls = system_class(model, adapter=adapter)
    prompt_types, prompt_free = (cls.prompt_types, cls.prompt_free) if adapter is None else \
        cls.prompts_for(saved_config(adapter)[1])  # a run may be a variant (MA-SAM's box-prompted decoder)
    return ModelEntry(name, model, adapter, tuple(sorted(prompt_types)), bool(cls.has_uncertainty),
                      bool(prompt_free), hasattr(cls, "predict_volume"))


def _runs(folder: Path) -> list[Path]:
    from imedsam.models.registry import ADAPTER_FILES

    return sorted(p for p in folder.iterdir() if p.is_dir() and any((p / f).is_file() for f in ADAPTER_FILES))


class ModelCatalog:
    """Offered models and their loaded :class:`Segmenter` (one per model, shared by every session through
    :meth:`Segmenter.fork`)."""

    def __init__(self, settings: ServeSettings, *, loaded: dict[str, Segmenter] | None = None) -> None:
        self.settings = settings
        if settings.adapter is not None:
            default = _entry(Path(settings.adapter).name, None, Path(settings.adapter))
        else:
            default = _entry(settings.model, settings.model, None)
        self.entries: dict[str, ModelEntry] = {default.name: default}
        if settings.runs is not None:
            for run in _runs(Path(settings.runs)):
                name = f"run:{run.name}"
                if name not in self.entries:
                    self.entries[name] = _entry(name, None, run)
        self.default = default.name
        self._loaded: dict[str, Segmenter] = dict(loaded or {})
        for key, seg in self._loaded.items():  # a model given built: what it takes is its own
            if key in self.entries:
                self.entries[key] = replace(self.entries[key], prompt_types=tuple(sorted(seg.system.prompt_types)),
                                            prompt_free=bool(seg.system.prompt_free))
        self._lock = threading.Lock()

    def entry(self, name: str | None) -> ModelEntry:
        key = name or self.default
        if key not in self.entries:
            raise ImedsamError(f"model {key!r} is not offered by this server; choose one of "
                               f"{', '.join(self.entries)} (GET /api/models)")
        return self.entries[key]

    def segmenter(self, name: str | None) -> Segmenter:
        """The shared Segmenter of ``name`` (built on first use; callers use a :meth:`Segmenter.fork`)."""
        entry = self.entry(name)
        with self._lock:
            if entry.name not in self._loaded:
                self._loaded[entry.name] = Segmenter(entry.model, adapter=None if entry.adapter is None
                                                     else str(entry.adapter), device=self.settings.device,
                                                     precision=self.settings.precision)
            return self._loaded[entry.name]
