"""MA-SAM: the exact reference counts of the official code, the released checkpoint layout (tuned tensors only)
loaded from random tensors of exactly its names and shapes, and the multi-class decoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.models.masam import MASAMConfig, build_masam, load_official, upscale_channels
from imedsam.models.registry import parameter_breakdown

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference-checkpoints"


@pytest.mark.parametrize("backbone, total", [("sam_vit_b", 30_142_361), ("sam_vit_h", 96_811_929)])
def test_reference_counts_are_the_official(backbone, total):
    p = parameter_breakdown("ma_sam", backbone=backbone, mode="reference", num_classes=12)
    assert p["img_size"] == 512 and p["total_trainable"] == total
    assert p["trainable"]["mask decoder"] == 5_243_725 and p["trainable"]["prompt encoder"] == 6_220
    layers = {"sam_vit_b": 12, "sam_vit_h": 32}[backbone]
    width = {"sam_vit_b": 768, "sam_vit_h": 1280}[backbone]
    assert p["trainable"]["FacT (U, V, cores)"] == 2 * 32 * width + 2 * layers * 32 * 32
    per_adapter = 2 * width + 2 * width * 384 + 384 * 384 * 3 + 384
    assert p["trainable"]["3-D adapters"] == 2 * layers * per_adapter


def test_progressive_upsampling_reaches_the_input():
    assert upscale_channels(256, 512, 32) == (64, 32, 16, 8)  # MA-SAM at 512 on a ViT: 16x
    assert upscale_channels(256, 256, 64) == (64, 32)  # LiteMedSAM: SAM's own head
    with pytest.raises(ImedsamError, match="power-of-two"):
        upscale_channels(256, 96, 32)


def test_released_checkpoint_loads_every_tuned_tensor(tmp_path):
    shapes = json.loads((FIXTURES / "ma_sam_vit_b_r32_12cls_saved.json").read_text())
    state = {k: torch.full(v, 0.01) for k, v in shapes.items()}
    state["q_FacTs_007"].fill_(0.5)
    state["image_encoder.ImageEncoderViT.blocks.3.Block.adapter_conv_2.bias"].fill_(-2.0)
    state["mask_decoder.mask_tokens.weight"].fill_(3.0)
    path = tmp_path / "masam_btcv.pth"
    torch.save(state, path)
    cfg = MASAMConfig(backbone="sam_vit_b", mode="reference", decoder={"num_classes": 12})
    system = build_masam(cfg, pretrained=False)
    load_official(system, path)
    own = system.state_dict()
    assert torch.all(own["image_encoder.blocks.7.attn.qkv.cores.q.weight"] == 0.5)
    assert torch.all(own["image_encoder.blocks.3.post_attn.adapter3d.conv.bias"] == -2.0)
    assert torch.all(own["mask_decoder.mask_tokens.weight"] == 3.0)
    assert torch.all(own["fact.factors.768.u.weight"] == 0.01)
    for name, param in system.named_parameters():  # every trainable tensor came from the file
        if param.requires_grad:
            p = param.detach()
            assert bool(((p == 0.01) | (p == 0.5) | (p == -2.0) | (p == 3.0)).all()), name
    del state["v_FacTs_011"]
    torch.save(state, path)
    with pytest.raises(ImedsamError, match="1 missing"):
        load_official(build_masam(cfg, pretrained=False), path)


def test_multiclass_logits_on_stacks_and_gradients():
    torch.manual_seed(0)
    system = build_masam(MASAMConfig(backbone="tiny_tinyvit_test", decoder={"num_classes": 3}, stack_depth=3),
                         pretrained=False)
    x = torch.rand(6, 3, 64, 64)  # 2 stacks of 3 slices
    logits = system.class_logits(system.encode(x, num_slices=3))
    assert logits.shape == (6, 4, 64, 64)
    logits.logsumexp(1).mean().backward()
    trained = [n for n, p in system.named_parameters() if p.requires_grad]
    assert any(".adapter3d." in n for n in trained) and any(".cores." in n for n in trained)
    assert not any(p.grad is not None for n, p in system.named_parameters() if not p.requires_grad)
    boxed = build_masam(MASAMConfig(backbone="tiny_tinyvit_test", decoder={"num_classes": 2, "prompt": "box"}),
                        pretrained=False)
    assert boxed.prompt_types == {"box"} and not boxed.prompt_free
    out = boxed.class_logits(boxed.encode(torch.rand(2, 3, 64, 64)), boxes=torch.tensor([[4.0, 4, 40, 40]] * 2))
    assert out.shape == (2, 3, 64, 64)


def test_predict_volume_averages_every_stack_holding_a_slice(monkeypatch):
    """Sliding stacks against a hand computation: a fake head whose probability for class 1 is each slice's
    position in its stack (0, 1/2, 1 for D = 3); slice z sees positions from the stacks centred on z-1, z, z+1."""
    system = build_masam(MASAMConfig(backbone="tiny_tinyvit_test", stack_depth=3), pretrained=False)

    def fake_stack_logits(images):
        d = images.shape[1]
        pos = torch.arange(d, dtype=torch.float32) / (d - 1)  # 0, 0.5, 1
        p1 = pos.view(1, d, 1, 1, 1).expand(1, d, 1, 8, 8).clamp(1e-6, 1 - 1e-6)
        return torch.cat([torch.log(1 - p1), torch.log(p1)], dim=2)  # softmax gives (1 - pos, pos)

    monkeypatch.setattr(system, "stack_logits", fake_stack_logits)
    probs = system.predict_volume(torch.zeros(5, 10, 12).numpy())
    assert probs.shape == (2, 5, 10, 12)
    # interior slice z: position 1 (stack at z-1), 0.5 (at z), 0 (at z+1) -> mean 0.5; slice 0: stack 0 holds it
    # twice (edge repeated, positions 0 and 0.5) and stack 1 at position 0 -> (0 + 0.5 + 0) / 3
    got = probs[1, :, 0, 0]
    want = torch.tensor([(0 + 0.5 + 0) / 3, 0.5, 0.5, 0.5, (1 + 0.5 + 1) / 3])
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(probs.sum(0), torch.ones(5, 10, 12), atol=1e-5)


def test_predict_volume_with_a_stride_averages_the_stacks_it_runs(monkeypatch):
    """``stride`` 2 on 5 slices, D = 3: stacks centred on slices 0, 2, 4 only (3 passes instead of 5), each
    slice averaged over the stacks that hold it; a stride above D is refused (it would leave slices out)."""
    system = build_masam(MASAMConfig(backbone="tiny_tinyvit_test", stack_depth=3), pretrained=False)
    calls = []

    def fake_stack_logits(images):  # class-1 probability: the slice's position in its stack, 0, 1/2, 1
        calls.append(images.shape)
        d = images.shape[1]
        pos = torch.arange(d, dtype=torch.float32) / (d - 1)
        p1 = pos.view(1, d, 1, 1, 1).expand(1, d, 1, 8, 8).clamp(1e-6, 1 - 1e-6)
        return torch.cat([torch.log(1 - p1), torch.log(p1)], dim=2)

    monkeypatch.setattr(system, "stack_logits", fake_stack_logits)
    progress = []
    probs = system.predict_volume(torch.zeros(5, 10, 12).numpy(), stride=2,
                                  on_stack=lambda done, total: progress.append((done, total)))
    assert len(calls) == 3 and progress[-1] == (3, 3)
    # stack 0 holds slices (0, 0, 1), stack 2 (1, 2, 3), stack 4 (3, 4, 4)
    want = torch.tensor([(0 + 0.5) / 2, (1 + 0) / 2, 0.5, (1 + 0) / 2, (0.5 + 1) / 2])
    assert torch.allclose(probs[1, :, 0, 0], want, atol=1e-4)
    calls.clear()
    system.predict_volume(torch.zeros(7, 10, 12).numpy(), stride=3)  # centres 0, 3, 6: every slice covered
    assert len(calls) == 3
    with pytest.raises(ImedsamError, match="--stack-stride: 4 must be between 1 and the model's stack depth 3"):
        system.predict_volume(torch.zeros(5, 10, 12).numpy(), stride=4)


def test_stacks_dataset_items_and_one_augmentation_for_the_stack(tmp_path):
    from tests.data.conftest import make_label_volume, write_nifti

    from imedsam.data import discover
    from imedsam.data.augment import AugmentConfig
    from imedsam.data.stacks import StacksDataset, stack_indices

    root = tmp_path / "Dataset003_S"
    lab = make_label_volume()  # (6, 16, 20), classes 1 and 2
    vol = (lab * 100 + 20).astype("float32")
    write_nifti(root / "imagesTr" / "s_000_0000.nii.gz", vol)
    write_nifti(root / "labelsTr" / "s_000.nii.gz", lab)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2},
                                                   "channel_names": {"0": "MR"}, "file_ending": ".nii.gz"}))
    assert stack_indices(0, 3, 6).tolist() == [0, 0, 1] and stack_indices(5, 5, 6).tolist() == [3, 4, 5, 5, 5]
    ds = StacksDataset(discover(root), split="train", depth=3, size=(32, 32), seed=0, foreground_prob=0.0)
    assert len(ds) == 6
    item = ds[2]
    assert item["image"].shape == (3, 3, 32, 32) and item["labels"].shape == (3, 32, 32)
    assert item["labels"].dtype == torch.int64 and set(item["labels"].unique().tolist()) <= {0, 1, 2}
    # item 2 is the stack of volume slices 1, 2, 3 (labels resized nearest, the image bilinear)
    want = torch.nn.functional.interpolate(torch.from_numpy(lab[1:4].astype("float32"))[:, None], size=(32, 32),
                                           mode="nearest")[:, 0].long()
    assert torch.equal(item["labels"], want) and item["slice_index"] == 2
    fg = item["labels"][1] > 0
    assert item["image"][1, 0][fg].mean() > item["image"][1, 0][~fg].mean() + 30
    aug = StacksDataset(discover(root), split="train", depth=3, size=(32, 32), seed=0, foreground_prob=1.0,
                        augment=AugmentConfig(intensity=False))
    for i in range(len(aug)):
        it = aug[i]
        assert it["labels"].any()  # foreground-biased: every stack centred on a labelled slice
        # one geometric draw for the whole stack: the image still tells labels from background on every slice
        for j in range(3):
            fg = it["labels"][j] > 0
            if fg.any() and (~fg).any():
                assert it["image"][j, 0][fg].mean() > it["image"][j, 0][~fg].mean() + 30


def test_ma_sam_trains_validates_on_volumes_and_resumes(tmp_path):
    from tests.data.conftest import write_stacks_dataset

    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    root = write_stacks_dataset(tmp_path / "Dataset004_T", "t")
    cfg = load_config(None, ["model.system=ma_sam", "model.backbone=tiny_tinyvit_test", "model.stack_depth=3",
                             "model.decoder.num_classes=2", "data.image_size=64", "optim.epochs=2",
                             "optim.batch_size=2", "data.val_fraction=0.34", "run.device=cpu", "run.precision=fp32",
                             "data.augment=false"])
    result = run_training(cfg, root, tmp_path / "run")
    assert result.epochs_done == 2 and all(h["val"]["n"] == 1 for h in result.history)
    assert all(0.0 <= h["val"]["dice"] <= 1.0 for h in result.history)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]  # it learns
    from imedsam.models.registry import build_system

    system = build_system(adapter=tmp_path / "run")
    assert system.name == "ma_sam" and system.stack_depth == 3
    from imedsam.infer.segmenter import Segmenter

    assert Segmenter(adapter=str(tmp_path / "run"), device="cpu").system.name == "ma_sam"  # the run's model

    # prompt-free on a volume: sliding stacks, a label volume on the input's grid
    import nibabel as nib

    from imedsam.cli import main

    image = root / "imagesTr" / "t_000_0000.nii.gz"
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(image), "--adapter", str(tmp_path / "run"), "--auto", "--out", str(out),
                 "--device", "cpu"]) == 0
    written = nib.load(str(out))
    assert written.shape == nib.load(str(image)).shape
    assert __import__("numpy").allclose(written.affine, nib.load(str(image)).affine)
    assert set(__import__("numpy").unique(written.get_fdata()).tolist()) <= {0, 1, 2}
    # scored per volume and class without a prompt
    import json as _json

    assert main(["evaluate", "--run", str(tmp_path / "run"), "--data", str(root), "--split", "all", "--volumes",
                 "--prompt", "auto", "--out", str(tmp_path / "report"), "--device", "cpu"]) == 0
    summary = _json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["config"]["prompt"] == "auto"
    rows = list(__import__("csv").DictReader(open(tmp_path / "report" / "cases.csv")))
    assert len(rows) == 6 and {r["class"] for r in rows} == {"1", "2"}  # 3 volumes x 2 classes
    # --stack-stride: fewer stacks, recorded; refused beyond the stack depth and for slice-by-slice protocols
    strided = tmp_path / "strided.nii.gz"
    assert main(["segment", str(image), "--adapter", str(tmp_path / "run"), "--auto", "--stack-stride", "3",
                 "--out", str(strided), "--device", "cpu"]) == 0
    assert nib.load(str(strided)).shape == written.shape
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--data", str(root), "--split", "all", "--volumes",
                 "--prompt", "auto", "--stack-stride", "2", "--out", str(tmp_path / "report2"),
                 "--device", "cpu"]) == 0
    assert _json.loads((tmp_path / "report2" / "summary.json").read_text())["config"]["stack_stride"] == 2
    assert main(["segment", str(image), "--adapter", str(tmp_path / "run"), "--auto", "--stack-stride", "4",
                 "--out", str(tmp_path / "no.nii.gz"), "--device", "cpu"]) == 2
    assert main(["evaluate", "--model", "litemedsam", "--data", str(root), "--volumes", "--prompt", "box",
                 "--stack-stride", "2", "--out", str(tmp_path / "no_report")]) == 2
    assert not (tmp_path / "no.nii.gz").exists() and not (tmp_path / "no_report").exists()
    # a prompted model cannot run prompt-free on a volume
    assert main(["segment", str(image), "--model", "litemedsam", "--auto", "--out", str(tmp_path / "x.nii.gz")]) == 2


def test_box_prompted_stacks_carry_the_scans_3d_box(tmp_path):
    """The box variant's items: stacks centred in the 3-D box's slice range, each with the scan's box (every
    class) in the item's pixels, moved with the augmentation so that it still holds every labelled pixel."""
    from tests.data.conftest import make_label_volume, write_stacks_dataset

    from imedsam.data import discover
    from imedsam.data.augment import AugmentConfig
    from imedsam.data.stacks import StacksDataset
    from imedsam.data.volume_prompts import volume_box

    root = write_stacks_dataset(tmp_path / "Dataset006_X", "x", cases=1)
    lab = make_label_volume()  # (6, 16, 20) = (k, j, i), labels on slices 1..4
    assert volume_box(lab > 0) == (3.0, 1.0, 1.0, 18.0, 13.0, 5.0)
    assert volume_box(lab[:1] > 0) is None
    ds = StacksDataset(discover(root), split="train", depth=3, size=(32, 32), foreground_prob=0.0,
                       box_prompt=True, box_expand=(0.0, 0.0))
    assert len(ds) == 4 and [ds[i]["slice_index"] for i in range(4)] == [1, 2, 3, 4]
    # W 20 -> 32 (x1.6), H 16 -> 32 (x2)
    assert torch.allclose(ds[0]["box"], torch.tensor([4.8, 2.0, 28.8, 26.0]))
    expanded = StacksDataset(discover(root), split="train", depth=3, size=(32, 32), box_prompt=True, seed=3)
    b = expanded[1]["box"]
    assert (b[:2] <= torch.tensor([4.8, 2.0])).all() and (b[2:] >= torch.tensor([28.8, 26.0])).all()
    assert not torch.equal(b, torch.tensor([4.8, 2.0, 28.8, 26.0]))  # some side moved out
    aug = StacksDataset(discover(root), split="train", depth=3, size=(32, 32), box_prompt=True, seed=1,
                        box_expand=(0.0, 0.0), augment=AugmentConfig(intensity=False))
    moved = 0
    for i in range(len(aug)):
        it = aug[i]
        x0, y0, x1, y1 = it["box"].tolist()
        ys, xs = torch.nonzero(it["labels"].amax(0) > 0, as_tuple=True)
        if ys.numel():
            assert xs.min() >= x0 - 1 and xs.max() < x1 + 1 and ys.min() >= y0 - 1 and ys.max() < y1 + 1
        moved += not torch.allclose(it["box"], torch.tensor([4.8, 2.0, 28.8, 26.0]), atol=1.5)
    assert moved  # the geometric augmentation moved the box with the labels


