"""2D images: reading every supported format, mask/overlay writing (atomic), display conversion, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imedsam.io as io
from imedsam.errors import ImedsamError
from imedsam.io import images as images_module


def _ramp(h: int = 12, w: int = 16, dtype=np.uint8, scale: int = 1) -> np.ndarray:
    return ((np.arange(h * w).reshape(h, w) * scale) % (np.iinfo(dtype).max + 1)).astype(dtype)


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------------------------------------ reading


def test_gray_png_round_trip_through_write_mask(tmp_path):
    labels = _ramp() % 7  # a label map (max > 1): written with its values
    path = io.write_mask(tmp_path / "labels.png", labels)
    sample = io.read(path)
    assert sample.array.dtype == np.uint8 and sample.array.shape == (12, 16)
    np.testing.assert_array_equal(sample.array, labels)
    assert sample.geometry.shape == (12, 16) and sample.geometry.spacing is None
    assert sample.geometry.source == path


def test_rgb_png_and_rgba_drops_alpha(tmp_path):
    rgb = np.stack([_ramp(), _ramp()[::-1], np.full((12, 16), 7, np.uint8)], axis=2)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((12, 16, 1), 10, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        s = io.read_image(tmp_path / name)
        assert s.array.shape == (12, 16, 3) and s.array.dtype == np.uint8
        np.testing.assert_array_equal(s.array, rgb)
        assert s.geometry.shape == (12, 16)


def test_16bit_png_kept_as_uint16(tmp_path):
    arr = _ramp(dtype=np.uint16, scale=331)
    assert arr.max() > 255
    Image.fromarray(arr).save(tmp_path / "deep.png")
    s = io.read(tmp_path / "deep.png")
    assert s.array.dtype == np.uint16
    np.testing.assert_array_equal(s.array, arr)


def test_palette_gray_becomes_l_and_color_becomes_rgb(tmp_path):
    idx = (_ramp() % 3).astype(np.uint8)
    gray = Image.fromarray(idx, mode="L").convert("P")
    gray.putpalette([0, 0, 0, 128, 128, 128, 255, 255, 255] + [0] * (256 * 3 - 9))
    gray.save(tmp_path / "gray_p.png")
    color = Image.fromarray(idx, mode="L").convert("P")
    color.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    color.save(tmp_path / "color_p.png")
    g = io.read_image(tmp_path / "gray_p.png").array
    assert g.shape == (12, 16) and set(np.unique(g)) == {0, 128, 255}
    c = io.read_image(tmp_path / "color_p.png").array
    assert c.shape == (12, 16, 3)
    np.testing.assert_array_equal(c[idx == 1], np.tile([255, 0, 0], (int((idx == 1).sum()), 1)))


def test_one_bit_image_reads_as_0_255(tmp_path):
    mask = _ramp() % 2 == 1
    Image.fromarray(mask).save(tmp_path / "bits.png")
    arr = io.read_image(tmp_path / "bits.png").array
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, mask.astype(np.uint8) * 255)


def test_tiff_16bit_with_resolution_gives_spacing(tmp_path):
    arr = _ramp(dtype=np.uint16, scale=997)
    Image.fromarray(arr).save(tmp_path / "scan.tif", resolution=254.0, resolution_unit="cm")  # 10/254 mm
    s = io.read(tmp_path / "scan.tif")
    np.testing.assert_array_equal(s.array, arr)
    assert s.geometry.spacing == pytest.approx((10 / 254, 10 / 254))
    Image.fromarray(arr).save(tmp_path / "plain.tiff")
    assert io.read(tmp_path / "plain.tiff").geometry.spacing is None


def test_bmp_and_jpeg(tmp_path):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :12] = (200, 30, 30)
    rgb[:, 12:] = (20, 40, 220)
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    np.testing.assert_array_equal(io.read(tmp_path / "a.bmp").array, rgb)
    Image.fromarray(rgb).save(tmp_path / "a.JPG", quality=95)
    j = io.read(tmp_path / "a.JPG").array
    assert j.shape == (16, 24, 3) and j.dtype == np.uint8
    assert np.abs(j.astype(int) - rgb.astype(int))[:, 2:10].max() < 12  # lossy, but close away from the edge
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.jpeg")
    assert io.read(tmp_path / "g.jpeg").array.shape == (16, 24)


# ------------------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("mask", [
    np.eye(8, dtype=bool),
    np.eye(8, dtype=np.int64),
    np.eye(8, dtype=np.uint8),
])
def test_binary_masks_written_as_0_255(tmp_path, mask):
    path = io.write_mask(tmp_path / "m.png", mask)
    with Image.open(path) as im:
        assert im.mode == "L"
        arr = np.asarray(im)
    np.testing.assert_array_equal(arr, np.eye(8, dtype=np.uint8) * 255)
    io.write_mask(tmp_path / "m1.png", mask, binary_value=1)
    np.testing.assert_array_equal(io.read(tmp_path / "m1.png").array, np.eye(8, dtype=np.uint8))


def test_large_labels_written_as_uint16(tmp_path):
    labels = np.zeros((6, 6), np.int32)
    labels[1:3, 1:3] = 300
    labels[4, 4] = 2
    io.write_mask(tmp_path / "l.png", labels)
    back = io.read(tmp_path / "l.png").array
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, labels)


def test_atomic_write_creates_folders_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "mask.png"
    io.write_mask(target, np.ones((4, 4), bool))
    io.write_mask(target, np.zeros((4, 4), bool))  # overwrite in place
    assert target.is_file() and io.read(target).array.max() == 0
    assert sorted(p.name for p in target.parent.iterdir()) == ["mask.png"]
    assert _no_temp_files(tmp_path)


def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "mask.png"
    io.write_mask(target, np.ones((4, 4), bool))

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.write_mask(target, np.zeros((4, 4), bool))
    monkeypatch.undo()
    assert io.read(target).array.min() == 255
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]


def test_write_mask_rejects_bad_input(tmp_path):
    with pytest.raises(ImedsamError, match="non-integer"):
        io.write_mask(tmp_path / "p.png", np.full((3, 3), 0.3))
    with pytest.raises(ImedsamError, match=r"\.png"):
        io.write_mask(tmp_path / "p.jpg", np.ones((3, 3), bool))
    with pytest.raises(ImedsamError, match="2D"):
        io.write_mask(tmp_path / "p.png", np.ones((2, 3, 3), bool))
    with pytest.raises(ImedsamError, match="0..65535"):
        io.write_mask(tmp_path / "p.png", np.full((3, 3), -1))
    assert not list(tmp_path.iterdir())


def test_overlay_fill_contour_and_identity(tmp_path):
    image = np.full((10, 10, 3), 100, np.uint8)
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    path = io.write_overlay(tmp_path / "o" / "overlay.png", image, mask, color=(255, 0, 0), alpha=0.5)
    out = io.read(path).array
    assert out.shape == (10, 10, 3)
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])          # background untouched
    np.testing.assert_array_equal(out[2, 5], [255, 0, 0])              # contour: opaque color
    np.testing.assert_array_equal(out[5, 5], [178, 50, 50])            # interior: 0.5 blend (177.5 rounds to 178)
    plain = images_module.overlay(image, mask, alpha=0.0, contour=False)
    np.testing.assert_array_equal(plain, image)
    with pytest.raises(ImedsamError, match="to_display_rgb"):
        io.write_overlay(tmp_path / "x.png", image.astype(np.float32), mask)
    with pytest.raises(ImedsamError, match="does not match"):
        io.write_overlay(tmp_path / "x.png", image, mask[:5])
    assert _no_temp_files(tmp_path)


# ------------------------------------------------------------------------------------------------ display


def test_to_display_rgb_rules():
    gray = _ramp()
    out = io.to_display_rgb(gray)
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 1], gray)                    # uint8 kept, replicated

    wide = np.linspace(-1000, 3000, 200 * 200, dtype=np.float32).reshape(200, 200)
    shown = io.to_display_rgb(wide)                                      # 0.5/99.5 percentiles -> 0/255
    assert shown[0, 0, 0] == 0 and shown[-1, -1, 0] == 255
    assert 120 <= shown[100, 100, 0] <= 135

    win = io.to_display_rgb(wide, window=(40.0, 400.0))
    np.testing.assert_array_equal(win[..., 0], io.apply_window(wide, 40.0, 400.0))
    np.testing.assert_array_equal(io.to_display_rgb(wide, window="soft_tissue"), win)

    assert io.to_display_rgb(np.full((4, 4), 7.5)).max() == 0          # constant -> black
    np.testing.assert_array_equal(io.to_display_rgb(np.eye(3, dtype=bool))[..., 0], np.eye(3, dtype=np.uint8) * 255)
    rgb16 = np.stack([_ramp(dtype=np.uint16, scale=100)] * 3, axis=2)
    assert io.to_display_rgb(rgb16).shape == (12, 16, 3)


def test_to_display_rgb_refuses_volumes():
    vol = io.Sample(np.zeros((2, 3, 4), np.float32), io.Geometry(shape=(2, 3, 4)))
    with pytest.raises(ImedsamError, match="slice"):
        io.to_display_rgb(vol)


# ------------------------------------------------------------------------------------------------ errors


def test_missing_unsupported_and_corrupt_files(tmp_path):
    with pytest.raises(ImedsamError, match="file not found: .*nope.png"):
        io.read(tmp_path / "nope.png")
    (tmp_path / "notes.xyz").write_text("hello")
    with pytest.raises(ImedsamError, match=r"notes\.xyz.*\.png.*\.nii\.gz.*\.dcm"):
        io.read(tmp_path / "notes.xyz")
    (tmp_path / "bad.png").write_bytes(b"this is not a png at all")
    with pytest.raises(ImedsamError, match="bad.png"):
        io.read(tmp_path / "bad.png")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImedsamError, match="cut.png"):
        io.read(tmp_path / "cut.png")


def test_write_uncertainty_png_and_npy(tmp_path):
    unc = np.linspace(0, 0.25, 20, dtype=np.float32).reshape(4, 5)
    written = images_module.write_uncertainty(tmp_path / "u" / "unc.png", unc)
    png, npy = Path(written["uncertainty"]), Path(written["uncertainty_npy"])
    assert png.name == "unc.png" and npy.name == "unc.npy"
    np.testing.assert_array_equal(np.load(npy), unc)
    shown = io.read(png).array
    assert shown[0, 0] == 0 and shown[-1, -1] == 255
    assert _no_temp_files(tmp_path)
