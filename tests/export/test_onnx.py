"""ONNX export and the onnxruntime path: parity with PyTorch (max |logit difference| <= 1e-3, mask Dice >= 0.999)
on LiteMedSAM (box, 1 and 3 points, mask prompt) and on tiny I-MedSAMs (LoRA merged, frequency image as DFT
matrices, MC-dropout uncertainty + refinement); the CLI (export, segment and predict with --runtime onnx give the
PyTorch path's files); one-line errors with exit status 2; the benchmark script runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imedsam.cli import main
from imedsam.errors import ImedsamError
from imedsam.export.onnx import ExportOptions, export_onnx, model_info
from imedsam.infer.segmenter import Segmenter
from imedsam.models.registry import build_system

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'imedsam[onnx]')")

MAX_ABS = 1e-3
MIN_DICE = 0.999
ROOT = Path(__file__).resolve().parents[2]


def parity(a, b) -> tuple[float, float]:
    """(max |logits a - logits b|, Dice of the masks; 1 when both are empty)."""
    diff = float(np.abs(a.logits - b.logits).max())
    total = int(a.masks.sum() + b.masks.sum())
    dice = 2 * float((a.masks & b.masks).sum()) / total if total else 1.0
    return diff, dice


def assert_parity(a, b, what: str) -> None:
    diff, dice = parity(a, b)
    print(f"parity {what}: max|d logits| {diff:.2e}, Dice {dice:.6f}")
    assert diff <= MAX_ABS and dice >= MIN_DICE, (what, diff, dice)
    np.testing.assert_allclose(a.scores, b.scores, atol=MAX_ABS)


def _image(h: int = 90, w: int = 120) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 70, (h, w, 3), dtype=np.uint8)
    image[h // 3: 2 * h // 3, w // 3: 3 * w // 4] = 210
    return image


# ----------------------------------------------------------------------------------------- LiteMedSAM

@pytest.fixture(scope="module")
def lite_dir(tmp_path_factory) -> Path:
    """`imedsam export --format onnx` of the default model (LiteMedSAM), shared by the tests below."""
    out = tmp_path_factory.mktemp("onnx") / "litemedsam"
    assert main(["export", "--format", "onnx", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def lite_pair(lite_dir):
    image = _image()
    pair = (Segmenter("litemedsam", device="cpu", precision="fp32"), Segmenter(runtime="onnx", onnx_dir=lite_dir))
    for seg in pair:
        seg.set_image(image)
    return pair


BOX = (38, 28, 92, 62)
PROMPTS = {
    "box": dict(box=BOX),
    "1 point": dict(points=[[60, 45]], point_labels=[1]),
    "3 points": dict(points=[[60, 45], [10, 10], [80, 40]], point_labels=[1, 0, 1]),
    "box + point, multimask, 64x90 grid": dict(box=BOX, points=[[60, 45]], point_labels=[1], multimask=True,
                                               size=(64, 90)),
}


@pytest.mark.parametrize("name", PROMPTS)
def test_litemedsam_parity(lite_pair, name):
    ref, onnx = lite_pair
    assert_parity(ref.predict(**PROMPTS[name]), onnx.predict(**PROMPTS[name]), f"litemedsam {name}")


def test_litemedsam_mask_prompt_parity(lite_pair):
    ref, onnx = lite_pair
    previous = ref.predict(points=[[60, 45]], point_labels=[1])
    for prompt in (dict(box=BOX), dict(points=[[60, 45], [20, 70]], point_labels=[1, 0]), {}):
        a = ref.predict(mask_input=previous.low_res_logits, **prompt)
        b = onnx.predict(mask_input=previous.low_res_logits, **prompt)
        assert_parity(a, b, f"litemedsam mask prompt + {sorted(prompt) or 'nothing'}")
        np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=MAX_ABS)


def test_manifest_describes_the_export(lite_dir):
    manifest = json.loads((lite_dir / "manifest.json").read_text())
    assert manifest["model"]["name"] == "litemedsam" and manifest["model"]["system"] == "sam"
    assert manifest["preprocess"] == {**manifest["preprocess"], "img_size": 256, "normalize": "minmax",
                                      "pad": "bottom_right", "pipeline": "imedsam"}
    decoder = manifest["graphs"]["decoder"]
    assert [i["name"] for i in decoder["inputs"]] == ["image_embeddings", "point_coords", "point_labels",
                                                      "mask_input", "has_mask_input"]
    assert decoder["inputs"][1]["shape"] == [1, "num_points", 2]
    assert decoder["outputs"][0] == {"name": "low_res_masks", "shape": [1, 4, 256, 256], "dtype": "float32"}
    assert set(manifest["versions"]) == {"imedsam", "torch", "onnx", "opset"}
    assert max(manifest["check"].values()) < MAX_ABS
    assert sorted(p.name for p in lite_dir.iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json"]


def _segment(tmp_path, image, out, *extra):
    return main(["segment", str(image), "--out", str(out), "--device", "cpu", *extra])


def test_cli_segment_onnx_writes_the_pytorch_mask(lite_dir, tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.fromarray(_image()[..., 0]).save(image)
    for prompt in (["--box", *map(str, BOX)], ["--point", "60", "45", "1", "--point", "10", "10", "0"]):
        assert _segment(tmp_path, image, tmp_path / "torch.png", *prompt, "--precision", "fp32") == 0
        assert _segment(tmp_path, image, tmp_path / "onnx.png", *prompt, "--runtime", "onnx",
                        "--onnx-dir", str(lite_dir)) == 0
        a, b = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:])
        assert a["foreground_pixels"] == b["foreground_pixels"] > 0
        assert (tmp_path / "torch.png").read_bytes() == (tmp_path / "onnx.png").read_bytes()


def test_cli_predict_onnx_matches_pytorch(lite_dir, tmp_path, capsys):
    from imedsam.data.synthetic import make_synthetic_lesions

    root = make_synthetic_lesions(tmp_path / "lesions", n=2, size=64, seed=1)
    outs = {}
    for runtime in ("torch", "onnx"):
        outs[runtime] = tmp_path / runtime
        extra = ["--precision", "fp32"] if runtime == "torch" else ["--runtime", "onnx", "--onnx-dir", str(lite_dir)]
        assert main(["predict", "-i", str(root / "images"), "-o", str(outs[runtime]), "--boxes-from",
                     str(root / "masks"), "--device", "cpu", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["done"] == 2
    for path in sorted((root / "images").iterdir()):
        name = f"{path.stem}.png"
        assert (outs["torch"] / name).read_bytes() == (outs["onnx"] / name).read_bytes()


# ------------------------------------------------------------------------------------ tiny I-MedSAM

def _trained_imedsam(backbone: str, seed: int = 0, **options):
    """A tiny I-MedSAM whose adapters are not at their (no-op) initialisation: LoRA B, frequency adapters and the
    decoder moved off their initial values, as after training."""
    torch.manual_seed(seed)
    system = build_system("imedsam", backbone=backbone, **options)
    with torch.no_grad():
        for param in system.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return system.eval()


IMEDSAM_CASES = {
    "tinyvit": ("tiny_tinyvit_test", {}),
    "vit": ("tiny_vit_test", {}),
    "tinyvit + sam_prior": ("tiny_tinyvit_test", {"decoder.sam_prior": True}),
}


@pytest.fixture(scope="module", params=list(IMEDSAM_CASES))
def imedsam_pair(request, tmp_path_factory):
    backbone, options = IMEDSAM_CASES[request.param]
    system = _trained_imedsam(backbone, **options)
    out = tmp_path_factory.mktemp("onnx") / "imedsam"
    manifest = export_onnx(system, out, model=model_info(system, "imedsam", None))
    assert any("LoRA" in m for m in manifest.merged) and any("DFT" in r for r in manifest.rewritten)
    return request.param, system, out, Segmenter(system, device="cpu", precision="fp32"), Segmenter(
        runtime="onnx", onnx_dir=str(out))


def test_imedsam_parity(imedsam_pair):
    name, _, _, ref, onnx = imedsam_pair
    rng = np.random.default_rng(1)
    for shape in ((50, 70), (64, 64), (70, 41)):  # padded below, square (no padding), padded right
        image = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
        for seg in (ref, onnx):
            seg.set_image(image)
        embedding = (ref.image_state.views[0].embedding - onnx.image_state.views[0].embedding).abs().max()
        assert float(embedding) <= MAX_ABS
        h, w = shape
        prompts = {"box": dict(box=(w // 4, h // 4, 3 * w // 4, 3 * h // 4)),
                   "1 point": dict(points=[[w // 2, h // 2]], point_labels=[1]),
                   "3 points, 96x80 grid": dict(points=[[w // 2, h // 2], [2, 2], [w // 3, h // 2]],
                                                point_labels=[1, 0, 1], size=(96, 80))}
        for what, prompt in prompts.items():
            a, b = ref.predict(uncertainty=True, **prompt), onnx.predict(uncertainty=True, **prompt)
            assert_parity(a, b, f"imedsam {name} {shape} {what}")
            print(f"parity uncertainty {name}: {float(np.abs(a.uncertainty - b.uncertainty).max()):.1e}")
            np.testing.assert_allclose(a.uncertainty, b.uncertainty, atol=1e-6)


def test_imedsam_seed_and_uncertainty_options(tmp_path):
    system = _trained_imedsam("tiny_tinyvit_test")
    out = tmp_path / "full"
    export_onnx(system, out, model=model_info(system, "imedsam", None))
    other = Segmenter(runtime="onnx", onnx_dir=str(out), seed=3)
    other.set_image(_image(40, 50))
    with pytest.raises(ImedsamError, match="seed 0"):
        other.predict(box=(5, 5, 30, 30))
    coarse_dir = tmp_path / "coarse"
    manifest = export_onnx(system, coarse_dir, model=model_info(system, "imedsam", None),
                           options=ExportOptions(uncertainty=False))
    assert "implicit_fine" not in manifest.graphs and manifest.implicit.refine is False
    coarse = Segmenter(runtime="onnx", onnx_dir=str(coarse_dir), seed=3)  # no MC dropout: any seed
    coarse.set_image(_image(40, 50))
    assert coarse.predict(box=(5, 5, 30, 30)).masks.shape == (1, 40, 50)
    with pytest.raises(ImedsamError, match="coarse decoder alone"):
        coarse.predict(box=(5, 5, 30, 30), uncertainty=True)


def test_sam_med2d_parity(tmp_path):
    """SAM-Med2D's adapters are exported as they run (not linear); its decode (best of 3 masks) stays shared."""
    torch.manual_seed(0)
    system = build_system("sam_med2d", backbone="tiny_vit_test")
    with torch.no_grad():
        for param in system.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    export_onnx(system.eval(), tmp_path / "m2d", model=model_info(system, "sam_med2d", None))
    ref = Segmenter(system, device="cpu", precision="fp32")
    onnx = Segmenter(runtime="onnx", onnx_dir=str(tmp_path / "m2d"))
    for seg in (ref, onnx):
        seg.set_image(_image(50, 70))
    for what, prompt in {"box": {"box": (20, 15, 50, 35)},
                         "1 point, multimask": {"points": [[30, 20]], "point_labels": [1], "multimask": True}}.items():
        assert_parity(ref.predict(**prompt), onnx.predict(**prompt), f"sam_med2d {what}")


