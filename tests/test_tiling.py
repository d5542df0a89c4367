"""Tiled replica passes (nst_server.tiling): the features, the costs and the gradient of a large image computed
tile by tile equal the whole image's (the issue's bound: relative error <= 1e-3 in fp32), on real pictures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from nst_export.vgg import OUTPUT_LAYERS
from nst_server import costs, tiling
from nst_server import objective as objective_module
from nst_server.images import to_tensor
from nst_server.objective import Objective, batch_pass, tiled_costs
from nst_server.settings import StyleTransferSettings
from nst_server.targets import compute_targets, pyramid_sizes

SAMPLES = Path(__file__).resolve().parent.parent / "tools" / "nst_tools" / "samples"


def _picture(name: str, width: int, height: int) -> torch.Tensor:
    return to_tensor(Image.open(SAMPLES / name).convert("RGB").resize((width, height), Image.Resampling.LANCZOS))


def test_the_grid_covers_the_image_once_with_aligned_halos():
    tiles = tiling.tile_grid(1000, 770, 256)
    covered = torch.zeros(1000, 770, dtype=torch.int32)
    for tile in tiles:
        y0, y1, x0, x1 = tile.own
        covered[y0:y1, x0:x1] += 1
        iy0, iy1, ix0, ix1 = tile.input
        assert iy0 % tiling.ALIGN_PX == 0 and ix0 % tiling.ALIGN_PX == 0
        assert iy0 == max(0, y0 - tiling.HALO_PX) and iy1 == min(1000, y1 + tiling.HALO_PX)
    assert bool((covered == 1).all())
    with pytest.raises(ValueError, match="multiple of 16"):
        tiling.tile_grid(100, 100, 40)


@pytest.mark.parametrize("height, width", [(1536, 2048), (3072, 4096), (700, 3000), (768, 1024)])
def test_the_budget_grid_keeps_every_pass_within_budget_and_covers_once(height, width):
    budget = 1024 * 768
    tiles = tiling.tile_grid(height, width, max_pixels=budget)
    covered = torch.zeros(height, width, dtype=torch.int8)
    for tile in tiles:
        y0, y1, x0, x1 = tile.own
        covered[y0:y1, x0:x1] += 1
        iy0, iy1, ix0, ix1 = tile.input
        assert (iy1 - iy0) * (ix1 - ix0) <= budget
        assert iy0 % tiling.ALIGN_PX == 0 and ix0 % tiling.ALIGN_PX == 0
    assert bool((covered == 1).all())
    if height * width <= budget:
        assert len(tiles) == 1
    passed = sum((t.input[1] - t.input[0]) * (t.input[3] - t.input[2]) for t in tiles)
    assert passed < 1.5 * height * width             # the halo's overhead, 1.28x at 2048 x 1536


def test_tiled_features_equal_the_whole_images(models):
    image = _picture("van_gogh_village_street_in_auvers.jpg", 410, 300)
    with torch.no_grad():
        whole = dict(zip(OUTPUT_LAYERS, models.replica(image)))
    passed = tiling.tiled_features(models.replica, image, gram_layers=OUTPUT_LAYERS, keep_layers=OUTPUT_LAYERS,
                                   tiles=tiling.tile_grid(300, 410, 96))
    for layer in OUTPUT_LAYERS:
        gram = costs.gram_matrix(whole[layer])
        assert float((passed.grams[layer] - gram).abs().max() / gram.abs().max()) < 1e-5, layer
        # Relative to the layer's largest value, as for the Gram matrices: a tile's convolutions may sum in another
        # order than the whole image's (oneDNN picks its blocking by shape and thread count), which moves a ReLU
        # output near zero by the rounding of its pre-activation's scale, not of its own (exact here alone; 1e-5
        # elementwise failed in the whole suite on an AVX512_BF16 EPYC). A wrong halo is off by O(1) of it.
        difference = (passed.kept[layer] - whole[layer]).abs().max() / whole[layer].abs().max()
        assert float(difference) < 1e-5, (layer, float(difference))


def _objective(models, precision: str, size=(300, 400)) -> tuple[Objective, torch.Tensor]:
    settings = StyleTransferSettings(max_side_px=max(size), precision=precision, pyramid_levels=3)
    height, width = size
    content = _picture("van_gogh_village_street_in_auvers.jpg", width, height)
    style = _picture("hokusai_great_wave.jpg", 360, 240)
    coarser = [(_picture("van_gogh_village_street_in_auvers.jpg", w, h), [(style, 1.0)])
               for h, w in pyramid_sizes(height, width, settings.pyramid_levels)[1:]]
    targets = compute_targets(models, content, [(style, 1.0)], settings, coarser)
    key = ((1, 3, height, width), settings.pooling, precision)
    generator = torch.Generator().manual_seed(3)
    pixels = (content * 255.0 * 0.8 + torch.rand(content.shape, generator=generator) * 40.0).clamp(0, 255)
    return Objective(targets, settings, batch_pass(models), key), pixels.contiguous()


@pytest.mark.parametrize("hooks", [True, False])
@pytest.mark.parametrize("precision, bound", [("fp32", 1e-3), ("bf16", 1e-2)])
def test_the_tiled_gradient_equals_the_whole_images(models, monkeypatch, precision, bound, hooks):
    """fp32: the issue's bound (measured: 2.7e-7). bf16: both round the activations to bf16, but a tile's
    products sum in another order, so the bound is bf16's own noise (measured: 1.1e-3). Both ways of adding a
    tile's own-region gradient (hooks on the features, or autograd through cropped features)."""
    monkeypatch.setattr(tiling, "OWN_REGION_HOOKS", hooks)
    objective, start = _objective(models, precision)
    whole = start.clone().requires_grad_(True)
    assert not objective.tiled
    whole_terms = objective.costs_and_gradient(whole)
    monkeypatch.setattr(tiling, "MAX_PASS_PIXELS", 288 * 288)          # own tiles of 128 px: 12 at full size
    assert objective.tiled
    tiled = start.clone().requires_grad_(True)
    tiled_terms = objective.costs_and_gradient(tiled)
    error = float((tiled.grad - whole.grad).norm() / whole.grad.norm())
    print(f"{precision}, hooks {hooks}: relative error of the tiled gradient {error:.2e}")
    assert error <= bound
    for name in ("content", "style", "total_variation", "total"):
        assert float(getattr(tiled_terms, name)) == pytest.approx(float(getattr(whole_terms, name)), rel=bound)
    forward_only = objective.total(start)
    assert float(forward_only) == pytest.approx(float(whole_terms.total), rel=bound)


