"""The main job (nst-demo) end to end, small: export when missing, server, CLI, result, server stopped."""

import re
import subprocess
import sys

from PIL import Image


def test_demo_exports_serves_and_stylizes(tmp_path):
    model, output = tmp_path / "m" / "vgg.onnx", tmp_path / "demo.png"
    run = subprocess.run([sys.executable, "-m", "nst_server.demo", "--model", str(model), "-o", str(output),
                          "--size", "64", "--iterations", "30"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert model.is_file()
    assert max(Image.open(output).size) == 64
    ratio = float(re.search(r"last/first = ([0-9.e+-]+)", run.stdout).group(1))
    assert ratio <= 0.1, run.stdout
    assert "nst-server stopped (exit code 0)" in run.stdout