def test_predict_volume_with_a_3d_box_predicts_its_slices_only(monkeypatch):
    """Box variant against a hand computation: stacks centred on the box's slices only, the box (in
    encoder-input pixels) given to every slice, slices outside the range background."""
    system = build_masam(MASAMConfig(backbone="tiny_tinyvit_test", stack_depth=3, decoder={"prompt": "box"}),
                         pretrained=False)
    s = system.preprocess.img_size
    seen = []

    def fake_stack_logits(images, boxes=None):
        seen.append(boxes)
        d = images.shape[1]
        pos = torch.arange(d, dtype=torch.float32) / (d - 1)
        p1 = pos.view(1, d, 1, 1, 1).expand(1, d, 1, 8, 8).clamp(1e-6, 1 - 1e-6)
        return torch.cat([torch.log(1 - p1), torch.log(p1)], dim=2)

    monkeypatch.setattr(system, "stack_logits", fake_stack_logits)
    probs = system.predict_volume(torch.zeros(6, 10, 12).numpy(), box3d=(2, 1, 2, 10, 9, 4))
    assert len(seen) == 2  # stacks centred on slices 2 and 3
    want_box = torch.tensor([[2 * s / 12, 1 * s / 10, 10 * s / 12, 9 * s / 10]])
    assert all(torch.allclose(b, want_box) for b in seen)
    # slice 2: stacks at 2 (position 0.5) and 3 (position 0); slice 3: stacks at 2 (1) and 3 (0.5)
    assert torch.allclose(probs[1, :, 0, 0], torch.tensor([0, 0, 0.25, 0.75, 0, 0]), atol=1e-4)
    assert torch.allclose(probs.sum(0), torch.ones(6, 10, 12), atol=1e-5)
    with pytest.raises(ImedsamError, match="box-prompted"):
        system.predict_volume(torch.zeros(6, 10, 12).numpy())
    with pytest.raises(ImedsamError, match="not a half-open box inside"):
        system.predict_volume(torch.zeros(6, 10, 12).numpy(), box3d=(2, 1, 2, 13, 9, 4))
    free = build_masam(MASAMConfig(backbone="tiny_tinyvit_test", stack_depth=3), pretrained=False)
    with pytest.raises(ImedsamError, match="prompt-free"):
        free.predict_volume(torch.zeros(6, 10, 12).numpy(), box3d=(2, 1, 2, 10, 9, 4))
    with pytest.raises(ImedsamError, match="box-prompted"):
        build_masam(MASAMConfig(backbone="tiny_tinyvit_test", stack_depth=3, decoder={"prompt": "box"}),
                    pretrained=False).stack_logits(torch.rand(1, 3, 3, s, s))