def test_dft_frequency_image_equals_fft():
    from imedsam.export.dft import dft_frequency_image
    from imedsam.peft.frequency import frequency_image

    torch.manual_seed(0)
    for size, hw, reference, log in ((64, (64, 64), False, True), (64, (37, 64), False, True),
                                     (64, (64, 41), True, False), (256, (171, 256), False, True)):
        x = torch.randn(1, 3, size, size)
        x[..., hw[0]:, :] = 0
        x[..., hw[1]:] = 0
        want = frequency_image(x, reference=reference, log_amplitude=log, valid_hw=hw)
        got = dft_frequency_image(x, torch.tensor(hw), reference=reference, log_amplitude=log)
        assert float((want - got).abs().max()) < 1e-4


def test_merged_lora_is_the_same_linear():
    from imedsam.export.merge import merge_lora
    from imedsam.peft.lora import LoRAQKV

    torch.manual_seed(0)
    layer = LoRAQKV(torch.nn.Linear(24, 72), rank=4, alpha=8, targets=("q", "v"), num_heads=3, key_dim=8,
                    value_dim=8)
    with torch.no_grad():
        for t in layer.targets:
            layer.lora_B[t].weight.normal_()
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(merge_lora(layer)(x), layer(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- errors

def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("imedsam: error:")
    return err


def test_export_refuses_a_non_empty_folder_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")

    def no_build(*args, **kwargs):
        raise AssertionError("the model must not be built")

    monkeypatch.setattr("imedsam.models.registry.build_system", no_build)
    assert "--overwrite" in _error(capsys, ["export", "--format", "onnx", "--out", str(out)])
    assert (out / "keep.txt").read_text() == "x"
    file = tmp_path / "file"
    file.write_text("x")
    assert "is a file" in _error(capsys, ["export", "--format", "onnx", "--out", str(file)])
    assert "cannot be exported" in _error(capsys, ["export", "--format", "onnx", "--model", "ma_sam", "--out",
                                                   str(tmp_path / "new")])
    assert "no implicit decoder" in _error(capsys, ["export", "--format", "onnx", "--no-uncertainty", "--out",
                                                    str(tmp_path / "new")])
    assert "invalid choice" in _error(capsys, ["export", "--format", "tflite", "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def test_export_overwrite_replaces_only_an_earlier_export(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    export = ["export", "--format", "onnx", "--model", "tiny_tinyvit_test", "--out", str(out), "--overwrite"]
    assert "not an earlier ONNX export" in _error(capsys, export)
    (out / "old.txt").unlink()
    for _ in range(2):  # into the empty folder, then over that export
        assert main(export) == 0
        assert json.loads(capsys.readouterr().out)["files"] == {"encoder": "encoder.onnx", "decoder": "decoder.onnx"}
        assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folder left behind


def test_runtime_errors(lite_dir, tmp_path, capsys, monkeypatch):
    image = tmp_path / "img.png"
    Image.fromarray(_image()[..., 0]).save(image)
    seg = ["segment", str(image), "--box", *map(str, BOX), "--out", str(tmp_path / "m.png")]
    assert "no such folder" in _error(capsys, [*seg, "--runtime", "onnx", "--onnx-dir", str(tmp_path / "none")])
    assert "--onnx-dir" in _error(capsys, [*seg, "--runtime", "onnx"])
    assert "drop --adapter" in _error(capsys, [*seg, "--runtime", "onnx", "--onnx-dir", str(lite_dir), "--adapter",
                                               str(tmp_path)])
    assert "is model 'litemedsam'" in _error(capsys, [*seg, "--runtime", "onnx", "--onnx-dir", str(lite_dir),
                                                      "--model", "imedsam"])
    assert "runs in fp32" in _error(capsys, [*seg, "--runtime", "onnx", "--onnx-dir", str(lite_dir), "--precision",
                                             "bf16"])
    assert "--runtime onnx" in _error(capsys, [*seg, "--onnx-dir", str(lite_dir)])
    assert not (tmp_path / "m.png").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert "pip install 'imedsam[onnx]'" in _error(capsys, [*seg, "--runtime", "onnx", "--onnx-dir",
                                                             str(lite_dir)])


def test_manifest_mismatch_is_refused(tmp_path, capsys):
    good = tmp_path / "good"
    assert main(["export", "--format", "onnx", "--model", "tiny_tinyvit_test", "--out", str(good)]) == 0
    capsys.readouterr()

    def broken(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        edit(folder, manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder

    cases = {
        "format_version 99": lambda f, m: m.update(format_version=99),
        "has 3 bytes": lambda f, m: (f / "encoder.onnx").write_bytes(b"abc"),
        "decoder.onnx (decoder graph) is missing": lambda f, m: (f / "decoder.onnx").unlink(),
        "the manifest says": lambda f, m: m["graphs"]["decoder"]["inputs"][1].update(name="coords"),
        "not an imedsam ONNX manifest": lambda f, m: m.update(format="other"),
        "manifest.json key model": lambda f, m: m["model"].pop("system"),
    }
    for message, edit in cases.items():
        folder = broken(message.split()[0] + str(len(message)), edit)
        with pytest.raises(ImedsamError, match=re.escape(message)):
            Segmenter(runtime="onnx", onnx_dir=str(folder))
    (good / "manifest.json").unlink()
    with pytest.raises(ImedsamError, match="no manifest.json"):
        Segmenter(runtime="onnx", onnx_dir=str(good))


# ---------------------------------------------------------------------------------------- benchmark

def test_benchmark_script_runs_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "onnx_runtime.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [line["stage"] for line in lines] == ["encoder", "decode_box", "decode_3_points"]
    assert all(line["torch_s_median"] > 0 and line["onnx_s_median"] > 0 for line in lines)


def test_cli_export_of_a_trained_imedsam_adapter(tmp_path, capsys):
    """`export --adapter RUN` of an I-MedSAM on LiteMedSAM, then `segment --runtime onnx --uncertainty`: the
    PyTorch path's mask file, and its uncertainty map to float rounding."""
    system = _trained_imedsam("litemedsam")
    adapter = system.save_trainable(tmp_path / "run" / "adapter.safetensors")
    out = tmp_path / "onnx"
    assert main(["export", "--format", "onnx", "--adapter", str(adapter.parent), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "imedsam" and summary["merged"] and summary["rewritten"]
    assert json.loads((out / "manifest.json").read_text())["model"]["adapter"] == str(adapter.resolve())
    image = tmp_path / "img.png"
    Image.fromarray(_image(60, 80)).save(image)
    common = ["segment", str(image), "--box", "20", "15", "60", "45", "--device", "cpu"]
    assert main([*common, "--adapter", str(adapter.parent), "--precision", "fp32", "--out", str(tmp_path / "t.png"),
                 "--uncertainty", str(tmp_path / "tu.png")]) == 0
    assert main([*common, "--runtime", "onnx", "--onnx-dir", str(out), "--out", str(tmp_path / "o.png"),
                 "--uncertainty", str(tmp_path / "ou.png")]) == 0
    assert (tmp_path / "t.png").read_bytes() == (tmp_path / "o.png").read_bytes()
    np.testing.assert_allclose(np.load(tmp_path / "tu.npy"), np.load(tmp_path / "ou.npy"), atol=1e-5)
