"""The HTTP API of `imedsam serve`: results equal the library's, interaction, volumes, and every refusal."""

from __future__ import annotations

import io as _io
import zipfile

import nibabel as nib
import numpy as np
import pytest

from imedsam.io.samples import embedded_ct_slice
from tests.serve.conftest import decode_png


def _open(client, data: bytes, name: str, **headers):
    return client.post(f"/api/sessions?filename={name}", content=data, headers=headers)


def test_box_equals_the_library_and_clicks_undo_clear(make_client, disc_png, tiny_segmenter):
    client = make_client()
    info = _open(client, disc_png, "disc.png").json()
    assert info["kind"] == "image" and info["shape"] == [1, 64, 80] and info["download"] == ["png"]
    sid = info["id"]
    r = client.post(f"/api/sessions/{sid}/segment", json={"box": [22, 12, 58, 48], "object": 2})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["embedded"] is True and res["objects"] == [2]
    plane = decode_png(res["labels"])
    assert plane.shape == (64, 80) and set(np.unique(plane)) <= {0, 2}

    fork = tiny_segmenter.fork()
    fork.set_image(decode_png(disc_png))
    expected = fork.predict(box=(22, 12, 58, 48)).masks[0]
    np.testing.assert_array_equal(plane == 2, expected)
    assert res["area"] == int(expected.sum())

    r = client.post(f"/api/sessions/{sid}/segment", json={"point": [40, 30], "label": 0, "object": 2})
    clicked = r.json()
    assert clicked["embedded"] is False  # the slice's embedding was cached
    again = fork.refine(box=(22, 12, 58, 48))
    after_click = fork.refine(point=(40, 30), label=0)
    np.testing.assert_array_equal(decode_png(clicked["labels"]) == 2, after_click.masks[0])
    assert not np.array_equal(after_click.masks[0], again.masks[0])

    undone = client.post(f"/api/sessions/{sid}/undo", json={"slice": 0}).json()
    np.testing.assert_array_equal(decode_png(undone["labels"]), plane)
    cleared = client.post(f"/api/sessions/{sid}/clear", json={"slice": 0, "object": 2}).json()
    assert not decode_png(cleared["labels"]).any()
    download = client.get(f"/api/sessions/{sid}/download")
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert 'filename="disc_labels.png"' in download.headers["content-disposition"]
    assert not decode_png(download.content).any()
    client.post(f"/api/sessions/{sid}/undo", json={"slice": 0})
    np.testing.assert_array_equal(decode_png(client.get(f"/api/sessions/{sid}/download").content), plane)
    assert client.get("/api/health").json()["cached_embeddings"] == 1


def test_two_objects_keep_their_labels(make_client, disc_png):
    client = make_client()
    sid = _open(client, disc_png, "disc.png").json()["id"]
    client.post(f"/api/sessions/{sid}/segment", json={"box": [0, 0, 30, 30], "object": 1})
    res = client.post(f"/api/sessions/{sid}/segment", json={"box": [50, 34, 80, 64], "object": 3}).json()
    plane = decode_png(res["labels"])
    assert (plane == 3).any() and set(np.unique(plane)) <= {0, 1, 3}
    labels = decode_png(client.get(f"/api/sessions/{sid}/slices/0/labels.png").content)
    np.testing.assert_array_equal(labels, plane)


def test_dicom_slice_and_windows(make_client):
    client = make_client()
    info = _open(client, embedded_ct_slice().read_bytes(), "CT_small.dcm").json()
    assert info["modality"] == "CT" and "lung" in info["windows"] and info["spacing"][0] == pytest.approx(0.661468)
    auto = decode_png(client.get(f"/api/sessions/{info['id']}/slices/0/image.png").content)
    lung = decode_png(client.get(f"/api/sessions/{info['id']}/slices/0/image.png?window=lung").content)
    assert auto.shape == lung.shape == (128, 128, 3) and not np.array_equal(auto, lung)
    r = client.get(f"/api/sessions/{info['id']}/slices/0/image.png?window=vivid")
    assert r.status_code == 400 and "window 'vivid'" in r.json()["detail"]


