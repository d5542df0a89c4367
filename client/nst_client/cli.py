"""``nst``: the command-line client of the style-transfer server.

    nst stylize CONTENT STYLE -o OUT.png --server HOST:PORT --size 256 --iterations 200
    nst info --server HOST:PORT
    nst health --server HOST:PORT
    nst bench --server HOST:PORT --size 256 --iterations 20 --concurrency 1,2,4 --output-json B.json --plot B.png
    nst submit CONTENT STYLE --size 256 [--request-id ID]     (prints the job id; the job outlives the command)
    nst watch JOB_ID [--after N]                              (progress from where the job is, to its end)
    nst result JOB_ID -o OUT.png
    nst cancel JOB_ID
    nst jobs [--state running]

``--server`` takes any gRPC target: several replicas as ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` or
``dns:///nst-headless.NAMESPACE.svc:50051`` are balanced round robin, refusals are retried on another replica,
and the calls about one job (watch, result, cancel) go to the replica that holds it. ``nst stylize`` runs its job
through the job API where the server has it: a stream that breaks is reattached (it says so) from the last event
seen, and the job is sent again (``--max-resubmits``) only when its replica stays unreachable for
``--reattach-s`` or no longer knows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from nst_client import bench as bench_module
from nst_client import output
from nst_proto.argtypes import finite, integer, seconds, timeout
from nst_proto.console import tolerate_console
from nst_client.client import CHOICES, JOB_STATES, REATTACH_S, NSTClient, NSTError, check_target, state_name
from nst_client.options import StylizeOptions
from nst_proto.v1 import style_transfer_pb2 as pb

DEFAULT_SERVER = "127.0.0.1:50051"


def _unsigned(bits: int):
    """argparse type: an integer in [0, 2^bits - 1] (a uint32 or uint64 request field), else an error naming
    the flag (protobuf's own is "Value out of range: -5")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not 0 <= value < 1 << bits:
            raise argparse.ArgumentTypeError(f"must be between 0 and {(1 << bits) - 1}, got {value}")
        return value
    parse.__name__ = f"uint{bits}"
    return parse


UINT32, UINT64 = _unsigned(32), _unsigned(64)


def server_target(text: str) -> str:
    """argparse type of ``--server``: a gRPC target in a form the client connects to as meant
    (:func:`nst_client.client.check_target`: ``[::1]:50051``, not ``::1:50051``; a port always)."""
    try:
        return check_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


server_target.__name__ = "target"


def _add_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER, type=server_target,
                        help="gRPC target of nst-server: HOST:PORT (IPv6 as [::1]:50051), or replicas as "
                             "ipv4:HOST:PORT,HOST:PORT,… or dns:///NAME:PORT, balanced round robin with retries; "
                             "loopback targets never go through $http_proxy & co. (default: %(default)s)")
    parser.add_argument("--balance", action="store_true", default=None,
                        help="round robin and retries for a plain HOST:PORT too (a name with several addresses)")
    parser.add_argument("--max-resubmits", type=integer(0), default=2,
                        help="send a job again at most this many times when its replica is lost mid-stream "
                             "(default: %(default)s)")
    parser.add_argument("--reattach-s", type=seconds, default=REATTACH_S,
                        help="keep reattaching to a job whose stream broke (WatchJob on its replica, from the last "
                             "event seen) for this long before sending it again, s (default: %(default)s)")
    parser.add_argument("--busy-retry-s", type=seconds, default=0.0,
                        help="keep sending a job that every replica refuses (busy, loading, draining) for up to "
                             "this long, s; inf: until --timeout-s (default: %(default)s: fail at once)")
    parser.add_argument("--tls", action="store_true",
                        help="connect with TLS, verifying the server against the system's root certificates")
    parser.add_argument("--tls-ca", default=None, metavar="PEM",
                        help="connect with TLS, verifying the server against this CA (or self-signed) certificate")
    parser.add_argument("--token", default=os.environ.get("NST_AUTH_TOKEN") or None,
                        help="bearer token for servers started with --auth-token (default: $NST_AUTH_TOKEN)")


def layer_weights(text: str) -> dict[str, float] | None:
    """argparse type of ``--content-layers`` and ``--style-layers``: ``LAYER[:WEIGHT],…`` (a weight left out: 1);
    an empty text: None, the server's default."""
    if not text:
        return None
    layers = {}
    for item in text.split(","):
        layer, sep, weight = item.partition(":")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not LAYER:WEIGHT") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be a finite number")
        layers[layer.strip()] = value
    return layers


