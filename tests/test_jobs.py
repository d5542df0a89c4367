"""Unit tests of admission and the job life cycle (nst_server.jobs), without a server."""

from __future__ import annotations

import asyncio

import pytest
import torch

from nst_server import metrics
from nst_server.errors import ServerBusy
from nst_server.jobs import STOP_CLIENT, Admission, FaultInjection, is_out_of_memory, parse_fault_injection


def test_parse_fault_injection():
    assert parse_fault_injection(None) == FaultInjection() and not parse_fault_injection("")
    faults = parse_fault_injection("13:oom, 14:error,warmup:2.5")
    assert faults.by_seed == {13: "oom", 14: "error"} and faults.slow_warm_up_s == 2.5 and faults
    for bad in ("13", "x:oom", "13:boom", "warmup:soon"):
        with pytest.raises(ValueError, match="NST_FAULT_INJECT"):
            parse_fault_injection(bad)


def test_out_of_memory_classes():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("x"))


def test_the_cpu_allocators_failure_counts_as_out_of_memory():
    try:
        torch.empty(1 << 50, dtype=torch.uint8)                       # 1 PiB
    except RuntimeError as exc:
        assert is_out_of_memory(exc), exc
    else:
        pytest.skip("this machine's overcommit setting lets a 1 PiB allocation through")


def test_admission_positions_busy_and_release():
    async def scenario():
        admission = Admission(max_running=2, max_queued=2)
        jobs = [admission.admit(f"job{i}") for i in range(4)]
        assert [job.queue_position for job in jobs] == [0, 0, 1, 2]
        with pytest.raises(ServerBusy, match="limit 2 running \\+ 2 queued"):
            admission.admit("job4")
        waiting = metrics.WAITING._value.get()
        jobs[3].request_stop(STOP_CLIENT)             # stopped while waiting: no worker will run it
        assert jobs[3].state == "abandoned" and jobs[3].stopped_by == STOP_CLIENT
        assert metrics.WAITING._value.get() == waiting - 1
        assert not jobs[3].start()                    # the worker that picks it up does nothing
        admission.release_when_idle(jobs[3])
        assert admission.admit("job5").queue_position == 2
        assert not await admission.wait_empty(0.01)
        for job in list(admission.jobs.values()):
            admission.release(job)
        assert await admission.wait_empty(0.01)
    asyncio.run(scenario())


def test_job_counts_iterations_and_injects_its_fault():
    async def scenario():
        admission = Admission(1, 0, faults={13: "oom"})
        job = admission.admit("a", seed=None)
        assert job.start()
        before = metrics.ITERATIONS._value.get()
        assert [job.should_stop() for _ in range(3)] == [False] * 3      # polls before iterations 1, 2, 3
        assert job.iterations == 2 and metrics.ITERATIONS._value.get() == before + 2
        job.count_iterations(3)                                          # the Result says 3
        assert job.iterations == 3 and metrics.ITERATIONS._value.get() == before + 3
        job.request_stop(STOP_CLIENT)
        assert job.should_stop()
        job.finish()
        admission.release(job)
        faulty = admission.admit("b", seed=13)
        assert faulty.start() and not faulty.should_stop()
        with pytest.raises(torch.OutOfMemoryError, match="NST_FAULT_INJECT"):
            faulty.should_stop()
    asyncio.run(scenario())


def test_queue_position_now():
    """A waiting job's place in line as its heartbeats report it: the admission's count while nothing moved, one
    less for each job ahead that ends, 0 once a worker is free for it or has it."""
    async def scenario():
        admission = Admission(max_running=2, max_queued=2)
        jobs = [admission.admit(f"job{i}") for i in range(4)]
        assert [admission.position(job) for job in jobs] == [job.queue_position for job in jobs] == [0, 0, 1, 2]
        assert jobs[0].start() and jobs[1].start()
        assert [admission.position(job) for job in jobs] == [0, 0, 1, 2]
        jobs[0].finish()
        admission.release(jobs[0])
        assert [admission.position(job) for job in jobs[2:]] == [0, 1]      # a worker is free for job2
        assert jobs[2].start()
        assert [admission.position(job) for job in jobs[1:]] == [0, 0, 1]
        jobs[1].request_stop(STOP_CLIENT)
        jobs[1].finish()
        admission.release(jobs[1])
        assert admission.position(jobs[3]) == 0
        for job in (jobs[2], jobs[3]):
            job.request_stop(STOP_CLIENT)
            job.finish()
            admission.release(job)
    asyncio.run(scenario())
