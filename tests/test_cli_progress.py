"""``nst stylize``'s progress bar: the scale it is on (``scale k/n WxH``) and the server's estimate of the time left
(``Progress.remaining_ms``), against a real server running a three-scale job."""

from __future__ import annotations

import re

from nst_client import cli
from nst_client.cli import BAR_FORMAT_SERVER_ESTIMATE, main as client_main, scale_label, time_left
from nst_proto.v1 import style_transfer_pb2 as pb


def test_scale_label_with_and_without_the_schedules_length():
    assert scale_label(pb.Progress(scale=2, scales=3, width_px=1024, height_px=768)) == "scale 2/3 1024x768"
    # A server that does not fill scales (0): the scale alone.
    assert scale_label(pb.Progress(scale=2, scales=0, width_px=1024, height_px=768)) == "scale 2 1024x768"
    # One scale, or fewer than the scale shown (a server that counted none sent 1): no length.
    assert scale_label(pb.Progress(scale=1, scales=1, width_px=64, height_px=48)) == "scale 1 64x48"
    assert scale_label(pb.Progress(scale=2, scales=1, width_px=64, height_px=48)) == "scale 2 64x48"
    assert scale_label(pb.Progress(scale=0, width_px=64, height_px=48)) == "64x48"
    assert scale_label(pb.Progress()) == ""


def test_time_left_is_the_servers_estimate_or_nothing():
    assert time_left(pb.Progress(remaining_ms=83_000)) == "01:23"
    assert time_left(pb.Progress(remaining_ms=3_723_000)) == "1:02:03"
    assert time_left(pb.Progress(remaining_ms=0)) == ""           # unknown: nothing shown
    assert "{remaining}" not in BAR_FORMAT_SERVER_ESTIMATE and "{postfix}" in BAR_FORMAT_SERVER_ESTIMATE


def test_stylize_shows_each_scale_of_a_three_scale_job(server, small_images, tmp_path, capsys):
    """A 64 px job of three scales (24, 39, 64 px: --start-side-px 24) shows scale 1, 2 and 3 with the size being
    optimised, each as soon as it starts; with the schedule's length (/3) where the server reports it."""
    content, style = tmp_path / "content.png", tmp_path / "style.png"
    content.write_bytes(small_images[0])
    style.write_bytes(small_images[1])
    out = tmp_path / "out.png"
    code = client_main(["stylize", str(content), str(style), "-o", str(out), "--server", server, "--size", "64",
                        "--scales", "3", "--start-side-px", "24", "--iterations", "6", "--pyramid-levels", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.is_file()
    shown = re.findall(r"scale (\d)(/\d+)? (\d+)x(\d+)", captured.err)
    assert [int(k) for k in dict.fromkeys(k for k, _, _, _ in shown)] == [1, 2, 3], captured.err
    sizes = {int(k): (int(w), int(h)) for k, _, w, h in shown}
    assert sizes[1][0] < sizes[2][0] < sizes[3][0] == 64
    # "/3" where the server reports the schedule's length, nothing where it does not (0, or 1 from a server that
    # did not count the scales)
    assert {of for _, of, _, _ in shown} <= {"", "/3"}, captured.err
    assert "left=" not in captured.err or re.search(r"left=\d+:\d\d", captured.err)


def test_quiet_stylize_shows_no_scale(server, small_images, tmp_path, capsys):
    content, style = tmp_path / "content.png", tmp_path / "style.png"
    content.write_bytes(small_images[0])
    style.write_bytes(small_images[1])
    code = client_main(["stylize", str(content), str(style), "-o", str(tmp_path / "out.png"), "--server", server,
                        "--size", "32", "--iterations", "2", "--scales", "1", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0 and "scale" not in captured.err


class _FakeClient:
    """Stands in for NSTClient: ``stylize`` hands ``on_progress`` a three-scale job's Progress messages, with the
    server's estimate of the time left, and returns a result (what a server that fills scales and remaining_ms
    sends)."""

    result_png = b""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def stylize(self, content, style, options, on_progress=None, **kwargs):
        from nst_client.client import StylizeResult
        sizes = [(256, 192), (512, 384), (1024, 768)]
        messages = [pb.Progress(iteration=i + 1, scale=i // 2 + 1, scales=3, width_px=sizes[i // 2][0],
                                height_px=sizes[i // 2][1], remaining_ms=(6 - i) * 61_000.0,
                                costs=pb.Costs(content=1.0, style=2.0, total=3.0))
                    for i in range(6)]
        for message in messages:
            on_progress(message)
        return StylizeResult(job_id="j", image_png=_FakeClient.result_png, width_px=64, height_px=48,
                             content_cost=1.0, style_cost=2.0, total_cost=3.0, iterations=6, best_iteration=6,
                             stop_reason="iterations_done", elapsed_ms=10.0, progress=messages)


def test_stylize_shows_scale_k_of_n_and_the_servers_time_left(monkeypatch, small_images, tmp_path, capsys):
    """With scales and remaining_ms filled: ``scale 1/3 256x192`` … ``scale 3/3 1024x768``, the server's estimate
    as ``left=MM:SS``, and tqdm's own estimate from the rate (``<MM:SS``) no longer shown."""
    monkeypatch.setattr(_FakeClient, "result_png", small_images[0])
    monkeypatch.setattr(cli, "NSTClient", _FakeClient)
    content = tmp_path / "content.png"
    content.write_bytes(small_images[0])
    code = client_main(["stylize", str(content), str(content), "-o", str(tmp_path / "out.png"), "--iterations", "6"])
    err = capsys.readouterr().err
    assert code == 0, err
    for shown in ("scale 1/3 256x192", "scale 2/3 512x384", "scale 3/3 1024x768"):
        assert shown in err
    assert re.search(r"left=0[56]:0[56]", err), err      # 6 x 61 s or 5 x 61 s at the first refresh
    last = err.rsplit("stylize scale 3/3", 1)[1]
    assert "left=" in last and not re.search(r"<\d", last), last
