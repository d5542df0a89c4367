"""The main job (nst-demo) end to end, small: export when missing, server, CLI, result, server stopped; the
sample paintings are where the demo looks for them and the result takes on the painting's colours."""

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nst_tools.demo import SAMPLE_CONTENT, SAMPLE_PAINTINGS, sample_image, sample_painting, side_by_side


def colour_histogram(path, bins: int = 6) -> np.ndarray:
    """Normalised 3-D RGB histogram (bins^3 cells, sums to 1) of the image at ``path``."""
    rgb = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(np.int64) * bins // 256
    cells = np.bincount((rgb[:, 0] * bins + rgb[:, 1]) * bins + rgb[:, 2], minlength=bins ** 3)
    return cells / cells.sum()


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Histogram intersection, 0 (no colour in common) .. 1 (the same distribution)."""
    return float(np.minimum(a, b).sum())


@pytest.mark.parametrize("name", sorted(SAMPLE_PAINTINGS))
def test_sample_paintings_ship_with_the_package(name):
    with Image.open(sample_painting(name)) as painting:
        assert painting.format == "JPEG" and painting.mode == "RGB"
        assert max(painting.size) == 512
    readme = (sample_painting(name).parent / "README.md").read_text()
    assert SAMPLE_PAINTINGS[name] in readme and "public domain" in readme


@pytest.mark.parametrize("args, message", [
    (["--style", "mona_lisa"], "--style 'mona_lisa' is neither a sample painting (van_gogh, great_wave)"),
    (["--style", "{text}"], "--style {text}: not an image Pillow reads"),
    (["--size", "0"], "--size must be between 16 and 4096 px, got 0"),
    (["--iterations", "-5"], "--iterations must be between 1 and 2000, got -5"),
    (["-o", "{tmp}/missing/x.png"], "-o {tmp}/missing/x.png: the folder {tmp}/missing does not exist"),
    (["-o", "{text}/x.png"], "-o {text}/x.png: {text} is not a folder"),
    (["-o", "{tmp}/x.txt"], "-o {tmp}/x.txt: .txt is not a picture format the CLI writes"),
    (["--side-by-side", "{tmp}/missing/s.png"], "--side-by-side {tmp}/missing/s.png: the folder"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, args, message):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    fill = {"tmp": str(tmp_path), "text": str(text)}
    run = subprocess.run([sys.executable, "-m", "nst_tools.demo", "--model", str(tmp_path / "m.onnx"),
                          *[a.format(**fill) for a in args]], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"nst-demo: error: {message.format(**fill)}" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "missing").exists()   # before the export


def test_side_by_side_puts_three_images_in_a_row(tmp_path):
    content, style = sample_image(SAMPLE_CONTENT), sample_painting("great_wave")
    sheet = side_by_side([content, style, content], tmp_path / "sheet.png", height_px=100, gap_px=8)
    with Image.open(content) as c, Image.open(style) as s, Image.open(sheet) as out:
        widths = [round(c.width * 100 / c.height), round(s.width * 100 / s.height)]
        assert out.size == (2 * widths[0] + widths[1] + 16, 100)
        assert out.getpixel((widths[0] + 3, 50)) == (255, 255, 255)   # the gap


def test_demo_exports_serves_and_stylizes(tmp_path):
    model, output = tmp_path / "m" / "vgg.onnx", tmp_path / "demo.png"
    run = subprocess.run([sys.executable, "-m", "nst_tools.demo", "--model", str(model), "-o", str(output),
                          "--size", "64", "--iterations", "30"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert model.is_file()
    assert max(Image.open(output).size) == 64
    ratio = float(re.search(r"last/first = ([0-9.e+-]+)", run.stdout).group(1))
    assert ratio <= 0.1, run.stdout
    assert "nst-server stopped (exit code 0)" in run.stdout
    assert "like van_gogh_village_street_in_auvers.jpg" in run.stdout
    sheet = tmp_path / "demo_side_by_side.png"
    assert f"content | style | result: {sheet}" in run.stdout
    assert Image.open(sheet).height == Image.open(output).height
    # The result takes on the painting's palette: its colours overlap the painting's more than the photo's do.
    painting = colour_histogram(sample_painting("van_gogh"))
    photo, result = colour_histogram(sample_image(SAMPLE_CONTENT)), colour_histogram(output)
    print("colour overlap with the painting: result", overlap(result, painting), "photo", overlap(photo, painting))
    assert overlap(result, painting) > overlap(photo, painting) + 0.1, (overlap(result, painting),
                                                                        overlap(photo, painting))