def test_box_prompted_ma_sam_trains_segments_and_scores_from_one_3d_box(tmp_path):
    """The box variant end to end: trained on stacks given their scan's box (and validated from the ground
    truth's 3-D box), `segment --box3d` writes a label volume zero outside the box's slices, `evaluate --prompt
    box3d` scores it; the prompt-free verbs are refused in one line."""
    import csv

    import nibabel as nib
    import numpy as np
    from tests.data.conftest import write_stacks_dataset

    from imedsam.cli import main
    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    root = write_stacks_dataset(tmp_path / "Dataset007_B", "b")
    cfg = load_config(None, ["model.system=ma_sam", "model.backbone=tiny_tinyvit_test", "model.stack_depth=3",
                             "model.decoder.num_classes=2", "model.decoder.prompt=box", "data.image_size=64",
                             "optim.epochs=2", "optim.batch_size=2", "data.val_fraction=0.34", "run.device=cpu",
                             "run.precision=fp32", "data.augment=false"])
    result = run_training(cfg, root, tmp_path / "run")
    assert result.epochs_done == 2 and all(h["val"]["n"] == 1 for h in result.history)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    image = root / "imagesTr" / "b_000_0000.nii.gz"
    out = tmp_path / "labels.nii.gz"
    run = str(tmp_path / "run")
    torch.manual_seed(0)  # the tiny test backbone's frozen weights are random (no checkpoint): the same for both
    assert main(["segment", str(image), "--adapter", run, "--box3d", "2", "1", "1", "18", "13", "4",
                 "--out", str(out), "--device", "cpu", "--precision", "fp32"]) == 0
    written = np.asarray(nib.load(str(out)).dataobj)  # (i, j, k)
    assert written.shape == nib.load(str(image)).shape
    assert not written[..., [0, 4, 5]].any()  # outside k in [1, 4): background
    lcc_out = tmp_path / "lcc.nii.gz"
    torch.manual_seed(0)
    assert main(["segment", str(image), "--adapter", run, "--box3d", "2", "1", "1", "18", "13", "4",
                 "--largest-component", "--out", str(lcc_out), "--device", "cpu", "--precision", "fp32"]) == 0
    lcc = np.asarray(nib.load(str(lcc_out)).dataobj)
    from scipy import ndimage

    for value in np.unique(lcc)[1:]:  # one 26-connected component per label, inside the label's own voxels
        assert ndimage.label(lcc == value, structure=np.ones((3, 3, 3)))[1] == 1
        assert (written[lcc == value] == value).all()
    assert main(["evaluate", "--run", run, "--data", str(root), "--split", "all", "--volumes", "--prompt", "box3d",
                 "--out", str(tmp_path / "report"), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "report" / "cases.csv")))
    assert len(rows) == 6 and all(r["slices_prompted"] == "4" for r in rows)  # the 3-D box spans slices 1..4
    for argv in (["segment", str(image), "--adapter", run, "--auto", "--out", str(tmp_path / "a.nii.gz")],
                 ["segment", str(image), "--adapter", run, "--box3d", "2", "1", "1", "18", "13", "4", "--propagate",
                  "--out", str(tmp_path / "b.nii.gz")],
                 ["evaluate", "--run", run, "--data", str(root), "--split", "all", "--volumes", "--prompt", "auto",
                  "--out", str(tmp_path / "r2")],
                 ["evaluate", "--run", run, "--data", str(root), "--split", "all", "--volumes", "--prompt", "box",
                  "--out", str(tmp_path / "r3")]):
        assert main(argv + ["--device", "cpu"]) == 2, argv