def test_a_levels_style_weight_scales_its_style_term_whole_and_tiled(models, monkeypatch):
    """A level's ``style_weight`` multiplies its J_style in J as dividing its normaliser would, in the whole image's
    objective and in the tiled one's (engine.STRUCTURE_STYLE_WEIGHT at a large output's structure levels)."""
    objective, start = _objective(models, "fp32")
    level = objective.targets.levels[1]
    unweighted = float(objective.total(start))
    level.style_weight = 2.0
    whole = start.clone().requires_grad_(True)
    whole_terms = objective.costs_and_gradient(whole)
    assert float(whole_terms.total) > unweighted * 1.01
    monkeypatch.setattr(tiling, "MAX_PASS_PIXELS", 288 * 288)
    assert objective.tiled
    tiled = start.clone().requires_grad_(True)
    tiled_terms = objective.costs_and_gradient(tiled)
    assert float(tiled_terms.total) == pytest.approx(float(whole_terms.total), rel=1e-4)
    assert float((tiled.grad - whole.grad).norm() / whole.grad.norm()) <= 1e-3
    level.style_weight, level.style_norm = 1.0, level.style_norm / 2.0
    assert float(objective.total(start)) == pytest.approx(float(whole_terms.total), rel=1e-4)      # tiled
    monkeypatch.undo()
    assert not objective.tiled
    assert float(objective.total(start)) == pytest.approx(float(whole_terms.total), rel=1e-5)      # whole


