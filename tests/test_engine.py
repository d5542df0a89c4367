"""The optimisation loop in-process: progress, result, reproducibility, cancellation, settings."""

import io

import numpy as np
import pytest
from PIL import Image

from nst_server import engine
from nst_server.errors import FieldError
from nst_server.events import JobInputs, Result, STOP_CANCELLED, STOP_ITERATIONS
from nst_server.objective import evaluate
from nst_server.settings import StyleTransferSettings
from nst_server.targets import compute_targets


def _images(small_images):
    content, style = (Image.open(io.BytesIO(data)).convert("RGB") for data in small_images)
    return content, style


def _run(models, small_images, should_stop=None, styles=None, init_image=None, **settings):
    content, style = _images(small_images)
    inputs = JobInputs(content=content, styles=styles or [(style, 1.0)], init_image=init_image)
    events = list(engine.stylize(models, inputs, StyleTransferSettings(**settings), should_stop))
    return events[:-1], events[-1]


def test_progress_then_result_at_requested_size(models, small_images):
    progress, result = _run(models, small_images, max_side_px=40, iterations=8)
    assert [p.iteration for p in progress] == list(range(1, 9))
    assert isinstance(result, Result)
    assert result.image.shape == (30, 40, 3) and result.image.dtype == np.uint8   # 64x48 content -> 40x30
    assert Image.open(io.BytesIO(result.png)).size == (40, 30)
    assert result.stop_reason == STOP_ITERATIONS and result.iterations == 8
    assert progress[-1].costs.style < progress[0].costs.style


def test_delivered_costs_are_those_of_the_delivered_pixels(models, small_images):
    from nst_server.images import to_tensor
    _, result = _run(models, small_images, max_side_px=32, iterations=5)
    content, style = _images(small_images)
    settings = StyleTransferSettings(max_side_px=32)
    from nst_server.images import resize_to_max_side
    targets = compute_targets(models, to_tensor(resize_to_max_side(content, 32)),
                              [(to_tensor(resize_to_max_side(style, 32)), 1.0)], settings)
    delivered = to_tensor(Image.open(io.BytesIO(result.png)))
    terms = evaluate(models.features(delivered), delivered * 255, targets, settings)
    assert result.costs.style == pytest.approx(terms.style.item(), rel=1e-5)
    assert result.costs.content == pytest.approx(terms.content.item(), rel=1e-5)


def test_same_seed_same_bytes_other_seed_other_bytes(models, small_images):
    a = _run(models, small_images, max_side_px=32, iterations=4, seed=7)[1]
    b = _run(models, small_images, max_side_px=32, iterations=4, seed=7)[1]
    c = _run(models, small_images, max_side_px=32, iterations=4, seed=8)[1]
    assert a.png == b.png
    assert a.png != c.png


def test_should_stop_ends_the_job_with_the_best_image(models, small_images):
    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) > 3

    progress, result = _run(models, small_images, should_stop=stop_after_three, max_side_px=32, iterations=50)
    assert result.stop_reason == STOP_CANCELLED
    assert result.iterations == 3 and len(progress) == 3
    assert result.image.std() > 5                     # an image, not a flat gray or black one


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_both_optimisers_lower_the_cost(models, small_images, optimizer):
    progress, result = _run(models, small_images, max_side_px=32, iterations=10, optimizer=optimizer)
    assert result.costs.total < progress[0].costs.total


@pytest.mark.parametrize("field,value,message", [
    ("max_side_px", 8, "at least 16"),
    ("iterations", 0, "at least 1"),
    ("style_weight", float("nan"), "finite"),
    ("noise_ratio", 1.5, r"\[0, 1\]"),
    ("style_scale", 0.0, r"^style_scale: must be a finite number > 0, got 0.0$"),
    ("style_scale", -1.0, r"^style_scale: must be a finite number > 0, got -1.0$"),
    ("style_scale", 1e307, r"larger than 16384 px"),          # the product would overflow to inf
    ("learning_rate", 0.0, r"^learning_rate: must be a finite number > 0"),
    ("content_layers", {"relu9_9": 1.0}, "must be among"),
    ("optimizer", "sgd", "must be one of"),
])
def test_settings_out_of_range_name_the_field(field, value, message):
    with pytest.raises(FieldError, match=message) as error:
        StyleTransferSettings(**{field: value}).validate()
    assert error.value.field == field and str(error.value) == f"{field}: {error.value.reason}"
    assert isinstance(error.value, ValueError)           # in-process callers catching ValueError keep working
