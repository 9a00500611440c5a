"""Exports of assembled systems for other runtimes: :mod:`imedsam.export.onnx` (``imedsam export --format onnx``)
writes ONNX graphs (:mod:`~imedsam.export.graphs`) of an encoder prepared by :mod:`~imedsam.export.merge` (LoRA
folded, the frequency image as DFT matrices, :mod:`~imedsam.export.dft`) and a manifest
(:mod:`imedsam.infer.onnx_manifest`), which :mod:`imedsam.infer.onnx_runtime` runs with onnxruntime."""
