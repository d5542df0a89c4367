"""Each engine control shows its effect on synthetic images in-process and on real images."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from nst_server import color, engine, settings as settings_room
from nst_server.images import resize_to_max_side, to_tensor
from nst_server.events import JobInputs, STOP_CONVERGED, STOP_ITERATIONS, STOP_NON_FINITE
from nst_server.objective import evaluate
from nst_server.settings import DEFAULT_STYLE_LAYERS, StyleTransferSettings, blend_weights
from nst_server.targets import half_octaves, level_sizes
from nst_server.targets import compute_targets, features


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module")
def images(small_images):
    content, style = (_open(data) for data in small_images)
    second = Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], (40, 1, 3)))
    return content, style, second


def run(models, content, styles, **settings):
    settings.setdefault("max_side_px", 32)
    settings.setdefault("iterations", 6)
    init_image = settings.pop("init_image", None)
    inputs = JobInputs(content=content, styles=styles, init_image=init_image)
    events = list(engine.stylize(models, inputs, StyleTransferSettings(**settings)))
    return events[:-1], events[-1]


def test_seed_preset_is_the_course_recipe():
    seed = StyleTransferSettings.preset("seed")
    assert (seed.content_weight, seed.style_weight, seed.optimizer, seed.learning_rate) == (10.0, 40.0, "adam", 2.0)
    assert (seed.noise_ratio, seed.iterations, seed.scales, seed.init) == (0.6, 200, 1, "noisy_content")
    assert seed.content_layers == {"relu4_2": 1.0}
    assert seed.style_layers == {layer: 0.2 for layer in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")}
    assert StyleTransferSettings.preset("seed", iterations=5).iterations == 5
    with pytest.raises(ValueError, match="preset"):
        StyleTransferSettings.preset("vangogh")


def test_blend_weight_one_and_zero_equals_the_single_style(models, images):
    content, style, second = images
    single = run(models, content, [(style, 1.0)], seed=3)[1]
    blended = run(models, content, [(style, 1.0), (second, 0.0)], seed=3)[1]
    mixed = run(models, content, [(style, 1.0), (second, 1.0)], seed=3)[1]
    assert blended.png == single.png
    assert mixed.png != single.png


def test_blend_weights_normalise():
    assert blend_weights([2.0, 6.0]) == [0.25, 0.75]
    assert blend_weights([0.0, 0.0]) == [0.5, 0.5]
    with pytest.raises(ValueError, match="blend weights"):
        blend_weights([1.0, -1.0])


def test_larger_tv_weight_lowers_total_variation(models, images):
    content, style, _ = images
    plain = run(models, content, [(style, 1.0)], iterations=15)[1]
    smooth = run(models, content, [(style, 1.0)], iterations=15, tv_weight=1e3)[1]
    assert smooth.costs.total_variation < 0.7 * plain.costs.total_variation


def _yiq(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) @ color.RGB_TO_YIQ.T


def test_luminance_transfer_keeps_the_content_chroma(models, images):
    content, style, _ = images
    result = run(models, content, [(style, 1.0)], color_control="luminance", iterations=8)[1]
    height, width = result.image.shape[:2]
    expected = _yiq(np.asarray(content.resize((width, height), Image.Resampling.LANCZOS)))
    got = _yiq(result.image)
    assert np.abs(got[..., 1:] - expected[..., 1:]).mean() < 2.0          # I, Q kept (8-bit rounding, clipping)
    assert np.abs(got[..., 0] - expected[..., 0]).mean() > 5.0            # luminance was stylized


def test_match_style_colors_moves_the_style_statistics_to_the_content():
    rng = np.random.default_rng(0)
    source = rng.normal([200, 50, 30], [30, 10, 5], size=(20, 20, 3))
    reference = rng.normal([40, 120, 220], [5, 25, 40], size=(30, 10, 3))
    matched = color.match_colors(source, reference).reshape(-1, 3)
    assert np.allclose(matched.mean(0), reference.reshape(-1, 3).mean(0), atol=1e-6)
    assert np.allclose(np.cov(matched, rowvar=False), np.cov(reference.reshape(-1, 3), rowvar=False), atol=1e-2)


def test_match_style_colors_keeps_content_colours_in_the_result(models, images):
    content, style, _ = images
    # From random noise, the result's colours come from the style targets alone.
    plain = run(models, content, [(style, 1.0)], iterations=15, init="random")[1]
    kept = run(models, content, [(style, 1.0)], iterations=15, init="random", color_control="match_style_colors")[1]
    target = np.asarray(content, dtype=np.float64).reshape(-1, 3).mean(0)
    distance = lambda r: np.abs(r.image.reshape(-1, 3).mean(0) - target).sum()   # noqa: E731
    assert distance(kept) < distance(plain)


@pytest.mark.parametrize("mode", ["luminance", "match_style_colors"])
def test_colour_control_on_grayscale_inputs_has_no_nan(models, images, mode):
    content, style, _ = images
    gray_content, gray_style = content.convert("L").convert("RGB"), style.convert("L").convert("RGB")
    flat = Image.new("RGB", (40, 40), (128, 128, 128))                         # zero variance
    for c, s in ((gray_content, gray_style), (content, gray_style), (gray_content, flat)):
        progress, result = run(models, c, [(s, 1.0)], color_control=mode, iterations=3)
        assert all(np.isfinite([p.costs.total for p in progress]))
        assert np.isfinite(result.costs.total) and result.stop_reason == STOP_ITERATIONS


def test_non_finite_cost_ends_the_job_with_the_best_image(models, images, monkeypatch):
    # Requests cannot ask for such a weight any more (MAX_WEIGHT); the engine's non-finite guard stays.
    monkeypatch.setattr(settings_room, "MAX_WEIGHT", 1e39)
    content, style, _ = images
    progress, result = run(models, content, [(style, 1.0)], style_weight=1e38)   # J overflows fp32
    assert result.stop_reason == STOP_NON_FINITE
    assert result.image.std() > 5 and progress == []


def test_init_modes(models, images):
    content, style, _ = images
    first = lambda **kw: run(models, content, [(style, 1.0)], iterations=1, precision="fp32", **kw)[0][0].costs  # noqa: E731
    noisy, random = first(init="noisy_content"), first(init="random")
    assert first(init="content").content < 1e-6 * noisy.content           # session/replica rounding only
    assert random.content > noisy.content > 0
    given = first(init="image", init_image=style)
    assert given.style < noisy.style
    with pytest.raises(ValueError, match="init_image"):
        first(init="image")


def test_style_scale_changes_the_targets_and_refuses_too_small(models, images):
    content, style, _ = images
    full = run(models, content, [(style, 1.0)], iterations=1)[0][0].costs.style
    half = run(models, content, [(style, 1.0)], iterations=1, style_scale=0.5, max_side_px=64)[0][0].costs.style
    assert full != half
    with pytest.raises(ValueError, match="style_scale"):
        run(models, content, [(style.resize((100, 20)), 1.0)], style_scale=0.1)


def test_layer_choices_and_weights(models, images):
    content, style, _ = images
    base = run(models, content, [(style, 1.0)], iterations=1)[0][0].costs
    shallow = run(models, content, [(style, 1.0)], iterations=1, content_layers={"relu1_1": 1.0})[0][0].costs
    double = run(models, content, [(style, 1.0)], iterations=1,
                 style_layers={k: 0.4 for k in DEFAULT_STYLE_LAYERS})[0][0].costs
    assert shallow.content != base.content
    assert double.style == pytest.approx(2 * base.style, rel=1e-5)


def test_average_pooling_uses_the_replica_for_targets(models, images):
    content, style, _ = images
    img = to_tensor(resize_to_max_side(content, 32))
    avg = features(models, img, "avg")
    with torch.no_grad():
        expected = models.replica(img, pooling="avg")[-1]
    assert torch.equal(avg["relu5_1"], expected)
    assert not torch.allclose(avg["relu5_1"], models.features(img)["relu5_1"])
    progress, result = run(models, content, [(style, 1.0)], pooling="avg")
    assert result.costs.style < progress[0].costs.style


def test_coarse_to_fine_schedule_reaches_the_output_size(models, images):
    content, style, _ = images
    progress, result = run(models, content, [(style, 1.0)], max_side_px=64, iterations=8, scales=2,
                           start_side_px=32)
    assert [p.scale for p in progress] == [1] * 4 + [2] * 4
    assert progress[0].size == (32, 24) and progress[-1].size == (64, 48)
    assert [p.iteration for p in progress] == list(range(1, 9))
    assert result.image.shape == (48, 64, 3)
    assert engine.scale_sides(StyleTransferSettings(max_side_px=512, scales=3), 0.75) == [128, 256, 512]
    assert engine.split_iterations(200, 3) == [66, 66, 68]


def test_bf16_autocast_runs_with_fp32_costs(models, images):
    content, style, _ = images
    progress, bf16 = run(models, content, [(style, 1.0)], iterations=6, precision="bf16")
    assert np.isfinite(bf16.costs.total) and bf16.image.std() > 5
    assert bf16.costs.total < progress[0].costs.total


def test_previews_every_n_iterations(models, images):
    content, style, _ = images
    progress, _ = run(models, content, [(style, 1.0)], iterations=4, max_side_px=64, preview_every=2,
                      preview_max_side_px=24)
    with_preview = [p.iteration for p in progress if p.preview_png]
    assert with_preview == [2, 4]
    assert max(Image.open(io.BytesIO(progress[1].preview_png)).size) == 24


def test_convergence_tolerance_stops_early(models, images):
    content, style, _ = images
    progress, result = run(models, content, [(style, 1.0)], iterations=100, convergence_tolerance=1.0)
    assert result.stop_reason == STOP_CONVERGED
    assert result.iterations == engine.CONVERGENCE_WINDOW + 1 == len(progress)


def test_output_size_is_independent_of_input_sizes(models, images):
    content, style, second = images
    tall_style = style.resize((30, 90))
    _, result = run(models, content.resize((300, 100)), [(tall_style, 1.0), (second, 1.0)], max_side_px=48)
    assert result.image.shape == (16, 48, 3)


@pytest.mark.slow
def test_quality_on_real_images(models, shared):
    """tubingen like starry_night at 128 px with the defaults: the seed's style cost falls to at most 1/20 of
    the content image's own, and the content cost stays below the style image's."""
    content = Image.open(shared / "images" / "tubingen.jpg").convert("RGB")
    style = Image.open(shared / "images" / "starry_night.jpg").convert("RGB")
    settings = StyleTransferSettings(max_side_px=128)
    _, result = run(models, content, [(style, 1.0)], max_side_px=128, iterations=settings.iterations)
    height, width = result.image.shape[:2]
    content_t = to_tensor(resize_to_max_side(content, 128))
    targets = compute_targets(models, content_t, [(to_tensor(resize_to_max_side(style, 128)), 1.0)],
                              settings)
    as_content = evaluate(models.features(content_t), content_t * 255, targets, settings)
    style_t = to_tensor(style.resize((width, height), Image.Resampling.LANCZOS))
    as_style = evaluate(models.features(style_t), style_t * 255, targets, settings)
    assert result.costs.style <= as_content.style.item() / 20, (result.costs, as_content.style.item())
    assert result.costs.content < as_style.content.item(), (result.costs, as_style.content.item())


def test_a_large_output_refines_a_512_px_schedule():
    """Above 512 px the default schedule is the 512 px job's, then sides at most doubling, with few iterations
    each (three times as many at each side as at the next); scales=1 or start_side_px keep the plain schedule."""
    assert engine.refinement_sides(2048) == [1024, 2048]
    assert engine.refinement_sides(4096) == [1024, 2048, 4096]
    assert engine.refinement_sides(1500) == [876, 1500]
    plan = engine.schedule(StyleTransferSettings(max_side_px=2048), 0.75)
    assert plan == [(128, 56), (256, 56), (512, 56), (1024, 24), (2048, 8)]
    assert engine.schedule(StyleTransferSettings(max_side_px=4096), 0.75)[3:] == [(1024, 21), (2048, 7), (4096, 4)]
    assert sum(budget for _, budget in engine.schedule(StyleTransferSettings(max_side_px=4096), 0.75)) == 200
    assert engine.schedule(StyleTransferSettings(max_side_px=512), 0.75) == [(128, 66), (256, 66), (512, 68)]
    assert engine.schedule(StyleTransferSettings(max_side_px=2048, scales=1), 0.75) == [(2048, 200)]
    assert engine.schedule(StyleTransferSettings(max_side_px=2048, start_side_px=1024, scales=2), 0.75) == [
        (1024, 100), (2048, 100)]
    assert engine.schedule(StyleTransferSettings(max_side_px=2048, iterations=2), 0.75) == [(2048, 2)]


def test_refinement_scales_keep_the_structure_scales_pyramid_levels():
    """A refinement scale's pyramid is whole octaves down to 512 px, then the structure scale's own levels, so that
    its coarsest level is the structure scale's coarsest; other schedules keep pyramid_levels' half-octaves."""
    settings = StyleTransferSettings(max_side_px=4096)

    def sides(side: int, job: StyleTransferSettings = settings) -> list[int]:
        return [max(size) for size in level_sizes(round(side * 0.75), side, engine.pyramid_factors(job, side))]

    assert sides(128) == [128, 91, 64]
    assert sides(512) == [512, 362, 256]
    assert sides(1024) == [1024, 512, 362, 256]
    assert sides(2048) == [2048, 1024, 512, 362, 256]
    assert sides(4096) == [4096, 2048, 1024, 512, 362, 256]
    assert sides(1500, settings.replace(max_side_px=1500)) == [1500, 750, 512, 362, 256]
    assert sides(876, settings.replace(max_side_px=1500)) == [876, 512, 362, 256]
    assert sides(2048, settings.replace(scales=1)) == [2048, 1448, 1024]
    assert sides(2048, settings.replace(pyramid_levels=1)) == [2048]
    assert sides(2048, settings.replace(pyramid_levels=2)) == [2048, 1024, 512, 362]


def test_refinement_scales_weight_the_structure_levels_style():
    """At a refinement scale the structure scale's own levels carry STRUCTURE_STYLE_WEIGHT, the octaves above them 1;
    every level of every other scale or schedule 1."""
    settings = StyleTransferSettings(max_side_px=4096)
    weight = engine.STRUCTURE_STYLE_WEIGHT
    assert weight > 1.0
    assert engine.pyramid_style_weights(settings, 512) == [1.0, 1.0, 1.0]
    assert engine.pyramid_style_weights(settings, 1024) == [1.0, weight, weight, weight]
    assert engine.pyramid_style_weights(settings, 4096) == [1.0, 1.0, 1.0, weight, weight, weight]
    assert engine.pyramid_style_weights(settings.replace(pyramid_levels=2), 2048) == [1.0, 1.0, weight, weight]
    assert engine.pyramid_style_weights(settings.replace(pyramid_levels=1), 2048) == [1.0]
    assert engine.pyramid_style_weights(settings.replace(scales=1), 2048) == [1.0, 1.0, 1.0]
    assert engine.pyramid_style_weights(settings.replace(max_side_px=512), 512) == [1.0, 1.0, 1.0]


def test_a_refinement_scale_is_costed_on_its_octave_pyramid(models, images, monkeypatch):
    """A whole job whose output is above the structure side (lowered to 64 px here, so that it runs in seconds):
    its final scale's targets are at the pyramid_factors' sizes (the output, then the structure scale's levels),
    the structure scales keep their half-octaves, and the job delivers an image of the output's size."""
    content, style, _ = images
    monkeypatch.setattr(engine, "STRUCTURE_SIDE_PX", 64)
    seen: dict[int, list[tuple[int, int]]] = {}
    scale_inputs = engine._scale_inputs

    weights: dict[int, list[float]] = {}

    def recorded(job, side):
        pixels, targets = scale_inputs(job, side)
        seen[side] = [level.size for level in targets.levels]
        weights[side] = [level.style_weight for level in targets.levels]
        return pixels, targets

    monkeypatch.setattr(engine, "_scale_inputs", recorded)
    events, result = run(models, content, [(style, 1.0)], max_side_px=128, iterations=12)
    height = round(128 * content.height / content.width)
    assert max(seen) == 128 and len(seen) >= 2, seen
    assert [max(size) for size in seen[128]] == [128, 64, 45, 32], seen[128]
    assert seen[128][0] == (height, 128)
    assert weights[128] == [1.0] + [engine.STRUCTURE_STYLE_WEIGHT] * 3, weights
    for side in set(seen) - {128}:
        assert [max(size) for size in seen[side]] == [max(size) for size in level_sizes(
            *seen[side][0], half_octaves(3))], (side, seen[side])
        assert weights[side] == [1.0] * len(seen[side]), (side, weights[side])
    assert result.image.shape[:2] == (height, 128)