#: Where the flag of a control (:func:`_add_controls`) is not ``--`` + its name, or the CLI itself does more with
#: the value (a sentence added to its help). A new control needs no entry here.
_FLAG_EXTRAS: dict[str, dict[str, str]] = {
    # --size since the first version (nst bench has it too); --max-side-px would read as nst-server's limit
    "max_side_px": {"flag": "--size"},
    "preview_every": {"note": "nst saves each preview next to OUTPUT as OUTPUT.previewNNNN.SUFFIX."},
}


def _add_controls(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`StylizeOptions` field, the job's controls: its name (``--content-weight`` for
    ``content_weight``), its type (the ``StylizeRequest`` field's: uint32/uint64 ranges, finite floats, bool:
    store_true, an enum: its :data:`CHOICES`, layer weights: ``LAYER:W,…``) and its help (the field's
    documentation); not given: unset, the server's default."""
    group = parser.add_argument_group(
        "job controls", "one flag per field of nst_client.StylizeOptions (nst.v1.StylizeRequest); any not given is "
                        "left to the server's default")
    request = pb.StylizeRequest.DESCRIPTOR
    for field in dataclasses.fields(StylizeOptions):
        name, proto, extras = field.name, request.fields_by_name[field.name], _FLAG_EXTRAS.get(field.name, {})
        flag = extras.get("flag", "--" + name.replace("_", "-"))
        help_text = field.metadata["doc"].replace("``", "").replace("%", "%%")
        if "note" in extras:
            help_text += " " + extras["note"]
        if proto.type == proto.TYPE_BOOL:
            group.add_argument(flag, dest=name, action="store_true", help=help_text)
            continue
        if proto.type == proto.TYPE_ENUM:
            kind = {"choices": CHOICES[name]}
        elif proto.type in (proto.TYPE_UINT32, proto.TYPE_UINT64):
            kind = {"type": UINT32 if proto.type == proto.TYPE_UINT32 else UINT64,
                    "metavar": "PX" if name.endswith("_px") else "N"}
        elif proto.type == proto.TYPE_DOUBLE:
            kind = {"type": finite, "metavar": "X"}
        elif proto.is_repeated and proto.message_type is pb.LayerWeight.DESCRIPTOR:
            kind = {"type": layer_weights, "metavar": "LAYER:W,…"}
            help_text += " As LAYER:WEIGHT,…, e.g. relu3_1:0.5,relu4_1:1 (a weight left out: 1)."
        else:
            raise TypeError(f"StylizeOptions.{name}: no CLI flag for its kind of StylizeRequest field; "
                            f"add one to nst_client.cli._add_controls")
        group.add_argument(flag, dest=name, default=None, help=help_text, **kind)


