
import numpy as np
import pytest
import torch

from imedsam.errors import ImedsamError
from imedsam.infer.segmenter import Segmenter


@pytest.fixture(scope="module", params=["tiny_vit_test", "tiny_tinyvit_test"])
def segmenter(request):
    torch.manual_seed(0)
    return Segmenter(request.param, device="cpu", precision="fp32")


def test_predict_returns_masks_on_the_original_grid(segmenter):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(37, 53, 3), dtype=np.uint8)
    segmenter.set_image(image)
    pred = segmenter.predict(box=(5, 6, 30, 25))
    assert pred.masks.shape == (1, 37, 53) and pred.masks.dtype == bool
    assert pred.logits.shape == (1, 37, 53) and pred.scores.shape == (1,)
    multi = segmenter.predict(points=[[10, 10], [40, 30]], point_labels=[1, 0], multimask=True)
    assert multi.masks.shape == (3, 37, 53)
    again = segmenter.predict(box=(5, 6, 30, 25), mask_input=multi.low_res_logits[0])
    assert again.masks.shape == (1, 37, 53)
    sized = segmenter.predict(box=(5, 6, 30, 25), size=(17, 23))
    assert sized.masks.shape == (1, 17, 23)


def test_embedding_is_cached_and_prompts_are_independent(segmenter):
    image = np.zeros((40, 40), np.uint8)
    image[10:30, 10:30] = 200
    segmenter.set_image(image)
    a = segmenter.predict(box=(10, 10, 29, 29))
    b = segmenter.predict(box=(10, 10, 29, 29))
    np.testing.assert_array_equal(a.logits, b.logits)
    c = segmenter.predict(box=(0, 0, 12, 12))
    assert not np.array_equal(a.logits, c.logits)


def test_user_errors(segmenter):
    fresh = Segmenter(segmenter.system, device="cpu")
    with pytest.raises(ImedsamError, match="no image set"):
        fresh.predict(box=(1, 1, 5, 5))
    segmenter.set_image(np.zeros((20, 20), np.uint8))
    with pytest.raises(ImedsamError, match="no prompt"):
        segmenter.predict()
    with pytest.raises(ImedsamError, match="outside"):
        segmenter.predict(box=(30, 30, 40, 40))
    with pytest.raises(ImedsamError, match="labels must be 1"):
        segmenter.predict(points=[[3, 3]], point_labels=[5])
    with pytest.raises(ImedsamError, match="unknown model"):
        Segmenter("sam_vit_x")


def test_warm_up_runs_the_model_once_and_leaves_the_segmenter_untouched(segmenter, monkeypatch):
    calls = {"encode": 0, "decode": 0}
    encode, decode = segmenter.system.encode, segmenter.system.decode

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(segmenter.system, "encode", counted("encode", encode))
    monkeypatch.setattr(segmenter.system, "decode", counted("decode", decode))
    segmenter.set_image(np.full((30, 20), 90, np.uint8))
    before = segmenter.predict(box=(2, 2, 15, 25))
    segmenter.refine(point=(10, 10))
    calls.update(encode=0, decode=0)
    segmenter.warm_up((64, 48))
    assert calls == {"encode": 1, "decode": 1}
    assert segmenter.original_size == (30, 20) and len(segmenter.history) == 1  # its own image and interaction
    np.testing.assert_array_equal(segmenter.predict(box=(2, 2, 15, 25)).logits, before.logits)