@pytest.mark.parametrize("keep_last", [True, False])
def test_a_tiled_scale_passes_its_coarser_levels_whole_and_once(models, monkeypatch, keep_last):
    """The levels within the pass limit go forward and backward once (no forward-only first pass), the tiled level
    twice per tile, but for the first pass's last tile, kept for the backward (objective.KEEP_LAST_TILE); the
    gradient is still the whole image's."""
    monkeypatch.setattr(objective_module, "KEEP_LAST_TILE", keep_last)
    objective, start = _objective(models, "fp32")
    whole = start.clone().requires_grad_(True)
    objective.costs_and_gradient(whole)
    monkeypatch.setattr(tiling, "MAX_PASS_PIXELS", 288 * 288)
    passes = []
    objective.replica_pass = lambda images, key, run=batch_pass(models): passes.append(images.shape[2:]) or run(
        images, key)
    tiled = start.clone().requires_grad_(True)
    objective.costs_and_gradient(tiled)
    sizes = [level.size for level in objective.targets.levels]
    tiles = len(tiling.tile_grid(*sizes[0]))
    assert tiles > 1
    assert sum(1 for shape in passes if tuple(shape) in sizes[1:]) == len(sizes) - 1
    assert len(passes) == 2 * tiles - keep_last + len(sizes) - 1
    assert float((tiled.grad - whole.grad).norm() / whole.grad.norm()) <= 1e-3


def test_a_larger_jobs_coarser_scales_may_pass_more_pixels():
    """pass_pixel_limit: MAX_PASS_PIXELS at the output's own scale; more at a coarser scale of a larger output
    (the room its estimate holds for the output's pixels), more in bf16 than in fp32; never less."""
    output, coarse = 2048 * 1536, 1024 * 768
    assert tiling.pass_pixel_limit(output, output, "bf16") == tiling.MAX_PASS_PIXELS
    assert tiling.pass_pixel_limit(output, 4096 * 3072, "bf16") > tiling.MAX_PASS_PIXELS
    assert tiling.pass_pixel_limit(coarse, output, "bf16") >= coarse > tiling.MAX_PASS_PIXELS   # runs whole
    assert tiling.pass_pixel_limit(coarse, output, "fp32") < tiling.pass_pixel_limit(coarse, output, "bf16")
    assert tiling.pass_pixel_limit(coarse, output, "fp16") == tiling.pass_pixel_limit(coarse, output, "fp32")
    assert tiling.pass_pixel_limit(output, coarse, "fp32") == tiling.MAX_PASS_PIXELS             # never below
    assert len(tiling.tile_grid(1536, 2048, max_pixels=tiling.pass_pixel_limit(output, 4096 * 3072, "bf16"))) == 2


def test_a_job_passes_a_coarser_scale_whole_when_its_budget_holds_it(models, monkeypatch):
    """A job's coarser scale above MAX_PASS_PIXELS but within its pass_pixel_limit runs untiled; its final scale,
    above the limit, in tiles."""
    monkeypatch.setattr(tiling, "MAX_PASS_PIXELS", 100 * 100)
    tiled_sizes = []
    backward = tiling.tiled_backward

    def spy(forward, image, *args, **kwargs):
        tiled_sizes.append(tuple(image.shape[2:]))
        return backward(forward, image, *args, **kwargs)

    monkeypatch.setattr("nst_server.objective.tiled_backward", spy)
    settings = StyleTransferSettings(max_side_px=256, scales=2, iterations=2, precision="fp32", pyramid_levels=1)
    events = _job(models, settings)
    sizes = {(p.size[1], p.size[0]) for p in events[:-1]}                                   # (H, W)
    coarse, final = sorted(sizes, key=lambda size: size[0] * size[1])
    assert coarse[0] * coarse[1] > tiling.MAX_PASS_PIXELS                 # would have been tiled before
    assert set(tiled_sizes) == {final}