@pytest.mark.parametrize("prompt", ["none", "box"])
def test_flip_tta_on_volumes_is_flip_equivariant(prompt):
    """With views {identity, left-right flip} (a group), predicting a flipped volume (and box) gives the flipped
    prediction, which a random model alone does not: each stack is predicted flipped, with its box flipped, and
    the logits are flipped back before averaging."""
    import numpy as np

    from imedsam.models.views import parse_tta

    torch.manual_seed(0)
    system = build_masam(MASAMConfig(backbone="tiny_tinyvit_test", stack_depth=3, decoder={"prompt": prompt}),
                         pretrained=False).eval()
    vol = (torch.rand(4, 20, 24) * 255).round().to(torch.uint8).numpy()
    flipped = np.ascontiguousarray(vol[:, :, ::-1])
    box, fbox = ((3, 2, 0, 20, 17, 4), (4, 2, 0, 21, 17, 4)) if prompt == "box" else (None, None)  # i: 24 - i
    with torch.no_grad():
        a = system.predict_volume(vol, box3d=box, views=parse_tta("h"))
        b = system.predict_volume(flipped, box3d=fbox, views=parse_tta("h"))
        plain_a = system.predict_volume(vol, box3d=box)
        plain_b = system.predict_volume(flipped, box3d=fbox)
    torch.testing.assert_close(a, torch.flip(b, [-1]), rtol=0, atol=1e-5)
    assert (plain_a - torch.flip(plain_b, [-1])).abs().max() > 1e-3
    assert not torch.allclose(a, plain_a, atol=1e-3)


