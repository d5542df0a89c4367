"""Checkpoints of the engine: a job resumed from a checkpoint goes on numbering its iterations and delivers a valid
result; checkpointing alone changes nothing. Jobs are tiny (48-64 px, 8 iterations)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from nst_server import engine
from nst_server.errors import CheckpointMismatch
from nst_server.events import STOP_CANCELLED, STOP_ITERATIONS, Checkpoint, JobInputs, Progress, Result
from nst_server.settings import StyleTransferSettings

#: Two scales (4 + 4 iterations at 48 and 64 px), fp32, so that a resume crosses a scale and lands in the final one.
TWO_SCALES = {"max_side_px": 64, "iterations": 8, "scales": 2, "start_side_px": 48, "pyramid_levels": 1,
              "precision": "fp32", "seed": 3}


def _inputs(small_images) -> JobInputs:
    content, style = (Image.open(io.BytesIO(data)).convert("RGB") for data in small_images)
    return JobInputs(content=content, styles=[(style, 1.0)])


def _run(models, small_images, settings: dict, **kwargs) -> list:
    return list(engine.stylize(models, _inputs(small_images), StyleTransferSettings(**settings), **kwargs))


def _kinds(events: list, kind: type) -> list:
    return [event for event in events if isinstance(event, kind)]


def test_checkpoints_change_nothing_and_a_resume_goes_on_numbering_to_a_valid_result(models, small_images):
    plain = _run(models, small_images, TWO_SCALES)
    every = _run(models, small_images, TWO_SCALES, checkpoint_now=lambda: True)      # one after every iteration
    checkpoints = _kinds(every, Checkpoint)
    assert [c.iteration for c in checkpoints] == list(range(1, 9))
    assert [c.scale for c in checkpoints] == [1, 1, 1, 1, 2, 2, 2, 2]
    # Checkpointing only copies: the same Progress costs and the same bytes as the job without it.
    assert [p.costs for p in _kinds(every, Progress)] == [p.costs for p in _kinds(plain, Progress)]
    assert every[-1].png == plain[-1].png
    first = checkpoints[2]                                            # after iteration 3, at the 48 px scale
    assert first.pixels.shape == (1, 3, 36, 48) and first.pixels.dtype == np.float32
    assert first.best_pixels is None and first.history and len(first.history) == 3
    final = checkpoints[5]                                            # after iteration 6, at the final 64 px scale
    assert final.pixels.shape == (1, 3, 48, 64) and final.best_pixels.shape == (1, 3, 48, 64)
    assert math.isfinite(final.best_total) and 4 <= final.best_iteration <= 6
    for checkpoint in (first, final):
        resumed = _run(models, small_images, TWO_SCALES, resume=checkpoint)
        progress, result = _kinds(resumed, Progress), resumed[-1]
        assert [p.iteration for p in progress] == list(range(checkpoint.iteration + 1, 9))
        assert [p.scale for p in progress] == [1 if i <= 4 else 2 for i in range(checkpoint.iteration + 1, 9)]
        assert progress[0].elapsed_ms >= checkpoint.elapsed_ms                   # the job's time goes on
        assert isinstance(result, Result) and result.stop_reason == STOP_ITERATIONS and result.iterations == 8
        assert Image.open(io.BytesIO(result.png)).size == (64, 48) and result.image.shape == (48, 64, 3)
        assert result.best_iteration >= (checkpoint.best_iteration if checkpoint.best_pixels is not None else 4)
        assert all(math.isfinite(v) for v in (result.costs.content, result.costs.style, result.costs.total))
        # As good as the uninterrupted job (the optimiser's state is rebuilt, so not the same bytes).
        assert result.costs.total < 1.5 * plain[-1].costs.total
        print(f"resumed after iteration {checkpoint.iteration}: J {result.costs.total:.4g}, uninterrupted "
              f"{plain[-1].costs.total:.4g}")


def test_a_stopped_job_checkpoints_the_state_it_stopped_in_and_the_timer_paces_them(models, small_images):
    polls = []

    def stop_after_five() -> bool:
        polls.append(1)
        return len(polls) > 5
    events = _run(models, small_images, TWO_SCALES, should_stop=stop_after_five, checkpoint_s=3600.0)
    assert [type(e).__name__ for e in events[-2:]] == ["Checkpoint", "Result"]
    assert events[-2].iteration == 5 and events[-2].scale == 2 and events[-1].stop_reason == STOP_CANCELLED
    assert len(_kinds(events, Checkpoint)) == 1                  # the hour never passed: only the stop's
    resumed = _run(models, small_images, TWO_SCALES, resume=events[-2])
    assert [p.iteration for p in _kinds(resumed, Progress)] == [6, 7, 8] and resumed[-1].iterations == 8
    paced = _run(models, small_images, TWO_SCALES, checkpoint_s=1e-6)
    assert [c.iteration for c in _kinds(paced, Checkpoint)] == list(range(1, 9))
    assert not _kinds(_run(models, small_images, TWO_SCALES, should_stop=lambda: False), Checkpoint)


def test_adam_resumes_and_a_checkpoint_of_another_schedule_is_refused_before_any_iteration(models, small_images):
    adam = {**TWO_SCALES, "optimizer": "adam", "learning_rate": 4.0}
    checkpoint = _kinds(_run(models, small_images, adam, checkpoint_s=1e-6), Checkpoint)[4]
    resumed = _run(models, small_images, adam, resume=checkpoint)
    assert [p.iteration for p in _kinds(resumed, Progress)] == [6, 7, 8] and resumed[-1].iterations == 8
    for other, message in (({**adam, "scales": 1}, "scales"), ({**adam, "iterations": 4}, "outside its scale"),
                           ({**adam, "max_side_px": 56}, "image is")):
        stream = engine.stylize(models, _inputs(small_images), StyleTransferSettings(**other), resume=checkpoint)
        with pytest.raises(CheckpointMismatch, match=message):
            next(stream)