@pytest.mark.parametrize("grid_name", ["tile_grid", "session_grid"])
def test_tiled_costs_through_the_session_equal_evaluate(models, monkeypatch, grid_name):
    """On the backward pass's tiles, or on the session's larger tiles (:func:`tiling.session_grid`: the targets and
    the delivered costs): the same costs."""
    objective, start = _objective(models, "fp32")
    expected = objective.total(start)
    monkeypatch.setattr(tiling, "MAX_PASS_PIXELS", 240 * 240)
    grid = getattr(tiling, grid_name)
    assert 1 < len(grid(300, 400)) <= len(tiling.tile_grid(300, 400))
    terms = tiled_costs(models.features, start, objective.targets, objective.settings, grid)
    assert float(terms.total) == pytest.approx(float(expected), rel=1e-4)


def test_the_gram_of_a_map_is_the_same_in_chunks(monkeypatch):
    feature = torch.rand(1, 64, 50, 30, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = tiling.own_gram(feature)
    monkeypatch.setattr(tiling, "GRAM_CHUNK_POSITIONS", 100)             # 3 rows of 30 positions at a time
    chunked = tiling.own_gram(feature.contiguous(memory_format=torch.channels_last))
    expected = torch.einsum("bchw,bdhw->bcd", feature.double(), feature.double())
    assert whole.dtype == chunked.dtype == torch.float32 and whole.shape == (1, 64, 64)
    assert torch.allclose(chunked.double(), expected, rtol=1e-5) and torch.allclose(whole.double(), expected, rtol=1e-5)
    empty = tiling.own_gram(feature[:, :, :0])
    assert empty.shape == (1, 64, 64) and not empty.any()


def _job(models, settings: StyleTransferSettings):
    from nst_server.engine import stylize
    from nst_server.events import JobInputs, Result
    content = Image.open(SAMPLES / "van_gogh_village_street_in_auvers.jpg").convert("RGB")
    style = Image.open(SAMPLES / "hokusai_great_wave.jpg").convert("RGB")
    events = list(stylize(models, JobInputs(content=content, styles=[(style, 1.0)]), settings))
    assert isinstance(events[-1], Result)
    return events


def test_a_tiled_job_delivers_the_untiled_jobs_picture_without_seams(models, monkeypatch):
    """The whole path (targets, optimisation, delivered costs) with tiles at the final scale: the same picture
    as without tiles, to a level or two of 255 after a few L-BFGS steps, and no seam along the tiles' edges."""
    settings = StyleTransferSettings(max_side_px=256, scales=1, iterations=4, precision="fp32", pyramid_levels=2)
    whole = _job(models, settings)[-1]
    monkeypatch.setattr(tiling, "MAX_PASS_PIXELS", 200 * 200)
    height, width = whole.image.shape[:2]
    tiles = tiling.tile_grid(height, width)
    assert len(tiles) > 1
    tiled = _job(models, settings)[-1]
    difference = (torch.from_numpy(tiled.image).float() - torch.from_numpy(whole.image).float()).abs()
    assert float(difference.max()) <= 3.0 and float(difference.mean()) < 0.05
    assert tiled.costs.total == pytest.approx(whole.costs.total, rel=1e-3)
    # a seam would be a step along the tiles' inner edges: differences there are no larger than elsewhere
    image = torch.from_numpy(tiled.image).float()
    steps = (image[1:] - image[:-1]).abs().mean(dim=(1, 2))                   # (H - 1,) row-to-row change
    edges = sorted({tile.own[0] for tile in tiles} - {0})
    assert edges and all(float(steps[edge - 1]) < 3 * float(steps.median()) for edge in edges)


def test_progress_reports_the_schedule_and_a_time_estimate(models):
    events = _job(models, StyleTransferSettings(max_side_px=128, scales=3, iterations=6))
    progress = events[:-1]
    assert [p.scale for p in progress] == [1, 1, 2, 2, 3, 3]
    assert {p.scales for p in progress} == {3}
    assert all(p.remaining_ms > 0 for p in progress)        # the last: the delivered image's costs still to come
