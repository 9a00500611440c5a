"""`imedsam segment VOLUME`: a NIfTI / MHA / NRRD file or a DICOM series folder, segmented slice by slice from a
3D box or points (:mod:`imedsam.data.volume_prompts`), written as a label volume on the input's grid."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from imedsam.cli_common import build_segmenter, check_outputs, parse_window, system_class_for
from imedsam.errors import ImedsamError
from imedsam.io.sample import Sample

#: what a label volume can be written as (single files, so that the write is atomic)
LABEL_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".nrrd")


def _refuse_2d_options(args: argparse.Namespace) -> None:
    image = args.image
    if args.box is not None:
        raise ImedsamError(f"--box: {image} is a volume; give --box3d I0 J0 K0 I1 J1 K1 (voxel indices along the "
                           "file's axes, half-open), or --propagate from it")
    if args.auto and (args.box3d or args.point or args.propagate):
        raise ImedsamError("--auto: a prompt-free model takes no --box3d / --point / --propagate")
    for flag, given in (("--mask-input", args.mask_input), ("--size", args.size),
                        ("--uncertainty", args.uncertainty)):
        if given:
            raise ImedsamError(f"{flag}: 2D images only; {image} is a volume (its labels are written on its grid)")
    if args.point and any(len(p) != 4 for p in args.point):
        bad = next(p for p in args.point if len(p) != 4)
        raise ImedsamError(f"--point: {image} is a volume: give I J K LABEL (voxel indices) per point, got {bad}")


def _check_volume_outputs(args: argparse.Namespace, sample: Sample) -> None:
    from imedsam.io.atomic import full_suffix

    if full_suffix(Path(args.out)) == ".dcm":
        from imedsam.io.dicom_seg import check_dicom_seg

        check_dicom_seg(sample, f"--out {args.out}")
    elif full_suffix(Path(args.out)) not in LABEL_SUFFIXES:
        raise ImedsamError(f"--out {args.out}: a volume's labels are written as a volume; use one of "
                           f"{', '.join(LABEL_SUFFIXES)} (e.g. labels.nii.gz), or .dcm (a DICOM-SEG of a DICOM "
                           "series)")
    if full_suffix(Path(args.out)) in (".mha", ".nrrd"):
        try:
            import SimpleITK  # noqa: F401
        except ImportError:
            raise ImedsamError(f"--out {args.out}: MHA/NRRD files need SimpleITK; pip install 'imedsam[volumes]' "
                               "or write .nii.gz") from None
    if args.overlay and not args.overlay.lower().endswith(".png"):
        raise ImedsamError(f"--overlay {args.overlay}: the overlay of a volume is one slice as PNG; use a .png name")
    check_outputs({"image": args.image}, {"--out": args.out, "--overlay": args.overlay})


def segment_volume_command(args: argparse.Namespace, sample: Sample) -> int:
    """Check every argument against the volume, then segment it and write the label volume (and an overlay of
    the slice with the largest mask); prints a JSON summary."""
    from tqdm.auto import tqdm

    from imedsam import io
    from imedsam.data.volume_prompts import SliceFrame, VolumePrompt, check_volume_prompt, planned_slices
    from imedsam.infer.volume import segment_volume_with

    _refuse_2d_options(args)
    _check_volume_outputs(args, sample)
    if args.auto:
        return _segment_volume_stacks(args, sample)
    frame = SliceFrame(args.axis)
    shape = tuple(int(n) for n in sample.geometry.shape)
    prompt = VolumePrompt(box3d=tuple(args.box3d) if args.box3d else None,
                          points=np.asarray(args.point, dtype=np.float64) if args.point else None,
                          propagate=args.propagate)
    check_volume_prompt(prompt, shape)
    model = args.model or ("litemedsam" if args.adapter is None else None)
    cls = system_class_for(args, model)
    if hasattr(cls, "predict_volume"):  # a volume system (MA-SAM): stacks of slices, one 3-D box per scan
        if args.point or args.propagate:
            raise ImedsamError(f"{'--point' if args.point else '--propagate'}: {model or args.adapter!r} sees "
                               "stacks of slices and takes one --box3d per scan (box-prompted) or none (--auto)")
        return _segment_volume_stacks(args, sample, box3d=prompt.box3d)
    for flag, given in (("--stack-stride", args.stack_stride != 1), ("--stack-axes", args.stack_axes)):
        if given:
            raise ImedsamError(f"{flag}: goes with a model that sees stacks of slices (a ma_sam run); "
                               f"{model or args.adapter!r} segments slice by slice")
    for kind, flag, given in (("box", "--box3d", args.box3d or args.propagate), ("points", "--point", args.point)):
        if given and kind not in cls.prompt_types:
            raise ImedsamError(f"{flag}: model {model or args.adapter!r} cannot use a {kind} prompt")
    display = io.to_display_volume(sample, window=parse_window(args.window))
    seg = build_segmenter(args, model)

    with tqdm(total=planned_slices(prompt, frame, shape), unit="slice", desc="segment", leave=False) as bar:
        mask, _ = segment_volume_with(seg, display, prompt, frame, multimask=args.multimask,
                                      min_component=args.min_component, on_slice=lambda s, m: bar.update(1))
    if args.largest_component:
        from imedsam.models.postprocess import largest_component

        mask = largest_component(mask)
    written = {"labels": str(_write_labels(args.out, mask.astype(np.uint8), sample).resolve())}
    areas = mask.sum(axis=tuple(a for a in range(3) if a != frame.array_axis))
    if args.overlay:
        best = int(np.argmax(areas))
        rgb = np.repeat(frame.take(display, best)[..., None], 3, axis=2)
        io.write_overlay(args.overlay, rgb, frame.take(mask, best))
        written["overlay"] = str(Path(args.overlay).resolve())
        written["overlay_slice"] = best
    voxels = int(mask.sum())
    summary = {"foreground_voxels": voxels, "slices_with_mask": int((areas > 0).sum()), "axis": args.axis}
    if sample.geometry.spacing is not None:
        summary["volume_ml"] = round(voxels * float(np.prod(sample.geometry.spacing)) / 1000.0, 4)
    print(json.dumps({**summary, **written}))
    return 0


def _segment_volume_stacks(args: argparse.Namespace, sample: Sample, box3d: tuple[float, ...] | None = None) -> int:
    """A multi-class volume system (MA-SAM) on a volume: sliding stacks of adjacent slices, probabilities
    averaged, argmax written as a label volume (class ids) on the input's grid. Prompt-free (``--auto``), or
    box-prompted with one ``--box3d`` for the scan (only the slices of its range are predicted)."""
    from imedsam import io

    model = args.model or None
    cls = system_class_for(args, model)
    if not hasattr(cls, "predict_volume"):
        raise ImedsamError(f"--auto: on a volume this needs a prompt-free volume model (a trained --model ma_sam "
                           f"run, --adapter RUN); {model or args.adapter!r} is prompted: use --box3d or --point "
                           "I J K LABEL")
    if args.axis != "k":
        raise ImedsamError("--axis: a volume model runs across the axis it was trained on (k)")
    display = io.to_display_volume(sample, window=parse_window(args.window))
    seg = build_segmenter(args, model)
    if box3d is None and not seg.system.prompt_free:
        raise ImedsamError(f"--auto: {args.adapter!r} was trained with box prompts; give --box3d I0 J0 K0 I1 J1 K1")
    if box3d is not None and seg.system.prompt_free:
        raise ImedsamError(f"--box3d: {model or args.adapter!r} is prompt-free (trained without boxes); use --auto")
    from tqdm.auto import tqdm

    prompt = {} if box3d is None else {"box3d": box3d}
    with tqdm(unit="stack", desc="segment", leave=False) as bar:
        def step(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        probs = seg.system.predict_volume(display, device=seg.device, amp_dtype=seg.amp_dtype, on_stack=step,
                                          views=seg.views, stride=args.stack_stride, axes=args.stack_axes,
                                          **prompt)
    labels = probs.argmax(0).numpy().astype(np.uint8 if probs.shape[0] <= 256 else np.uint16)
    if args.largest_component:
        from imedsam.models.postprocess import largest_component_per_label

        labels = largest_component_per_label(labels)
    written = {"labels": str(_write_labels(args.out, labels, sample).resolve())}
    if args.overlay:
        best = int(np.argmax((labels > 0).sum(axis=(1, 2))))
        io.write_overlay(args.overlay, np.repeat(display[best][..., None], 3, axis=2), labels[best])
        written.update(overlay=str(Path(args.overlay).resolve()), overlay_slice=best)
    voxels = {int(c): int((labels == c).sum()) for c in np.unique(labels) if c > 0}
    print(json.dumps({"voxels_per_class": voxels, **written}))
    return 0


def _write_labels(out: str, labels: np.ndarray, sample: Sample) -> Path:
    """The label volume on the input's grid: a volume file, or a DICOM-SEG (``.dcm``) of a DICOM series."""
    if out.lower().endswith(".dcm"):
        from imedsam.io.dicom_seg import source_headers, write_dicom_seg

        return write_dicom_seg(out, labels, source_headers(sample))
    from imedsam import io

    return io.write_volume(out, labels, like=sample)
