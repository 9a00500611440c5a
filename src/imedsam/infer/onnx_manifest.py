"""``manifest.json`` of an ONNX export folder (``imedsam export --format onnx``): what each file is, its inputs
and outputs, and everything the runtime needs to rebuild the encoder input and the prompts exactly.

Layout (``format_version`` 1)::

    {"format": "imedsam-onnx", "format_version": 1,
     "model": {"name", "system", "config" (the system's config, as an adapter file stores it), "adapter",
               "adapter_sha256"},
     "preprocess": {"img_size", "normalize", "pixel_mean", "pixel_std", "resize_longest_side", "pad", "pipeline"},
     "prompts": {"frame", "labels", "embedding_size", "mask_input_size"},
     "graphs": {"encoder": {"file", "bytes", "sha256", "inputs": [{"name", "shape", "dtype"}], "outputs": [...]},
                "decoder" | "trunk", "implicit_coarse", "implicit_fine": ...},
     "implicit": {"refine", "seed", "mc_samples", "topk_ratio"} or null,
     "merged": [...], "rewritten": [...], "not_exported": [...], "check": {graph: max |torch - onnxruntime|},
     "versions": {"imedsam", "torch", "onnx", "opset"}, "created": ISO time}

Shapes list ints, or a name for a dynamic axis (``"num_points"``, ``"num_queries"``). The graphs are described in
:mod:`imedsam.export.graphs`. This module only reads and validates (the runtime, :mod:`imedsam.infer.onnx_runtime`);
:mod:`imedsam.export.onnx` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from imedsam.errors import ImedsamError

FORMAT = "imedsam-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

#: label values of the SAM prompt layout (SAM's own ONNX export): a box is its two corners
POINT_LABELS = {"1": "foreground point", "0": "background point",
                "-1": "padding point at (0, 0), appended after the points when there is no box",
                "2": "box top-left corner (x0, y0)", "3": "box bottom-right corner (x1, y1)"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    """One graph input or output: ``shape`` holds ints, or names for dynamic axes."""

    name: str
    shape: list[int | str]
    dtype: Literal["float32", "int64"]


class GraphFile(_Strict):
    """One ``.onnx`` file of the export."""

    file: str
    bytes: int
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


class ModelInfo(_Strict):
    name: str
    system: str
    config: dict[str, Any]
    adapter: str | None = None
    adapter_sha256: str | None = None


class PreprocessInfo(_Strict):
    img_size: int
    normalize: Literal["sam", "minmax", "unit"]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    resize_longest_side: bool = True
    pad: Literal["bottom_right"] = "bottom_right"
    pipeline: Literal["imedsam", "official"] = "imedsam"


class PromptInfo(_Strict):
    frame: str
    labels: dict[str, str]
    embedding_size: tuple[int, int]
    mask_input_size: tuple[int, int]


class ImplicitInfo(_Strict):
    """The implicit decoder's inference as exported: ``refine`` False is the coarse decoder alone."""

    refine: bool
    seed: int | None
    mc_samples: int
    topk_ratio: float


class Manifest(_Strict):
    format: Literal["imedsam-onnx"] = FORMAT
    format_version: int = FORMAT_VERSION
    model: ModelInfo
    preprocess: PreprocessInfo
    prompts: PromptInfo
    graphs: dict[str, GraphFile]
    implicit: ImplicitInfo | None = None
    merged: list[str] = []
    rewritten: list[str] = []
    not_exported: list[str] = []
    check: dict[str, float] = {}
    versions: dict[str, str] = {}
    created: str = ""

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1) + "\n"


def read_manifest(folder: str | Path, argument: str = "--onnx-dir") -> tuple[Path, Manifest]:
    """The resolved folder and its validated manifest; every graph file must be there with its recorded size.

    Raises a one-line :class:`ImedsamError` for a missing folder or manifest, another format or version, a manifest
    that does not parse, or a file that is missing or of another size than the manifest says.
    """
    root = Path(folder)
    hint = "export one with `imedsam export --format onnx --out DIR`"
    if not root.is_dir():
        raise ImedsamError(f"{argument} {folder}: no such folder; {hint}")
    path = root / MANIFEST
    if not path.is_file():
        raise ImedsamError(f"{argument} {folder}: no {MANIFEST}, not an imedsam ONNX export; {hint}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ImedsamError(f"{argument} {folder}: cannot read {MANIFEST} ({exc}); export again") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ImedsamError(f"{argument} {folder}: {MANIFEST} is not an imedsam ONNX manifest; {hint}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ImedsamError(f"{argument} {folder}: manifest format_version {raw.get('format_version')!r}, this "
                           f"imedsam reads {FORMAT_VERSION}; export again with this version")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ImedsamError(f"{argument} {folder}: {MANIFEST} key {key}: {err['msg']}; export again") from None
    for name, graph in manifest.graphs.items():
        file = root / graph.file
        if not file.is_file():
            raise ImedsamError(f"{argument} {folder}: {graph.file} ({name} graph) is missing; export again")
        if file.stat().st_size != graph.bytes:
            raise ImedsamError(f"{argument} {folder}: {graph.file} has {file.stat().st_size} bytes, the manifest "
                               f"says {graph.bytes}; the folder was modified, export again")
    return root.resolve(), manifest
