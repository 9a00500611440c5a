"""imedsam: Segment Anything adapted to medical images with parameter-efficient fine-tuning.

The one data flow (see ``docs``/README): ``io`` reads a file into a :class:`~imedsam.io.sample.Sample`,
``infer``/``train``/``evaluate`` prepare it for a backbone from ``sam`` (optionally adapted by ``peft`` and
decoded by ``decoders``), and the prediction is restored onto the sample's original geometry.
"""

__version__ = "0.1.0"