def _diagonal_cube(size: int) -> torch.Tensor:
    """A (size,)*3 uint8-valued volume whose every slice, across every axis, holds a 0 and a 255 (so each slice's
    min-max normalisation is the volume's /255), the rest random."""
    vol = torch.randint(1, 255, (size, size, size), generator=torch.Generator().manual_seed(0)).float()
    z = torch.arange(size)
    vol[z, z, z] = 0.0
    vol[z, (z + 1) % size, (z + 2) % size] = 255.0
    return vol


def test_predict_volume_across_several_axes_averages_them_on_the_volume_grid(monkeypatch):
    """Tri-planar against a hand computation: a fake head whose class-1 logit is each pixel's normalised value
    gives sigmoid(volume / 255) back from every axis's pass only if each pass is mapped back onto the (k, j, i)
    grid correctly; the passes are counted over the axes; a run's stack_axes is the default."""
    system = build_masam(MASAMConfig(backbone="tiny_tinyvit_test", stack_depth=3, stack_axes=("k", "j", "i")),
                         pretrained=False)
    s = system.preprocess.img_size  # slices of the encoder's own size: no resizing
    vol = _diagonal_cube(s)
    seen = []

    def fake_stack_logits(images):
        seen.append(images.shape)
        x = images[0, :, 0]  # (D, S, S), each slice min-max normalised to [0, 1]
        return torch.stack([torch.zeros_like(x), x], dim=1)[None]

    monkeypatch.setattr(system, "stack_logits", fake_stack_logits)
    progress = []
    want = torch.sigmoid(vol / 255.0)
    probs = system.predict_volume(vol.numpy(), stride=1, on_stack=lambda d, t: progress.append((d, t)))
    assert len(seen) == 3 * s and progress[-1] == (3 * s, 3 * s)
    assert torch.allclose(probs[1], want, atol=1e-5)
    for axis in ("j", "i"):  # one axis alone gives the same volume back
        assert torch.allclose(system.predict_volume(vol.numpy(), axes=(axis,))[1], want, atol=1e-5)
    seen.clear()
    system.predict_volume(vol.numpy(), axes=("k",), stride=3)
    assert len(seen) == len(range(0, s, 3)) + (0 if (s - 1) % 3 == 0 else 1)
    with pytest.raises(ImedsamError, match="--stack-axes"):
        system.predict_volume(vol.numpy(), axes=("k", "k"))


