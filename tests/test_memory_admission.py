"""Admission by memory: the budget (cgroup files, MemTotal, the margin, the resident memory), a job's estimate
(monotonic in its output's pixels), the largest side that fits, ``--memory-budget``; the admission's line under a
budget (nst_server.jobs, without a server); and a real nst-server whose budget fits one job: a second job waits
(queue position 1, heartbeats) and both complete, a job over the whole budget is refused at once with
RESOURCE_EXHAUSTED naming max_side_px and the budget, and the server keeps serving."""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest
from PIL import Image

import serving
from streams import TimedStream
from nst_client import NSTClient, NSTError, build_request
from nst_server import memory, metrics
from nst_server.images import resize_to_max_side
from nst_server.jobs import STOP_CLIENT, Admission, MemoryBudgetExceeded
from nst_server.settings import StyleTransferSettings

GiB, MiB = memory.GiB, memory.MiB


# --- the budget ----------------------------------------------------------------------------------------------------

def _meminfo(tmp_path, total_kib: int):
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       {total_kib} kB\nMemFree:        1000 kB\n")
    return path


def _status(tmp_path, rss_kib: int):
    path = tmp_path / "status"
    path.write_text(f"Name:\tpython\nVmPeak:\t  999999 kB\nVmRSS:\t  {rss_kib} kB\n")
    return path


def test_parse_cgroup_limit():
    assert memory.parse_cgroup_limit("max\n") is None
    assert memory.parse_cgroup_limit("4294967296\n") == 4 * GiB
    assert memory.parse_cgroup_limit("9223372036854771712\n", "memory.limit_in_bytes") is None   # v1: no limit
    with pytest.raises(memory.MemoryFileError, match="memory.max.*'4G'"):
        memory.parse_cgroup_limit("4G")


