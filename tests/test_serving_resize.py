"""Resizing in the decode threads is done only where it provably changes nothing."""
from __future__ import annotations

from conftest import make_artifact
from pipeline.serving.endpoint import load_model
from serving_testing import bin_photo, patched_artifact

import pytest

CROPPING_TO_PIXELS = """
_to_pixels = to_pixels


def to_pixels(image, config):
    w, h = image.size
    return _to_pixels(image.crop((w // 8, h // 8, w - w // 8, h - h // 8)), config)
"""


@pytest.mark.slow
def test_the_endpoint_resizes_early_with_identical_answers(tmp_path):
    model = load_model(make_artifact(tmp_path, image_size=48))
    assert model.presize == 48
    body = bin_photo(7, (640, 480))
    early = model.decode(body, "image/jpeg")
    assert early.size == (48, 48)
    untouched = model.inference.input_fn(body, "image/jpeg")
    assert untouched.size == (640, 480)
    a, b = model.predict_batch([early]), model.predict_batch([untouched])
    assert a == b  # same probabilities to the last digit


@pytest.mark.slow
def test_an_inference_py_that_crops_is_left_to_resize_itself(tmp_path):
    artifact = patched_artifact(make_artifact, tmp_path, CROPPING_TO_PIXELS, image_size=48)
    model = load_model(artifact)
    assert model.presize is None
    assert model.decode(bin_photo(7, (640, 480)), "image/jpeg").size == (640, 480)


@pytest.mark.slow
@pytest.mark.parametrize("tta, early", [("flips", 48), ("flips+crops", None), ("crops", None)])
def test_tta_views_at_another_size_keep_the_photo_whole_and_answer_as_predict_fn_does(tmp_path, tta, early):
    """The crops look at the photo squashed to 55 px for a 48 px model: a photo resized to 48
    first would give other pixels, so it is passed on untouched; the flips allow it."""
    model = load_model(make_artifact(tmp_path, image_size=48, tta=tta))
    assert model.presize == early
    body = bin_photo(7, (640, 480))
    decoded = model.decode(body, "image/jpeg")
    untouched = model.inference.input_fn(body, "image/jpeg")
    assert model.predict_batch([decoded]) == model.predict_batch([untouched])
