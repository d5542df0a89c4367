"""``nst bench`` against a real server: the JSON and CSV fields, the PNG plot, the percentiles."""

import csv
import json
import math

import pytest

from nst_client.bench import CSV_COLUMNS, percentiles, synthetic_pair
from nst_client.cli import main as client_main


def test_percentiles_match_numpy():
    np = pytest.importorskip("numpy")
    values = [0.3, 1.2, 0.7, 2.5, 0.9, 1.1, 4.0]
    stats = percentiles(values)
    for p in (50, 90, 95, 99):
        assert stats[f"p{p}"] == pytest.approx(np.percentile(values, p))
    assert percentiles([2.0])["p99"] == 2.0
    assert math.isnan(percentiles([])["p50"])


def test_bench_sweep_writes_json_csv_and_png(server, tmp_path):
    pytest.importorskip("matplotlib")
    out_json, out_csv, out_png = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    code = client_main(["bench", "--server", server, "--size", "32", "--iterations", "2",
                        "--concurrency", "1,2", "--jobs-per-level", "2", "--warmup-jobs", "1",
                        "--output-json", str(out_json), "--output-csv", str(out_csv), "--plot", str(out_png)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["settings"]["max_side_px"] == 32 and report["settings"]["iterations"] == 2
    assert "CPUExecutionProvider" in report["model"]["execution_providers"]
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["completed"] == level["jobs"] == 2 and level["errors"] == {}
        assert level["jobs_per_s"] > 0
        assert level["iterations_per_s"] == pytest.approx(2 * level["jobs_per_s"])
        first, result = level["time_to_first_progress_s"], level["time_to_result_s"]
        for key in ("p50", "p90", "p95", "p99"):
            assert 0 < first[key] <= result[key] <= level["wall_s"]
        assert first["p50"] <= first["p90"] <= first["p95"] <= first["p99"]
        assert len(level["timings"]) == 2
    rows = list(csv.reader(out_csv.open()))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 3
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_pair_is_two_pngs():
    content, style = synthetic_pair(64)
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(content)).size == (64, 48)
    assert Image.open(io.BytesIO(style)).size == (64, 64)