def test_predict_volume_with_a_3d_box_across_several_axes_moves_the_box(monkeypatch):
    """Box variant, tri-planar: each axis's pass gives its stacks the box's extent in that pass's slices
    (imedsam.io.slicing.box_across) and centres them on the box's range along that axis; voxels outside every
    range are background."""
    system = build_masam(MASAMConfig(backbone="tiny_tinyvit_test", stack_depth=3, decoder={"prompt": "box"},
                                     stack_axes=("k", "j", "i")), pretrained=False)
    s = system.preprocess.img_size
    seen = []

    def fake_stack_logits(images, boxes=None):
        seen.append(boxes[0].tolist())
        return torch.zeros(1, images.shape[1], 2, 8, 8)

    monkeypatch.setattr(system, "stack_logits", fake_stack_logits)
    i0, j0, k0, i1, j1, k1 = 2, 1, 2, 10, 9, 4
    probs = system.predict_volume(_diagonal_cube(s).numpy(), box3d=(i0, j0, k0, i1, j1, k1))
    want = [[i0, j0, i1, j1]] * (k1 - k0) + [[i0, k0, i1, k1]] * (j1 - j0) + [[j0, k0, j1, k1]] * (i1 - i0)
    assert seen == [[float(v) for v in b] for b in want]  # encoder-input pixels = voxels here (no resizing)
    assert probs[0, 20:, 20:, 20:].eq(1.0).all()  # outside every axis's range
    assert torch.allclose(probs[:, k0:k1, j0:j1, i0:i1], torch.full((2, k1 - k0, j1 - j0, i1 - i0), 0.5))


