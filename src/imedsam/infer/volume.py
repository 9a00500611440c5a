"""A :class:`~imedsam.infer.segmenter.Segmenter` applied to a volume slice by slice (the prompts' geometry and
propagation are :mod:`imedsam.data.volume_prompts`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from imedsam.data.volume_prompts import SliceFrame, VolumePrompt, segment_volume


def slice_predictor(seg, display: np.ndarray, frame: SliceFrame, *, multimask: bool = False,
                    min_component: int = 0, scores: list[float] | None = None,
                    set_slice: Callable[[int], None] | None = None):
    """The 2-D predictor of :func:`segment_volume` for ``seg`` on a uint8 (D, H, W) display volume: each call
    encodes one slice (gray replicated to RGB) and decodes its prompts (a box reaching past the slice is clipped
    to it); the best-scored mask is returned and its score appended to ``scores``. ``set_slice(s)``, when given,
    puts slice ``s``'s embedding on ``seg`` instead of encoding it (e.g. from a server's cache)."""

    def predict(s: int, box, points, labels) -> np.ndarray:
        plane = frame.take(display, s)
        height, width = plane.shape
        if box is not None:
            box = [max(0.0, box[0]), max(0.0, box[1]), min(float(width), box[2]), min(float(height), box[3])]
        if set_slice is not None:
            set_slice(s)
        else:
            seg.set_image(np.repeat(plane[..., None], 3, axis=2))
        pred = seg.predict(box=box, points=points, point_labels=labels, multimask=multimask,
                           min_component=min_component)
        best = int(np.argmax(pred.scores))
        if scores is not None:
            scores.append(float(pred.scores[best]))
        return pred.masks[best]

    return predict


def segment_volume_with(seg, display: np.ndarray, prompt: VolumePrompt, frame: SliceFrame, *,
                        multimask: bool = False, min_component: int = 0,
                        on_slice: Callable[[int, np.ndarray], None] | None = None,
                        set_slice: Callable[[int], None] | None = None) -> tuple[np.ndarray, float]:
    """One object of a uint8 (D, H, W) volume -> (bool (D, H, W) mask, mean score of the predicted slices);
    ``set_slice`` as in :func:`slice_predictor`."""
    scores: list[float] = []
    predict = slice_predictor(seg, display, frame, multimask=multimask, min_component=min_component, scores=scores,
                              set_slice=set_slice)
    mask = segment_volume(predict, display.shape, prompt, frame, on_slice=on_slice)
    return mask, float(np.mean(scores)) if scores else float("nan")