def test_volume_box3d_propagate_scroll_and_nifti_download(make_client, small_nifti):
    client = make_client()
    info = _open(client, small_nifti.read_bytes(), "vol.nii.gz").json()
    assert info["kind"] == "volume" and info["shape"] == [6, 40, 48] and info["download"] == ["nifti", "png"]
    assert info["spacing"] == pytest.approx([2.5, 0.9, 0.8])
    sid = info["id"]
    for k in range(6):
        assert decode_png(client.get(f"/api/sessions/{sid}/slices/{k}/image.png").content).shape == (40, 48)
    r = client.post(f"/api/sessions/{sid}/box3d", json={"box3d": [14, 9, 1, 31, 26, 5], "object": 1, "slice": 2})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["changed_slices"] and set(res["changed_slices"]) <= {1, 2, 3, 4}
    r = client.post(f"/api/sessions/{sid}/segment", json={"box": [14, 9, 31, 26], "slice": 0, "object": 2})
    assert r.status_code == 200
    prop = client.post(f"/api/sessions/{sid}/propagate", json={"slice": 0, "object": 2})
    assert prop.status_code == 200, prop.text
    assert all(s > 0 for s in prop.json()["changed_slices"])
    download = client.get(f"/api/sessions/{sid}/download")
    assert download.headers["content-type"] == "application/gzip"
    path = small_nifti.parent / "labels.nii.gz"
    path.write_bytes(download.content)
    written, source = nib.load(path), nib.load(small_nifti)
    np.testing.assert_allclose(written.affine, source.affine)
    assert written.shape == source.shape
    planes = np.stack([decode_png(client.get(f"/api/sessions/{sid}/slices/{k}/labels.png").content)
                       for k in range(6)])
    np.testing.assert_array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), planes)
    one = client.get(f"/api/sessions/{sid}/download?format=png&slice=2")
    np.testing.assert_array_equal(decode_png(one.content), planes[2])
    assert client.get(f"/api/sessions/{sid}/download?format=png").status_code == 400
    undo = client.post(f"/api/sessions/{sid}/undo", json={"slice": 0}).json()  # undoes the propagation
    assert undo["changed_slices"] == prop.json()["changed_slices"]


def test_dicom_series_zip(make_client, tmp_path):
    from tests.io.test_dicom import _write_series

    _write_series(tmp_path / "series", [0.0, 2.0, 4.0])
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted((tmp_path / "series").iterdir()):
            z.write(p, f"../../evil/{p.name}")  # member names are never used as paths
    client = make_client()
    info = _open(client, buf.getvalue(), "series.zip").json()
    assert info["kind"] == "volume" and info["shape"] == [3, 128, 128] and info["spacing"][0] == pytest.approx(2.0)
    assert not (tmp_path.parent / "evil").exists()


def test_bad_uploads_get_400_with_one_line_naming_the_file(make_client, disc_png):
    client = make_client()
    cases = [(b"not an image at all", "scan.png", "scan.png"), (b"\x00" * 100, "notes.txt", "unsupported"),
             (b"PK\x03\x04broken", "series.zip", "series.zip"), (b"", "empty.png", "empty")]
    for data, name, needle in cases:
        r = _open(client, data, name)
        assert r.status_code == 400, (name, r.text)
        detail = r.json()["detail"]
        assert needle in detail and "\n" not in detail and "/tmp" not in detail, detail
    r = _open(client, disc_png, "../../../etc/passwd.png")  # a path in the name is only a name
    assert r.status_code == 201 and r.json()["name"] == "passwd.png"
    assert client.get("/api/health").json()["status"] == "ok"