def test_stacks_across_several_axes_are_items_of_their_own(tmp_path):
    """``axes=(k, j, i)``: every (volume, axis, slice) is an item, each stack's slices laid out as SliceFrame
    lays them out; an anisotropic volume is refused with the spacing named."""
    from tests.data.conftest import make_label_volume, write_nifti

    from imedsam.data import discover
    from imedsam.data.stacks import StacksDataset, stack_indices
    from imedsam.io.slicing import across

    lab = make_label_volume()  # (6, 16, 20)
    dataset_json = json.dumps({"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "MR"},
                               "file_ending": ".nii.gz"})
    root = tmp_path / "Dataset005_A"
    write_nifti(root / "imagesTr" / "a_000_0000.nii.gz", (lab * 100 + 20).astype("float32"))
    write_nifti(root / "labelsTr" / "a_000.nii.gz", lab)
    (root / "dataset.json").write_text(dataset_json)
    ds = StacksDataset(discover(root), split="train", depth=3, size=(32, 32), seed=0, foreground_prob=0.0,
                       axes=("k", "j", "i"))
    assert len(ds) == 6 + 16 + 20
    assert [ds[n]["axis"] for n in (0, 6, 6 + 16)] == ["k", "j", "i"]
    item = ds[6 + 3]  # across j, centred on j = 3: the (k, i) slices j = 2, 3, 4
    moved = across(lab, "j")[stack_indices(3, 3, 16)].astype("float32")
    want = torch.nn.functional.interpolate(torch.from_numpy(moved)[:, None], size=(32, 32), mode="nearest")[:, 0]
    assert item["slice_index"] == 3 and torch.equal(item["labels"], want.long())
    box = StacksDataset(discover(root), split="train", depth=3, size=(32, 32), seed=0, axes=("k", "i"),
                        box_prompt=True)
    assert {it[1] for it in box.items} == {"k", "i"}
    assert {z for _, a, z in box.items if a == "i"} == set(range(3, 18))  # the labels' i range (columns 3..17)
    aniso = tmp_path / "Dataset006_B"
    write_nifti(aniso / "imagesTr" / "b_000_0000.nii.gz", (lab * 100 + 20).astype("float32"), spacing=(3.0, 1.0, 1.0))
    write_nifti(aniso / "labelsTr" / "b_000.nii.gz", lab, spacing=(3.0, 1.0, 1.0))
    (aniso / "dataset.json").write_text(dataset_json)
    with pytest.raises(ImedsamError, match=r"b_000_0000.nii.gz: spacing \(3.0, 1.0, 1.0\) mm is anisotropic"):
        StacksDataset(discover(aniso), split="train", depth=3, size=(32, 32), axes=("k", "j"))
    assert len(StacksDataset(discover(aniso), split="train", depth=3, size=(32, 32))) == 6  # across k: fine