def test_cgroup_v2_limit_of_a_container(tmp_path):
    """A container with its own cgroup namespace: /sys/fs/cgroup is its cgroup, /proc/self/cgroup says ``0::/``."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "memory.max").write_text(f"{3 * GiB}\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/\n")
    assert memory.cgroup_memory_limit(root, proc) == (3 * GiB, str(root / "memory.max"))
    (root / "memory.max").write_text("max\n")
    assert memory.cgroup_memory_limit(root, proc) is None


def test_cgroup_v1_limit_along_the_process_path(tmp_path):
    """cgroup v1 without a namespace: the smallest real limit of the process's memory cgroup and its ancestors."""
    root = tmp_path / "cgroup"
    leaf = root / "memory" / "kubepods" / "pod1"
    leaf.mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "memory" / "kubepods" / "memory.limit_in_bytes").write_text(f"{8 * GiB}\n")
    (leaf / "memory.limit_in_bytes").write_text(f"{2 * GiB}\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("5:cpu,cpuacct:/kubepods/pod1\n4:memory:/kubepods/pod1\n0::/\n")
    assert memory.cgroup_memory_limit(root, proc) == (2 * GiB, str(leaf / "memory.limit_in_bytes"))
    (leaf / "memory.limit_in_bytes").write_text("lots\n")
    with pytest.raises(memory.MemoryFileError, match="memory.limit_in_bytes"):
        memory.cgroup_memory_limit(root, proc)


def test_default_budget_from_the_cgroup_limit(tmp_path):
    """min(cgroup limit, MemTotal) - max(10 %, 512 MiB) - the resident memory."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "memory.max").write_text(f"{4 * GiB}\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/\n")
    meminfo = _meminfo(tmp_path, 24 * GiB // 1024)
    budget, source = memory.default_budget(rss_bytes=1 * GiB, root=root, proc_cgroup=proc, meminfo=meminfo)
    assert budget == 4 * GiB - 512 * MiB - 1 * GiB                  # 10 % of 4 GiB is under the 512 MiB minimum
    assert "cgroup memory limit 4 GiB" in source and "memory.max" in source and "resident 1 GiB" in source
    # The resident memory measured at the call (VmRSS), when the caller does not pass it.
    budget, source = memory.default_budget(root=root, proc_cgroup=proc, meminfo=meminfo,
                                           status=_status(tmp_path, 300 * 1024))
    assert budget == 4 * GiB - 512 * MiB - 300 * MiB and "resident 300 MiB" in source


def test_default_budget_from_memtotal_without_a_real_limit(tmp_path):
    """No cgroup limit (or one above the machine's memory): MemTotal, less 10 % (over 512 MiB here)."""
    root = tmp_path / "cgroup"
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text(f"{64 * GiB}\n")      # more than the machine has
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/\n")
    meminfo = _meminfo(tmp_path, 20 * GiB // 1024)
    budget, source = memory.default_budget(rss_bytes=0, root=root, proc_cgroup=proc, meminfo=meminfo)
    assert budget == 20 * GiB - 2 * GiB and source.startswith("MemTotal 20 GiB")
    assert memory.default_budget(rss_bytes=30 * GiB, root=root, proc_cgroup=proc, meminfo=meminfo)[0] == 0
    # Without MemTotal the cgroup's limit counts alone; with neither, no budget can be sized.
    assert memory.default_budget(rss_bytes=0, root=root, proc_cgroup=proc, meminfo=tmp_path / "missing")[0] == (
        64 * GiB - -(-64 * GiB // 10))                                   # a margin of 10 %, rounded up
    with pytest.raises(memory.MemoryFileError, match="--memory-budget"):
        memory.default_budget(rss_bytes=0, root=tmp_path / "none", proc_cgroup=proc, meminfo=tmp_path / "missing")


# --- the estimate --------------------------------------------------------------------------------------------------

def test_estimate_is_monotonic_in_pixels_and_styles():
    settings = StyleTransferSettings(precision="fp32")
    sides = [16, 32, 64, 100, 256, 511, 512, 1024, 2048, 4096]
    estimates = [memory.job_peak_bytes(*memory.output_size(4, 3, side), settings) for side in sides]
    assert estimates == sorted(estimates) and len(set(estimates)) == len(estimates)
    assert memory.job_peak_bytes(768, 1024, settings) == (memory.JOB_FIXED_BYTES["fp32"]
                                                          + memory.BYTES_PER_OUTPUT_PIXEL * 768 * 1024)
    by_styles = [memory.job_peak_bytes(768, 1024, settings, n) for n in (1, 2, 3, 16)]
    assert by_styles == sorted(by_styles) and by_styles[1] - by_styles[0] == memory.BYTES_PER_OUTPUT_PIXEL * 768 * 1024 // 4
    assert memory.job_peak_bytes(768, 1024, settings, 0) == by_styles[0]             # at least one style counts
    # "auto" counts as fp32 (the larger) unless resolved; bf16 is smaller.
    auto, bf16 = StyleTransferSettings(), StyleTransferSettings(precision="bf16")
    assert memory.job_peak_bytes(768, 1024, auto) == memory.job_peak_bytes(768, 1024, settings)
    assert memory.job_peak_bytes(768, 1024, bf16) < memory.job_peak_bytes(768, 1024, settings)


@pytest.mark.parametrize("size", [(64, 48), (48, 64), (1000, 3), (3, 1000), (17, 16), (640, 480), (333, 777)])
@pytest.mark.parametrize("side", [16, 37, 64, 1024, 4096])
def test_output_size_is_the_engines_resize(size, side):
    expected_width, expected_height = resize_to_max_side(Image.new("RGB", size), side).size
    assert memory.output_size(*size, side) == (expected_height, expected_width)


def test_largest_side():
    fp32 = StyleTransferSettings(precision="fp32")
    budget = memory.job_peak_bytes(*memory.output_size(4, 3, 1000), fp32)
    assert memory.largest_side(budget, fp32, 4096) == 1000                  # exact: 1001 px is over by a row
    assert memory.largest_side(budget - 1, fp32, 4096) < 1000
    assert memory.largest_side(budget, fp32, 640) == 640                    # capped at the server's limit
    assert memory.largest_side(None, fp32, 4096) == 4096                    # no memory accounting
    assert memory.largest_side(GiB, fp32, 4096) == 0                        # not even 16 px fits
    # Another aspect, more styles: each its own largest side, fitting, and one more pixel not.
    side = memory.largest_side(budget, fp32, 4096, n_styles=3, aspect=(64, 48))
    assert memory.job_peak_bytes(*memory.output_size(64, 48, side), fp32, 3) <= budget
    assert memory.job_peak_bytes(*memory.output_size(64, 48, side + 1), fp32, 3) > budget


def test_memory_budget_flag():
    assert memory.parse_budget_flag("6GiB") == 6 * GiB
    assert memory.parse_budget_flag("512MiB") == 512 * MiB
    assert memory.parse_budget_flag("1.5G") == 3 * GiB // 2
    assert memory.parse_budget_flag("8GB") == 8 * 10**9
    assert memory.parse_budget_flag("1048576") == 1 << 20
    assert memory.parse_budget_flag("0") == memory.parse_budget_flag("none") == memory.parse_budget_flag("OFF") == 0
    assert memory.parse_budget_flag("auto") is None
    for bad in ("", "-1GiB", "6 parsecs", "GiB", "1e9"):
        with pytest.raises(ValueError, match="6GiB"):
            memory.parse_budget_flag(bad)
    from nst_server.cli import build_config, build_parser
    assert build_config(build_parser().parse_args(["--memory-budget", "6GiB"])).limits.memory_budget_bytes == 6 * GiB
    assert build_config(build_parser().parse_args([])).limits.memory_budget_bytes is None
    assert build_config(build_parser().parse_args([])).limits.max_side_px == 4096
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--memory-budget", "lots"])


# --- the admission's line under a budget ---------------------------------------------------------------------------

def test_admission_runs_what_fits_and_keeps_the_line():
    """Budget 10, N=3: jobs of 6, 6, 3 → the first runs, the second waits (position 1), the third waits behind it
    though it would fit (first in, first out); when the first's worker is done, the second and the third run. A job
    over the whole budget is refused at once."""
    async def scenario():
        loop = asyncio.get_running_loop()
        admission = Admission(max_running=3, max_queued=3, memory_budget=10)
        futures: dict[str, asyncio.Future] = {}

        def launcher(job_id):
            def launch():
                futures[job_id] = loop.create_future()
                return futures[job_id]
            return launch

        jobs = [admission.admit(f"job{i}", memory_bytes=size) for i, size in enumerate((6, 6, 3))]
        for job in jobs:
            admission.start(job, launcher(job.job_id))
        assert [job.queue_position for job in jobs] == [0, 1, 2]
        assert list(futures) == ["job0"] and admission.reserved_bytes == 6
        assert metrics.MEMORY_RESERVED._value.get() == 6 and metrics.MEMORY_BUDGET._value.get() == 10
        with pytest.raises(MemoryBudgetExceeded, match="budget of 10 B") as error:
            admission.admit("huge", memory_bytes=11)
        assert error.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED and "huge" not in admission.jobs

        assert jobs[0].start()
        jobs[0].finish()
        futures["job0"].set_result(None)               # the worker is done: its memory is free
        await asyncio.sleep(0)                          # done callbacks run on the loop
        assert list(futures) == ["job0", "job1", "job2"]
        assert [admission.position(job) for job in jobs[1:]] == [0, 0] and admission.reserved_bytes == 9
        for job in jobs:
            job.request_stop(STOP_CLIENT)
            admission.release_when_idle(job)
        for name in ("job1", "job2"):
            futures[name].set_result(None)
        await asyncio.sleep(0)
        assert admission.reserved_bytes == 0 and await admission.wait_empty(0.01)
        admission.set_memory_budget(None)
    asyncio.run(scenario())


def test_a_stopped_job_at_the_head_lets_the_next_run():
    """The first in line does not fit beside the running job; it is cancelled while waiting: the small job behind
    it runs at once, and the cancelled one is launched only to end its stream (its worker does nothing)."""
    async def scenario():
        loop = asyncio.get_running_loop()
        admission = Admission(max_running=2, max_queued=2, memory_budget=10)
        launched = []

        def launcher(job):
            def launch():
                launched.append(job.job_id)
                return loop.create_future()
            return launch

        running, big, small = (admission.admit(name, memory_bytes=size)
                               for name, size in (("running", 5), ("big", 8), ("small", 2)))
        for job in (running, big, small):
            admission.start(job, launcher(job))
        assert launched == ["running"] and admission.position(small) == 2
        big.request_stop(STOP_CLIENT)
        admission.pump()                                # the servicer's release does this
        assert launched == ["running", "big", "small"] and not big.start() and admission.position(small) == 0
        assert admission.reserved_bytes == 7
        admission.set_memory_budget(None)
    asyncio.run(scenario())


def test_without_a_budget_only_n_counts():
    async def scenario():
        admission = Admission(max_running=1, max_queued=2)
        jobs = [admission.admit(f"j{i}", memory_bytes=100 * GiB) for i in range(3)]
        assert [job.queue_position for job in jobs] == [0, 1, 2]
        for job in jobs:
            admission.release(job)
    asyncio.run(scenario())


# --- a real server whose budget fits one job -----------------------------------------------------------------------

#: The jobs: fp32 (so that the estimate does not depend on the machine's default precision), one scale, one level.
JOB = dict(scales=1, pyramid_levels=1, precision="fp32", progress_every=50)
SIDE = 64                                         # the 64x48 content: a 64x48 output
ITERATIONS = 80                                   # the first job runs while the second is admitted and waits


def _estimate(side: int = SIDE, content_size=(64, 48)) -> int:
    return memory.job_peak_bytes(*memory.output_size(*content_size, side), StyleTransferSettings(precision="fp32"))


@pytest.fixture(scope="module")
def one_job_server(onnx_path, tmp_path_factory):
    """N=2 running (the budget, not N, makes the second wait), Q=2, a budget of exactly one 64 px fp32 job."""
    log = tmp_path_factory.mktemp("memory") / "server.log"
    process = serving.start(onnx_path, log, ["--max-running-jobs", "2", "--max-queued-jobs", "2",
                                             "--heartbeat-s", "0.05", "--memory-budget", str(_estimate())])
    try:
        yield process
    finally:
        process.stop()


def test_model_info_reports_the_budget(one_job_server):
    with NSTClient(one_job_server.target) as client:
        info = client.model_info()
    budget = _estimate()
    assert info.memory_budget_bytes == budget and info.max_side_px == 4096
    assert info.memory_budget_source == f"--memory-budget {memory.format_bytes(budget)}"
    expected = memory.largest_side(budget, StyleTransferSettings(precision=info.precision), info.max_side_px)
    assert info.largest_output_side_px == expected and 16 <= expected < 4096
    assert one_job_server.metric("nst_memory_budget_bytes") == budget


def test_a_second_job_waits_for_memory_and_both_complete(one_job_server, small_images):
    content, style = small_images
    assert Image.open(io.BytesIO(content)).size == (64, 48)
    first = TimedStream(one_job_server.target,
                        build_request(content, style, max_side_px=SIDE, iterations=ITERATIONS, seed=1, **JOB))
    serving.wait_for(lambda: first.responses, timeout_s=60)
    second = TimedStream(one_job_server.target,
                         build_request(content, style, max_side_px=SIDE, iterations=3, seed=2, **JOB))
    serving.wait_for(lambda: second.responses, timeout_s=60)
    assert first.responses[0].accepted.queue_position == 0
    accepted = second.responses[0].accepted
    assert accepted.queue_position == 1 and accepted.memory_bytes == _estimate()
    assert first.responses[0].accepted.memory_bytes == _estimate()
    # It waits with heartbeats that say so, while the first holds the budget.
    serving.wait_for(lambda: any(beat.queue_position == 1 for _, beat in second.of_kind("heartbeat")), timeout_s=60)
    assert first.done.wait(timeout=300) and first.error is None, first.error
    assert second.done.wait(timeout=300) and second.error is None, second.error
    first_result, second_result = first.of_kind("result")[0][1], second.of_kind("result")[0][1]
    assert (first_result.iterations, second_result.iterations) == (ITERATIONS, 3)
    assert second.kinds().index("progress") > max(i for i, kind in enumerate(second.kinds()) if kind == "heartbeat"
                                                  and second.responses[i].heartbeat.queue_position == 1)
    serving.wait_for(lambda: one_job_server.metric("nst_memory_reserved_bytes") == 0, timeout_s=30)


def test_a_job_over_the_whole_budget_is_refused_at_once(one_job_server, small_images):
    content, style = small_images
    def refused() -> float:               # Stylize calls, and SubmitJob (stylize's where the server has the job API)
        return (one_job_server.metric("nst_jobs_total", outcome="refused_memory")
                + one_job_server.metric("nst_rpcs_total", method="/nst.v1.StyleTransfer/SubmitJob",
                                        code="RESOURCE_EXHAUSTED"))
    refused_before = refused()
    with NSTClient(one_job_server.target, timeout_s=120) as client:
        with pytest.raises(NSTError) as error:
            client.stylize(content, style, max_side_px=128, iterations=2, **JOB)
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error.value.details
        assert "max_side_px 128" in details and f"{_estimate(128)} bytes" in details
        assert f"budget of {memory.format_bytes(_estimate())} ({_estimate()} bytes" in details
        assert "the largest max_side_px that fits it is 64 px" in details
        assert refused() == refused_before + 1
        # The server keeps serving: a job that fits runs.
        result = client.stylize(content, style, max_side_px=48, iterations=2, **JOB)
        assert result.stop_reason == "STOP_REASON_ITERATIONS_DONE" and (result.width_px, result.height_px) == (48, 36)
