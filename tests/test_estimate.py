"""The engine's estimate of the time to the Result (``Progress.remaining_ms``): the work model of one iteration per
scale (:func:`engine.iteration_work`) and the arithmetic of :func:`engine._remaining_ms`, given measured seconds
(no clock is read: the seconds are the test's)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nst_server import engine, tiling
from nst_server.images import fitted_size
from nst_server.settings import StyleTransferSettings
from nst_server.targets import half_octaves, level_sizes


def _pixels(sizes: list[tuple[int, int]]) -> int:
    return sum(h * w for h, w in sizes)


def test_an_untiled_scale_works_its_pyramid_levels_pixels():
    settings = StyleTransferSettings(max_side_px=512, precision="bf16")            # 3 half-octave levels
    levels = level_sizes(384, 512, half_octaves(3))
    assert len(levels) == 3
    assert engine.iteration_work(384, 512, 512, settings, 512 * 384) == _pixels(levels)
    single = settings.replace(pyramid_levels=1)
    assert engine.iteration_work(384, 512, 512, single, 512 * 384) == 512 * 384


def test_a_tiled_level_counts_its_halos_and_its_forward_only_pass():
    """2048 x 1536 px, the output's own scale of a 2048 px job: its 2048 and 1024 px levels are over the pass limit
    (tiled: the tiles' pixels with halos, passed forward once more), the structure levels are passed whole."""
    settings = StyleTransferSettings(max_side_px=2048, precision="bf16")
    levels = level_sizes(1536, 2048, engine.pyramid_factors(settings, 2048))
    limit = tiling.pass_pixel_limit(2048 * 1536, 2048 * 1536, "bf16")
    tiled = [size for size in levels if tiling.needs_tiles(*size, limit)]
    whole = [size for size in levels if not tiling.needs_tiles(*size, limit)]
    assert tiled == levels[:2] and len(whole) == 3
    passed = sum(tiling.input_pixels(t) for h, w in tiled for t in tiling.tile_grid(h, w, max_pixels=limit))
    assert passed > _pixels(tiled)                                                    # the halos
    work = engine.iteration_work(1536, 2048, 2048, settings, 2048 * 1536)
    assert work == pytest.approx(passed * (1 + engine.FORWARD_SHARE) + _pixels(whole))
    # per output pixel, the tiled top scale works harder than the 1024 px scale before it (passed whole there)
    coarser = engine.iteration_work(768, 1024, 1024, settings, 2048 * 1536)
    assert coarser == _pixels(level_sizes(768, 1024, engine.pyramid_factors(settings, 1024)))
    assert work / (2048 * 1536) > 1.5 * coarser / (1024 * 768)


def _job(plan: list[tuple[int, int]], settings: StyleTransferSettings, aspect: float = 0.75) -> SimpleNamespace:
    """What :func:`engine._remaining_ms` reads of a job: its plan, each scale's work, device and precision."""
    output = fitted_size(1000, round(1000 * aspect), plan[-1][0])
    sizes = [fitted_size(1000, round(1000 * aspect), side) for side, _ in plan]
    work = [engine.iteration_work(h, w, side, settings, output[0] * output[1])
            for (w, h), (side, _) in zip(sizes, plan)]
    return SimpleNamespace(plan=[(w * h, budget) for (w, h), (_, budget) in zip(sizes, plan)], work=work,
                           models=SimpleNamespace(device=SimpleNamespace(type="cpu")), settings=settings)


@pytest.fixture
def no_speed(monkeypatch):
    monkeypatch.setattr(engine, "_SPEED", {})


def test_the_last_iteration_leaves_the_delivery(no_speed):
    """After the final scale's last iteration the Result is still a costing of the last step's image and the
    session's pass over the delivered one away: the estimate is that many iterations, not 0."""
    settings = StyleTransferSettings(max_side_px=512, precision="bf16")
    job = _job([(512, 10)], settings)
    scale = SimpleNamespace(index=1, budget=10)
    assert engine._remaining_ms(job, scale, 10, 5.0) == pytest.approx(1000.0 * engine.DELIVERY_ITERATIONS * 0.5)
    assert engine._remaining_ms(job, scale, 4, 2.0) == pytest.approx(1000.0 * (6 + engine.DELIVERY_ITERATIONS) * 0.5)
    assert engine._remaining_ms(job, scale, 0, 0.0) == 0.0                          # nothing measured yet


def test_later_scales_are_costed_by_their_work_and_set_up(no_speed):
    """At the 512 px scale of a 2048 px job, 0.5 s an iteration: the 1024 and 2048 px scales' iterations and set-up
    at the speed per unit of work measured here, then the delivery at the 2048 px scale's."""
    settings = StyleTransferSettings(max_side_px=2048, precision="bf16")
    job = _job([(256, 56), (512, 56), (1024, 24), (2048, 8)], settings)
    per_iteration = 0.5
    per_work = per_iteration / job.work[1]
    scale = SimpleNamespace(index=2, budget=56)
    expected = (6 * per_iteration + (24 + engine.SCALE_SETUP_ITERATIONS) * per_work * job.work[2]
                + (8 + engine.SCALE_SETUP_ITERATIONS) * per_work * job.work[3]
                + engine.DELIVERY_ITERATIONS * per_work * job.work[3])
    assert engine._remaining_ms(job, scale, 50, 50 * per_iteration) == pytest.approx(1000.0 * expected)
    # the 2048 px scale: more work per output pixel than the 1024 px one (tiles), so more than 4x its time
    assert job.work[3] / job.work[2] > 5.0
    # the speed per unit of work is kept for this process's later jobs, from scales of at least SPEED_MIN_PIXELS
    assert engine._SPEED[("cpu", "bf16")] == pytest.approx(per_work)


def test_a_small_scale_never_makes_a_later_one_cheaper_than_its_own_iterations(no_speed):
    """At 64 px an iteration's time is mostly fixed costs: a later scale is costed at least as many of them."""
    settings = StyleTransferSettings(max_side_px=128, precision="bf16")
    job = _job([(64, 10), (128, 10)], settings)
    scale = SimpleNamespace(index=1, budget=10)
    per_iteration = 0.2
    remaining = engine._remaining_ms(job, scale, 10, 10 * per_iteration)
    assert engine._SPEED == {}                                   # 64 px is under SPEED_MIN_PIXELS: not kept
    per_work = per_iteration / job.work[0]
    later = max(per_iteration, per_work * job.work[1])
    assert remaining == pytest.approx(1000.0 * (later * (10 + engine.SCALE_SETUP_ITERATIONS)
                                                + engine.DELIVERY_ITERATIONS * later))