def test_tri_planar_ma_sam_trains_and_infers_across_its_axes(tmp_path):
    """A run trained with model.stack_axes [k, j, i] draws stacks across every axis, validates with
    run.val_stack_stride, and inference and evaluation run across its axes by default (recorded), or across
    --stack-axes; bad values are refused before any work."""
    from tests.data.conftest import write_stacks_dataset

    from imedsam.cli import main
    from imedsam.train.api import run_training
    from imedsam.train.config import load_config

    root = write_stacks_dataset(tmp_path / "Dataset007_T", "t")
    overrides = ["model.system=ma_sam", "model.backbone=tiny_tinyvit_test", "model.stack_depth=3",
                 "model.decoder.num_classes=2", "data.image_size=64", "optim.epochs=1", "optim.max_steps=2",
                 "optim.batch_size=2", "data.val_fraction=0.34", "run.device=cpu", "run.precision=fp32",
                 "data.augment=false", "model.stack_axes=[k,j,i]", "run.val_stack_stride=3"]
    with pytest.raises(ImedsamError, match="run.val_stack_stride: 4 must be at most the model's stack depth 3"):
        run_training(load_config(None, overrides[:-1] + ["run.val_stack_stride=4"]), tmp_path / "no_data",
                     tmp_path / "no_run")
    result = run_training(load_config(None, overrides), root, tmp_path / "run")
    assert result.history[-1]["val"]["n"] == 1
    image = root / "imagesTr" / "t_000_0000.nii.gz"
    run = str(tmp_path / "run")
    assert main(["evaluate", "--run", run, "--data", str(root), "--split", "all", "--volumes", "--prompt", "auto",
                 "--out", str(tmp_path / "report"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["config"]["stack_axes"] == "k,j,i"
    assert main(["evaluate", "--run", run, "--data", str(root), "--split", "all", "--volumes", "--prompt", "auto",
                 "--stack-axes", "k", "--out", str(tmp_path / "report_k"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "report_k" / "summary.json").read_text())["config"]["stack_axes"] == "k"
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(image), "--adapter", run, "--auto", "--stack-axes", "j,i", "--out", str(out),
                 "--device", "cpu"]) == 0
    import nibabel as nib

    assert nib.load(str(out)).shape == nib.load(str(image)).shape
    for argv in (["segment", str(image), "--adapter", run, "--auto", "--stack-axes", "k,x", "--out",
                  str(tmp_path / "no.nii.gz")],
                 ["segment", str(image), "--model", "litemedsam", "--box3d", "1", "1", "1", "5", "5", "3",
                  "--stack-axes", "k", "--out", str(tmp_path / "no.nii.gz")],
                 ["evaluate", "--run", run, "--data", str(root), "--stack-axes", "k", "--out",
                  str(tmp_path / "no_report")]):
        with pytest.raises(SystemExit) as exit_:
            code = main(argv)
            raise SystemExit(code)
        assert exit_.value.code == 2
    assert not (tmp_path / "no.nii.gz").exists() and not (tmp_path / "no_report").exists()