def test_limits_413_and_zip_bomb(make_client, disc_png):
    client = make_client(max_upload_mb=0.001)
    r = _open(client, disc_png + b"\x00" * 2000, "big.png")
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.dcm", b"\x00" * 200_000)  # 200 kB of zeros compress to a few hundred bytes
    assert len(buf.getvalue()) < 1000
    r = _open(client, buf.getvalue(), "bomb.zip")
    assert r.status_code == 413 and "unpacks" in r.json()["detail"]
    r = client.post("/api/sessions/x/segment", content=b"{" + b" " * (2 << 20) + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_bad_requests(make_client, disc_png):
    client = make_client()
    sid = _open(client, disc_png, "disc.png").json()["id"]
    bad = [({"box": [70, 70, 90, 90]}, "outside"), ({}, "give a box"), ({"box": [1, 1, 9, 9], "model": "gpt"},
           "not offered"), ({"box": [1, 1, 9, 9], "slice": 3}, "slice 3"), ({"box": [1, 1, 9, 9],
           "uncertainty": True}, "no uncertainty")]
    for body, needle in bad:
        r = client.post(f"/api/sessions/{sid}/segment", json=body)
        assert r.status_code == 400 and needle in r.json()["detail"], (body, r.text)
    assert client.post(f"/api/sessions/{sid}/segment", json={"box": [1, 1, 9, 9], "object": 0}).status_code == 422
    assert client.post(f"/api/sessions/{sid}/undo", json={"slice": 0}).json()["detail"] == "nothing to undo"
    assert client.post(f"/api/sessions/{sid}/propagate", json={"slice": 0}).status_code == 400
    r = client.post("/api/sessions/nope/segment", json={"box": [1, 1, 9, 9]})
    assert r.status_code == 404 and "open the file again" in r.json()["detail"]
    assert client.delete(f"/api/sessions/{sid}").status_code == 204
    assert client.get(f"/api/sessions/{sid}").status_code == 404


def test_token_required_on_every_api_call(make_client, disc_png):
    client = make_client(token="s3cret")
    assert client.get("/").status_code == 200  # the page itself asks for the token
    for method, path in (("get", "/api/models"), ("get", "/api/health"), ("get", "/api/sessions/x")):
        r = getattr(client, method)(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert getattr(client, method)(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _open(client, disc_png, "disc.png").status_code == 401
    ok = {"Authorization": "Bearer s3cret"}
    assert client.get("/api/models", headers=ok).status_code == 200
    assert _open(client, disc_png, "disc.png", **ok).status_code == 201


def test_sessions_expire_and_are_bounded(make_client, disc_png, monkeypatch):
    import types

    from imedsam.serve import sessions

    now = [1000.0]  # the sessions' clock, moved by hand (a loaded machine cannot make the test late)
    monkeypatch.setattr(sessions, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    client = make_client(max_sessions=2, session_ttl_s=60)
    ids = [_open(client, disc_png, f"d{i}.png").json()["id"] for i in range(3)]
    assert client.get(f"/api/sessions/{ids[0]}").status_code == 404  # least recently used closed
    now[0] += 59
    assert client.get(f"/api/sessions/{ids[2]}").status_code == 200  # used: its idle time starts again
    now[0] += 59
    assert client.get(f"/api/sessions/{ids[1]}").status_code == 404  # idle 118 s > 60
    assert client.get(f"/api/sessions/{ids[2]}").status_code == 200
    now[0] += 61
    assert client.get(f"/api/sessions/{ids[2]}").status_code == 404


def test_openapi_describes_the_api(make_client):
    spec = make_client().get("/openapi.json").json()
    assert {"/api/sessions", "/api/sessions/{sid}/segment", "/api/sessions/{sid}/download",
            "/api/sessions/{sid}/propagate", "/api/sessions/{sid}/box3d", "/api/models"} <= set(spec["paths"])
    assert "application/octet-stream" in spec["paths"]["/api/sessions"]["post"]["requestBody"]["content"]


def test_uncertainty_map_of_an_implicit_decoder(disc_png):
    import torch
    from fastapi.testclient import TestClient

    from imedsam.infer.segmenter import Segmenter
    from imedsam.serve import ServeSettings, create_app

    torch.manual_seed(0)
    seg = Segmenter("imedsam", backbone="tiny_vit_test", device="cpu", precision="fp32")
    with TestClient(create_app(ServeSettings(model="imedsam"), segmenters={"imedsam": seg})) as client:
        assert client.get("/api/models").json()["models"][0]["uncertainty"] is True
        sid = _open(client, disc_png, "disc.png").json()["id"]
        res = client.post(f"/api/sessions/{sid}/segment", json={"box": [22, 12, 58, 48], "uncertainty": True}).json()
    heat = decode_png(res["uncertainty"])
    fork = seg.fork()
    fork.set_image(decode_png(disc_png))
    expected = fork.predict(box=(22, 12, 58, 48), uncertainty=True).uncertainty
    assert heat.shape == (64, 80) and heat.max() > 0
    np.testing.assert_array_equal(heat, np.clip(np.rint(expected / 0.25 * 255), 0, 255).astype(np.uint8))


def test_dicom_inputs_download_as_dicom_seg(make_client, tmp_path):
    highdicom = pytest.importorskip("highdicom", reason="DICOM-SEG needs highdicom (the test extra has it)")
    import pydicom

    from tests.io.test_dicom import _write_series

    _write_series(tmp_path / "series", [0.0, 2.5, 5.0])
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted((tmp_path / "series").iterdir()):
            z.write(p, p.name)
    client = make_client()
    info = _open(client, buf.getvalue(), "series.zip").json()
    assert info["download"] == ["nifti", "png", "dicom-seg"]
    sid = info["id"]
    client.post(f"/api/sessions/{sid}/segment", json={"box": [30, 40, 90, 100], "slice": 1, "object": 1})
    client.post(f"/api/sessions/{sid}/segment", json={"box": [10, 10, 40, 40], "slice": 2, "object": 4})
    planes = np.stack([decode_png(client.get(f"/api/sessions/{sid}/slices/{k}/labels.png").content)
                       for k in range(3)])
    r = client.get(f"/api/sessions/{sid}/download?format=dicom-seg")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    path = tmp_path / "seg.dcm"
    path.write_bytes(r.content)
    seg = highdicom.seg.segread(path)
    sources = sorted((pydicom.dcmread(p) for p in (tmp_path / "series").iterdir()),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    got = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in sources], combine_segments=True,
                                            relabel=True)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["object 1", "object 4"]
    expected = np.select([planes == 1, planes == 4], [1, 2], 0)
    np.testing.assert_array_equal(got, expected)

    png = _open(client, (tmp_path / "series" / sorted(p.name for p in (tmp_path / "series").iterdir())[0])
                .read_bytes(), "slice.dcm").json()
    assert png["download"] == ["png", "dicom-seg"]
    nondicom = _open(client, _blank_png(), "x.png").json()
    r = client.get(f"/api/sessions/{nondicom['id']}/download?format=dicom-seg")
    assert r.status_code == 400 and "needs a DICOM input" in r.json()["detail"]


def _blank_png() -> bytes:
    from tests.serve.conftest import png_bytes

    return png_bytes(np.zeros((20, 30), np.uint8))


def test_embed_ahead_of_the_first_prompt(make_client, small_nifti):
    client = make_client()
    sid = _open(client, small_nifti.read_bytes(), "vol.nii.gz").json()["id"]
    first = client.post(f"/api/sessions/{sid}/embed", json={"slice": 3}).json()
    again = client.post(f"/api/sessions/{sid}/embed", json={"slice": 3}).json()
    assert first["embedded"] is True and again["embedded"] is False
    res = client.post(f"/api/sessions/{sid}/segment", json={"slice": 3, "box": [14, 9, 31, 26]}).json()
    assert res["embedded"] is False
    assert client.post(f"/api/sessions/{sid}/embed", json={"slice": 9}).status_code == 400


@pytest.mark.parametrize("prompt", ["none", "box"])
def test_volume_models_answer_auto_or_a_3d_box_as_the_library(small_nifti, prompt):
    """MA-SAM served: prompt-free -> `auto` gives every class of the whole volume (a new object per class),
    box-prompted -> `box3d` predicts the box's slices from sliding stacks; both equal `predict_volume` on the
    same display volume; slice prompts are refused in one line (400)."""
    import torch
    from fastapi.testclient import TestClient

    from imedsam import io
    from imedsam.infer.segmenter import Segmenter
    from imedsam.models.masam import MASAMConfig, build_masam
    from imedsam.serve import ServeSettings, create_app

    torch.manual_seed(0)
    system = build_masam(MASAMConfig(backbone="tiny_tinyvit_test", stack_depth=3,
                                     decoder={"num_classes": 2, "prompt": prompt}), pretrained=False)
    seg = Segmenter(system, device="cpu", precision="fp32")
    display = io.to_display_volume(io.read(small_nifti))
    with TestClient(create_app(ServeSettings(model="ma_sam"), segmenters={"ma_sam": seg})) as client:
        assert client.get("/api/models").json()["models"][0]["volume"] is True
        sid = _open(client, small_nifti.read_bytes(), "vol.nii.gz").json()["id"]
        assert client.post(f"/api/sessions/{sid}/embed", json={"slice": 2}).json()["embedded"] is False  # no-op
        if prompt == "none":
            res = client.post(f"/api/sessions/{sid}/auto", json={"slice": 2})
            want = system.predict_volume(display).argmax(0).numpy()
        else:
            res = client.post(f"/api/sessions/{sid}/box3d", json={"box3d": [14, 9, 1, 31, 26, 5], "object": 3})
            want = (system.predict_volume(display, box3d=(14, 9, 1, 31, 26, 5)).argmax(0).numpy() > 0) * 3
        assert res.status_code == 200, res.text
        planes = np.stack([decode_png(client.get(f"/api/sessions/{sid}/slices/{k}/labels.png").content)
                           for k in range(6)])
        assert want.any()
        np.testing.assert_array_equal(planes, want)  # class c -> object c (ids start at 1)
        if prompt == "box":
            assert not planes[[0, 5]].any()  # outside the box's slices
        assert sorted(res.json()["changed_slices"]) == [k for k in range(6) if want[k].any()]
        r = client.post(f"/api/sessions/{sid}/segment", json={"box": [14, 9, 31, 26], "slice": 2})
        assert r.status_code == 400
        assert ("takes no prompts" if prompt == "none" else "whole volumes") in r.json()["detail"]
        wrong = "box3d" if prompt == "none" else "auto"
        body = {"box3d": [14, 9, 1, 31, 26, 5]} if wrong == "box3d" else {"slice": 2}
        assert client.post(f"/api/sessions/{sid}/{wrong}", json=body).status_code == 400