def stylize_options(args: argparse.Namespace) -> StylizeOptions:
    """The job's controls as ``nst stylize``'s flags (:func:`_add_controls`) set them."""
    return StylizeOptions(**{field.name: getattr(args, field.name) for field in dataclasses.fields(StylizeOptions)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nst", description="Neural style transfer client (gRPC).")
    commands = parser.add_subparsers(dest="command", required=True)

    stylize = commands.add_parser("stylize", help="stylize CONTENT like STYLE and write a PNG")
    stylize.add_argument("content", help="content image file (PNG, JPEG, …)")
    stylize.add_argument("style", help="style image file")
    stylize.add_argument("-o", "--output", required=True,
                         help="picture to write; its suffix picks the format: .png, .jpg/.jpeg, .webp, .tif/.tiff "
                              "(checked, with its folder, before the job is sent)")
    stylize.add_argument("--quality", type=int, default=None, metavar="1-100",
                         help=f"JPEG/WebP quality (default {output.DEFAULT_QUALITY})")
    _add_server(stylize)
    stylize.add_argument("--style", dest="styles", action="append", default=[], metavar="FILE[:WEIGHT]",
                         help="one more style image with an optional blend weight (repeatable)")
    stylize.add_argument("--init-image", default=None, help="initial image file (with --init image)")
    stylize.add_argument("--timeout-s", type=timeout, default=None,
                         help="deadline for the whole job, s, > 0; inf (or more than 1e9): none (default: none)")
    stylize.add_argument("--quiet", action="store_true", help="no progress bar")
    stylize.add_argument("--no-job-api", dest="job_api", action="store_false",
                         help="run the job on one Stylize stream, as before the job API: a broken stream cancels it "
                              "and it is sent again from the start (default: the job API where the server has it)")
    _add_controls(stylize)

    submit = commands.add_parser("submit", help="submit a job that outlives this command (SubmitJob); prints its "
                                                "id: follow it with nst watch, fetch it with nst result")
    submit.add_argument("content", help="content image file (PNG, JPEG, …)")
    submit.add_argument("style", help="style image file")
    submit.add_argument("--request-id", default=None,
                        help="idempotency key: submitting the same id again returns the same job (default: a new "
                             "UUID)")
    _add_server(submit)
    submit.add_argument("--style", dest="styles", action="append", default=[], metavar="FILE[:WEIGHT]",
                        help="one more style image with an optional blend weight (repeatable)")
    submit.add_argument("--init-image", default=None, help="initial image file (with --init image)")
    _add_controls(submit)
    watch = commands.add_parser("watch", help="follow a job's progress (WatchJob) to its end; exit 0 when it "
                                              "succeeded, 1 otherwise")
    watch.add_argument("job_id")
    watch.add_argument("--after", type=UINT64, default=0,
                       help="start after this event number (default: from the first event)")
    watch.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_server(watch)
    result = commands.add_parser("result", help="write a succeeded job's picture (GetJobResult)")
    result.add_argument("job_id")
    result.add_argument("-o", "--output", required=True,
                        help="picture to write; its suffix picks the format: .png, .jpg/.jpeg, .webp, .tif/.tiff")
    result.add_argument("--quality", type=int, default=None, metavar="1-100",
                        help=f"JPEG/WebP quality (default {output.DEFAULT_QUALITY})")
    _add_server(result)
    cancel = commands.add_parser("cancel", help="cancel a job (CancelJob) and print its status as JSON")
    cancel.add_argument("job_id")
    _add_server(cancel)
    jobs = commands.add_parser("jobs", help="list the server's jobs (ListJobs), one line each: id, state, "
                                            "iterations, submitted time, request id")
    jobs.add_argument("--state", default=None, choices=JOB_STATES, help="only jobs in this state")
    _add_server(jobs)

    info = commands.add_parser("info", help="print the server's model information as JSON")
    _add_server(info)
    health = commands.add_parser("health", help="print the server's health status (grpc.health.v1); exit code 0 "
                                                "when SERVING, 1 otherwise (a container HEALTHCHECK)")
    _add_server(health)
    bench = commands.add_parser("bench", help="throughput and latency over a sweep of concurrency levels")
    _add_server(bench)
    bench_module.add_arguments(bench)
    return parser


def _file_weight(text: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` of ``--style``; a suffix that is no number belongs to the file name. Raises ValueError
    for a weight that is not finite (``nan``, ``inf``)."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return text, 1.0
        if not math.isfinite(value):
            raise ValueError(f"--style {text}: the blend weight must be a finite number, got {weight!r}")
        return path, value
    return text, 1.0


def _check_stylize_outputs(args: argparse.Namespace) -> str:
    """What can be checked about the files the job will write, before it is sent; returns the format."""
    fmt = output.check_output(args.output, keep_alpha=args.keep_content_alpha)
    if args.quality is not None:
        if not 1 <= args.quality <= 100:
            raise ValueError(f"--quality must be between 1 and 100, got {args.quality}")
        if fmt not in output.LOSSY_FORMATS:
            raise ValueError(f"--quality applies to JPEG and WebP, not to {fmt} ({args.output})")
    return fmt


def scale_label(progress: pb.Progress) -> str:
    """Where a job stands in its coarse-to-fine schedule, for the progress bar: ``scale 2/3 1024x768``.

    The schedule's length is left out where it says nothing or cannot be right: ``Progress.scales`` 0 (a server
    that does not report it), 1 (a single scale; servers that did not count the scales sent 1 for every job) or
    less than the scale: ``scale 2 1024x768``. ``Progress.scale`` 0 (none reported) gives just the size, and no
    size either an empty text."""
    size = f"{progress.width_px}x{progress.height_px}" if progress.width_px and progress.height_px else ""
    if not progress.scale:
        return size
    of = f"/{progress.scales}" if progress.scales > 1 and progress.scales >= progress.scale else ""
    return f"scale {progress.scale}{of}" + (f" {size}" if size else "")


def time_left(progress: pb.Progress) -> str:
    """The server's estimate of the time to the Result (``Progress.remaining_ms``) as ``01:23`` or ``1:02:03``;
    empty when the server gives none (0)."""
    if not progress.remaining_ms > 0:
        return ""
    return tqdm.format_interval(progress.remaining_ms / 1000.0)


#: The progress bar's layout once the server estimates the time left: tqdm's own, less its estimate from the rate
#: (``<{remaining}``: the iterations of a coarse-to-fine job cost more at each scale, so the rate so far
#: underestimates); the server's estimate is in the postfix (``left=``).
BAR_FORMAT_SERVER_ESTIMATE = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def _stylize(args: argparse.Namespace, client: NSTClient, fmt: str) -> int:
    bar = None if args.quiet else tqdm(total=args.iterations or None, unit="it", desc="stylize", file=sys.stderr)
    shown = {"attempt": "", "scale": ""}       # what the bar's description says: the attempt, the scale
    target = Path(args.output)
    quality = args.quality or output.DEFAULT_QUALITY
    preview_failed = []

    def on_heartbeat(heartbeat) -> None:
        if bar is not None and heartbeat.queue_position:
            bar.set_postfix_str(f"waiting: {heartbeat.queue_position} in line, {heartbeat.waited_ms / 1000:.0f} s")

    def on_retry(retry) -> None:
        why = "replica lost" if retry.accepted else "refused"
        line = f"{why} ({retry.error}); sending the job again, attempt {retry.attempt}"
        if bar is None:
            print(f"nst: {line}", file=sys.stderr)
            return
        bar.write(f"nst: {line}", file=sys.stderr)
        if retry.accepted:
            bar.reset()
        shown["attempt"] = f" (attempt {retry.attempt})"
        bar.set_description(f"stylize{shown['attempt']}" + (f" {shown['scale']}" if shown["scale"] else ""))

    def on_reattach(reattach) -> None:
        line = (f"nst: the stream broke ({reattach.error}); reattached to job {reattach.job_id} after event "
                f"{reattach.after} in {reattach.waited_s:.2f} s")
        if bar is None:
            print(line, file=sys.stderr)
        else:
            bar.write(line, file=sys.stderr)

    def on_progress(progress) -> None:
        if progress.preview_png and not preview_failed:
            preview = target.with_suffix(f".preview{progress.iteration:04d}{target.suffix}")
            try:
                output.atomic_write_bytes(preview, output.encode(progress.preview_png, fmt, quality))
            except OSError as exc:       # a preview is not worth the job: say so once and go on
                preview_failed.append(exc)
                print(f"nst: previews are no longer saved: {exc}", file=sys.stderr)
        if bar is None:
            return
        label, left = scale_label(progress), time_left(progress)
        changed = label != shown["scale"]
        if changed:
            shown["scale"] = label
            bar.set_description(f"stylize{shown['attempt']}" + (f" {label}" if label else ""), refresh=False)
        # The server's estimate where it gives one (it knows the schedule's remaining pixels), else tqdm's own
        # from the rate (where --iterations gives the bar a total).
        bar.bar_format = BAR_FORMAT_SERVER_ESTIMATE if left and bar.total else None
        bar.set_postfix({"content": f"{progress.costs.content:.3g}", "style": f"{progress.costs.style:.3g}",
                         **({"left": left} if left else {})}, refresh=False)
        bar.update(progress.iteration - bar.n)
        if changed:          # a new scale is shown at once, whatever tqdm's refresh interval
            bar.refresh()

    try:
        result = client.stylize(
            args.content, args.style, stylize_options(args), on_progress=on_progress, on_heartbeat=on_heartbeat,
            on_retry=on_retry, on_reattach=on_reattach, timeout_s=args.timeout_s,
            styles=[_file_weight(item) for item in args.styles], init_image=args.init_image)
    finally:
        if bar is not None:
            bar.close()
    written, error = output.write_image(result.image_png, target, fmt, quality)
    if error is not None:
        print(f"nst: cannot write {target} ({error}); the result is saved as {written} instead", file=sys.stderr)
    print(f"wrote {written} ({result.width_px}x{result.height_px}) in {result.elapsed_ms / 1000:.1f} s; "
          f"{result.iterations} iterations, stop: {result.stop_reason}, precision {result.precision or '?'}"
          + (f"; {result.attempts} attempts" if result.attempts > 1 else "")
          + (f"; replica {result.replica}" if result.replica else ""))
    print(f"costs of the delivered image: content {result.content_cost:.4g}, style {result.style_cost:.4g}, "
          f"total {result.total_cost:.4g}")
    if result.progress:
        first, last = result.progress[0], result.progress[-1]
        print(f"style cost: iteration {first.iteration} {first.costs.style:.4g} -> iteration {last.iteration} "
              f"{last.costs.style:.4g} (last/first = {last.costs.style / max(first.costs.style, 1e-30):.4f})")
    return 0 if error is None else 2


def _submit(args: argparse.Namespace, client: NSTClient) -> int:
    reply = client.submit(args.content, args.style, stylize_options(args), request_id=args.request_id,
                          styles=[_file_weight(item) for item in args.styles], init_image=args.init_image)
    print(reply.job_id)
    print(f"nst: job {reply.job_id} {state_name(reply.state)}"
          + (f", {reply.queue_position} in line" if reply.queue_position else "")
          + ("" if reply.created else " (submitted before with this --request-id)")
          + f"; replica {reply.replica}", file=sys.stderr)
    return 0


def _watch(args: argparse.Namespace, client: NSTClient) -> int:
    status = client.job(args.job_id)
    bar = None if args.quiet else tqdm(total=status.max_iterations or None, unit="it", desc="job", file=sys.stderr)
    last = pb.JobEvent()
    try:
        for event in client.watch(args.job_id, after=args.after):
            kind = event.response.WhichOneof("event")
            if event.number:
                last = event
            if kind == "accepted" and bar is not None:
                bar.reset()
                bar.set_postfix_str(f"{event.response.accepted.queue_position} in line, replica "
                                    f"{event.response.accepted.replica}")
            elif kind == "progress" and bar is not None:
                progress = event.response.progress
                bar.set_description(f"job {scale_label(progress)}".rstrip(), refresh=False)
                bar.set_postfix({"content": f"{progress.costs.content:.3g}", "style": f"{progress.costs.style:.3g}"},
                                refresh=False)
                bar.update(progress.iteration - bar.n)
            elif kind == "heartbeat" and bar is not None and event.response.heartbeat.queue_position:
                bar.set_postfix_str(f"waiting: {event.response.heartbeat.queue_position} in line")
    finally:
        if bar is not None:
            bar.close()
    state = state_name(last.state) if last.number else state_name(client.job(args.job_id).state)
    print(f"job {args.job_id} {state} (last event {last.number})"
          + (f": {last.error_message}" if last.error_message else ""))
    return 0 if last.state == pb.JOB_STATE_SUCCEEDED else 1


def _result(args: argparse.Namespace, client: NSTClient) -> int:
    fmt = output.check_output(args.output)
    png = client.result(args.job_id)
    written, error = output.write_image(png, Path(args.output), fmt, args.quality or output.DEFAULT_QUALITY)
    if error is not None:
        print(f"nst: cannot write {args.output} ({error}); the result is saved as {written} instead", file=sys.stderr)
    print(f"wrote {written} ({len(png)} bytes of PNG from job {args.job_id})")
    return 0 if error is None else 2


def _jobs(args: argparse.Namespace, client: NSTClient) -> int:
    for status in client.jobs(args.state):
        submitted = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(status.submitted_unix_s))
        print(f"{status.job_id} {state_name(status.state):9} {status.iterations:>5}/{status.max_iterations:<5} "
              f"{submitted} {status.request_id or '-'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    tolerate_console()      # a closed or full stdout/stderr never fails a job whose picture was written
    args = build_parser().parse_args(argv)
    try:
        fmt = _check_stylize_outputs(args) if args.command == "stylize" else ""
        if args.command == "bench":
            for option in ("output_json", "output_csv", "plot"):
                if getattr(args, option):
                    output.check_writable(getattr(args, option), "--" + option.replace("_", "-"))
        with NSTClient(args.server, tls=args.tls, tls_ca=args.tls_ca, token=args.token, balance=args.balance,
                       max_resubmits=args.max_resubmits, busy_retry_s=args.busy_retry_s,
                       reattach_s=args.reattach_s, job_api=getattr(args, "job_api", True)) as client:
            if args.command == "stylize":
                return _stylize(args, client, fmt)
            if args.command == "bench":
                return bench_module.run(args, client)
            if args.command in ("submit", "watch", "result", "jobs"):
                return {"submit": _submit, "watch": _watch, "result": _result, "jobs": _jobs}[args.command](
                    args, client)
            if args.command == "cancel":
                print(json.dumps(MessageToDict(client.cancel(args.job_id)), indent=2))
                return 0
            if args.command == "info":
                print(json.dumps(MessageToDict(client.model_info()), indent=2))
                return 0
            status = client.health()
            print(status)
            return 0 if status == "SERVING" else 1
    except NSTError as exc:
        print(f"nst: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"nst: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:            # Ctrl-C: the call is cancelled as the client closes (see NSTClient)
        print("nst: interrupted; the job was cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
