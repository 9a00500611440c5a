"""The command line: verbs run, user errors are one line with exit status 2 and write nothing."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from imedsam.cli import main


@pytest.fixture()
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(path)
    return path


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_segment_writes_mask_and_overlay(tmp_path, image_file, capsys):
    out, overlay = tmp_path / "o" / "mask.png", tmp_path / "o" / "overlay.png"
    code, stdout, _ = _run(capsys, ["segment", str(image_file), "--box", "5", "5", "30", "30",
                                    "--point", "10", "10", "1", "--out", str(out), "--overlay", str(overlay),
                                    "--model", "tiny_vit_test", "--device", "cpu"])
    assert code == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (40, 48) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(overlay)).shape == (40, 48, 3)
    assert json.loads(stdout.strip().splitlines()[-1])["mask"] == str(out.resolve())


@pytest.mark.parametrize("tta", ["none", "h,v"])
def test_segment_output_grid(tmp_path, image_file, capsys, tta):
    out = tmp_path / "mask.png"
    code, _, _ = _run(capsys, ["segment", str(image_file), "--box", "5", "5", "30", "30", "--size", "7", "9",
                               "--out", str(out), "--model", "tiny_tinyvit_test", "--tta", tta])
    assert code == 0 and np.asarray(Image.open(out)).shape == (7, 9)


def test_segment_min_component_removes_small_parts(tmp_path, image_file, capsys):
    kept, filtered = tmp_path / "kept.png", tmp_path / "filtered.png"
    base = ["segment", str(image_file), "--box", "5", "5", "30", "30", "--model", "tiny_vit_test"]
    assert _run(capsys, base + ["--out", str(kept)])[0] == 0
    assert _run(capsys, base + ["--out", str(filtered), "--min-component", str(40 * 48 + 1)])[0] == 0
    assert np.asarray(Image.open(kept)).any()  # the random model predicts something here
    assert not np.asarray(Image.open(filtered)).any()  # no component can be larger than the image


def test_segment_adaptive_large_grid(tmp_path, capsys, caplog):
    image_file = tmp_path / "square.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)).save(image_file)
    out = tmp_path / "mask.png"
    caplog.set_level(logging.DEBUG, logger="imedsam.decoders.implicit")
    code, _, _ = _run(capsys, ["segment", str(image_file), "--box", "5", "5", "30", "30",
                               "--size", "400", "480", "--adaptive", "--out", str(out), "--model", "imedsam", "--backbone",
                               "tiny_tinyvit_test"])
    assert code == 0 and np.asarray(Image.open(out)).shape == (400, 480)
    assert any("adaptive decode 400x480: stride 3" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("argv, message", [
    (["segment", "MISSING.png", "--box", "1", "1", "5", "5"], "not found"),
    (["segment", "IMG", "--box", "30", "30", "5", "5"], "degenerate"),
    (["segment", "IMG", "--box", "100", "100", "120", "120"], "outside"),
    (["segment", "IMG", "--point", "3", "3", "7"], "LABEL must be 1"),
    (["segment", "IMG"], "no prompt"),
    (["segment", "IMG", "--box", "1", "1", "5", "5", "--model", "nope"], "unknown model"),
    (["segment", "IMG", "--box", "1", "1", "5", "5", "--model", "sam_vit_b"], "--checkpoint"),
    (["segment", "IMG", "--box", "1", "1", "5", "5", "--model", "tiny_vit_test", "--checkpoint", "CKPT"],
     "CKPT"),
    (["segment", "IMG", "--box", "1", "1", "5", "5", "--model", "tiny_vit_test", "--adaptive"], "--adaptive"),
    (["segment", "IMG", "--box", "1", "1", "5", "5", "--model", "tiny_vit_test", "--tta", "x"], "--tta"),
    (["segment", "IMG", "--box", "50", "50", "50", "80"], "degenerate"),
    (["segment", "IMG", "--box", "1", "1", "5", "5", "--auto"], "--auto"),
    (["segment", "IMG", "--box", "1", "1", "5", "5", "--mask-input", "MISSING.png"], "MISSING.png"),
    (["segment", "IMG", "--box", "1", "1", "5", "5", "--model", "sam_med2d", "--backbone", "nope"], "--backbone"),
    (["segment", "IMG", "--box", "1", "1", "5", "5", "--model", "litemedsam", "--backbone", "tiny_vit_test"],
     "--backbone"),
    (["segment", "IMG", "--box", "1", "1", "5", "5", "--model", "sam_med2d", "--uncertainty", "u.png"],
     "no uncertainty"),
])
def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path, image_file, capsys, argv, message):
    bad_ckpt = tmp_path / "bad.pth"
    bad_ckpt.write_bytes(b"garbage")
    argv = [str(image_file) if a == "IMG" else str(bad_ckpt) if a == "CKPT" else a for a in argv]
    if "CKPT" in message:
        message = "bad.pth"
    out = tmp_path / "never.png"
    code, _, err = _run(capsys, argv + ["--out", str(out)])
    assert code == 2
    assert err.startswith("imedsam: error:") and len(err.strip().splitlines()) == 1
    assert message in err
    assert not out.exists()


def test_more_bad_inputs_are_one_line_errors_before_any_work(tmp_path, image_file, capsys):
    """Non-finite pixels, a grid that cannot fit, outputs that cannot be written, a run folder that is a file."""
    nan_tif = tmp_path / "nan.tif"
    Image.fromarray(np.full((20, 20), np.nan, np.float32)).save(nan_tif)
    inf_tif = tmp_path / "inf.tif"
    Image.fromarray(np.full((20, 20), np.inf, np.float32)).save(inf_tif)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    box = ["--box", "1", "1", "9", "9"]
    cases = [
        (["segment", str(nan_tif), *box, "--out", str(tmp_path / "m.png")], "not finite"),
        (["segment", str(inf_tif), *box, "--out", str(tmp_path / "m.png")], "not finite"),
        (["segment", str(image_file), *box, "--size", "100000", "100000", "--out", str(tmp_path / "m.png")],
         "fits here"),
        (["segment", str(image_file), *box, "--out", str(a_file / "m.png")], "is a file"),
        (["segment", str(image_file), *box, "--out", str(tmp_path / "m.png"), "--uncertainty",
          str(tmp_path / "u.jpg"), "--model", "imedsam", "--backbone", "tiny_vit_test"], ".png"),
        (["train", "--data", str(tmp_path), "--out", str(a_file)], "is a file"),
        (["evaluate", "--model", "tiny_vit_test", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
          "--limit", "0"], "--limit"),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "optim.epochs=0"], "optim.epochs"),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "data.box_expand=[5, 0]"],
         "data.box_expand"),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "optim.max_steps=-1"],
         "optim.max_steps"),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "model.peft.lora_rnk=2"],
         "model.peft.lora_rnk: unknown key (source command-line override)"),
    ]
    for argv, message in cases:
        code, _, err = _run(capsys, argv)
        assert code == 2 and err.startswith("imedsam: error:") and len(err.strip().splitlines()) == 1, (argv, err)
        assert message in err, (argv, err)
    assert not (tmp_path / "m.png").exists() and not (tmp_path / "run").exists() and not (tmp_path / "r").exists()


def test_unsupported_format_is_a_user_error(tmp_path, capsys):
    path = tmp_path / "x.xyz"
    path.write_text("hello")
    code, _, err = _run(capsys, ["segment", str(path), "--box", "1", "1", "5", "5", "--out",
                                 str(tmp_path / "m.png")])
    assert code == 2 and "x.xyz" in err


def test_info_lists_models_and_versions(capsys):
    code, out, _ = _run(capsys, ["info", "--json"])
    info = json.loads(out)
    assert code == 0
    assert {"litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "mobilesam", "imedsam"} <= set(info["models"])
    assert info["versions"]["torch"]


def test_info_shows_the_precision_choice_and_each_measured_part(capsys, tmp_path, monkeypatch):
    import imedsam.runtime as runtime

    monkeypatch.setenv("IMEDSAM_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime, "cpu_precision", lambda **_: runtime.PrecisionCalibration(
        "fp32", 289.0, 197.0, "cache", runtime._cpu_key()))
    monkeypatch.setattr(runtime, "fp32_linear_backend", lambda **_: runtime.LinearBackend(
        "onednn", 141.0, 205.0, "measured", "k"))
    runtime._write_cache(f"{runtime._cpu_key()} | sam litemedsam encoder 256",
                         {"choice": "bf16", "fp32_seconds": 0.9, "bf16_seconds": 0.79, "source": "measured",
                          "key": "k"})
    code, out, _ = _run(capsys, ["info"])
    assert code == 0
    assert "choice             fp32 (cache: GEMM + conv fp32 289.0 GFLOP/s, bf16 197.0 GFLOP/s)" in out
    assert "sam litemedsam encoder 256 bf16 (measured: fp32 0.9 s, bf16 0.79 s)" in out
    assert "fp32 dense layers  onednn (measured: ATen 141.0 GFLOP/s, oneDNN 205.0 GFLOP/s)" in out
    code, out, _ = _run(capsys, ["info", "--json"])
    assert json.loads(out)["precision_auto_cpu_parts"]["sam litemedsam encoder 256"]["choice"] == "bf16"


@pytest.mark.parametrize("clash", ["input", "overlay"])
def test_outputs_never_overwrite_an_input_or_each_other(tmp_path, image_file, capsys, clash):
    before = image_file.read_bytes()
    out = image_file if clash == "input" else tmp_path / "m.png"
    argv = ["segment", str(image_file), "--box", "5", "5", "30", "30", "--model", "tiny_vit_test", "--out", str(out)]
    if clash == "overlay":
        argv += ["--overlay", str(out)]
    code, _, err = _run(capsys, argv)
    assert code == 2 and ("is also the input" if clash == "input" else "is also --out") in err
    assert image_file.read_bytes() == before and (clash == "input" or not out.exists())


def test_segment_points_mask_prompt_and_auto(tmp_path, image_file, capsys):
    base = ["segment", str(image_file), "--model", "sam_med2d", "--backbone", "tiny_tinyvit_test", "--device", "cpu"]
    first = tmp_path / "first.png"
    code, out, _ = _run(capsys, base + ["--point", "20", "15", "1", "--out", str(first)])
    assert code == 0 and json.loads(out.splitlines()[-1])["mask"] == str(first.resolve())
    second = tmp_path / "second.png"
    code, _, _ = _run(capsys, base + ["--point", "20", "15", "1", "--point", "5", "5", "0", "--mask-input",
                                      str(first), "--out", str(second)])
    assert code == 0 and np.asarray(Image.open(second)).shape == (40, 48)
    labels, overlay = tmp_path / "labels.png", tmp_path / "auto.png"
    code, out, _ = _run(capsys, base + ["--auto", "--points-per-side", "4", "--pred-iou-thresh", "0",
                                        "--stability-thresh", "0", "--out", str(labels), "--overlay", str(overlay)])
    result = json.loads(out.splitlines()[-1])
    assert code == 0 and np.asarray(Image.open(labels)).shape == (40, 48)
    assert result["objects"] == len(np.unique(np.asarray(Image.open(labels)))) - 1
    assert Image.open(overlay).size == (48, 40)


def test_info_shows_the_reference_counts_of_sammed2d(capsys):
    code, out, _ = _run(capsys, ["info", "--model", "sam_med2d", "--backbone", "sam_vit_b", "--mode", "reference",
                                 "--json"])
    p = json.loads(out)["parameters"]
    assert code == 0 and p["total_trainable"] == 184_569_136 and p["img_size"] == 256
    code, _, err = _run(capsys, ["info", "--model", "litemedsam", "--mode", "reference"])
    assert code == 2 and "zero-shot and has no mode" in err
    code, _, err = _run(capsys, ["info", "--model", "imedsam", "--mode", "bogus"])
    assert code == 2 and "--mode" in err and len(err.strip().splitlines()) == 1


def test_prompts_are_checked_against_the_image_before_the_model_loads(tmp_path, image_file, capsys, monkeypatch):
    """A point or box off the 48x40 image, or a mask prompt of another size, fails in one line before any model
    is built or image encoded (the Segmenter constructor would raise if reached)."""
    import imedsam.infer.segmenter as segmenter

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the prompts were checked")

    monkeypatch.setattr(segmenter.Segmenter, "__init__", refuse)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small)
    out = tmp_path / "m.png"
    cases = [
        (["--point", "60", "5", "1"], "lies outside the 48x40 (WxH) image"),
        (["--point", "5", "-1", "0"], "lies outside the 48x40 (WxH) image"),
        (["--box", "50", "41", "70", "60"], "lies outside the 48x40 (WxH) image"),
        (["--mask-input", str(small)], "10x10 (HxW) but the image is 40x48"),
    ]
    for prompt, message in cases:
        code, _, err = _run(capsys, ["segment", str(image_file), *prompt, "--out", str(out)])
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (prompt, err)
    assert not out.exists()
