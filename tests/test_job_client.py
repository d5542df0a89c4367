"""``stylize`` over the job API, through real nst-server processes on 127.0.0.1 with real state folders: a stream
dropped mid-job (a TCP relay between client and server closes every connection) is reattached from the last event
seen, without a second job; a server without the job API (a gRPC server that serves only ``Stylize``, relaying it
to a real one) gets the ``Stylize`` stream; two named replicas (``--replica-name``) behind one multi-address
target: a job's calls (WatchJob, GetJob, GetJobResult, CancelJob) reach the replica whose name is in its id, from a
client that did not submit it too. Jobs are tiny (48 px, one thread) for the machine's two cores."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest

import serving
from nst_client import AsyncNSTClient, NSTClient, NSTError
from nst_client.cli import main as nst_main
from nst_proto.jobids import job_owner
from nst_proto.v1 import style_transfer_pb2 as pb
from nst_proto.v1 import style_transfer_pb2_grpc as pb_grpc

TINY = {"max_side_px": 48, "seed": 5, "scales": 1, "pyramid_levels": 1}
SERVER_ARGS = ["--threads", "1", "--max-running-jobs", "1", "--max-queued-jobs", "4", "--heartbeat-s", "1"]
JOB_RPCS = ("WatchJob", "GetJobResult", "CancelJob")


class Relay:
    """A TCP relay on 127.0.0.1 to ``upstream`` (``host:port``) whose connections :meth:`cut` closes at once, as a
    proxy's timeout or a lost network does; it keeps listening, so the client can connect again."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Close every connection relayed so far (both ends)."""
        with self.lock:
            sockets, self.sockets = self.sockets, []
            self.cuts += 1
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture(scope="module")
def job_server(onnx_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("job_client")
    server = serving.start(onnx_path, folder / "server.log", [*SERVER_ARGS, "--state-dir", str(folder / "state")])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def relay(job_server):
    relay = Relay(job_server.target)
    try:
        yield relay
    finally:
        relay.close()


def _submitted(server) -> float:
    return server.metric("nst_stored_job_events_total", event="submitted")


def _check_one_uninterrupted_job(server, result, submitted_before: float, iterations: int) -> pb.JobStatus:
    """One job was submitted and ran once, and the caller got each iteration once, in order."""
    assert result.attempts == 1 and result.iterations == iterations
    assert [p.iteration for p in result.progress] == list(range(1, iterations + 1))
    assert _submitted(server) == submitted_before + 1
    with NSTClient(server.target) as direct:
        status = direct.job(result.job_id)
        assert (status.state, status.runs, status.iterations) == (pb.JOB_STATE_SUCCEEDED, 1, iterations)
        assert direct.result(result.job_id) == result.image_png
    return status


def test_stylize_reattaches_after_a_dropped_stream_without_a_second_job(job_server, relay, small_images):
    """The relay closes the connection after the third Progress: stylize watches the job again from the last event
    seen (one Reattach), the job goes on, and the server ran one job once; the bytes are those of the Stylize
    stream's job with the same request."""
    content, style = small_images
    reattaches, retries = [], []

    def on_progress(progress: pb.Progress) -> None:
        if progress.iteration == 3 and not relay.cuts:
            relay.cut()

    submitted = _submitted(job_server)
    with NSTClient(relay.target, timeout_s=300) as client:
        result = client.stylize(content, style, iterations=30, **TINY, on_progress=on_progress,
                                on_reattach=reattaches.append, on_retry=retries.append)
    assert relay.cuts == 1 and retries == []
    assert len(reattaches) == 1, reattaches
    reattach = reattaches[0]
    assert reattach.job_id == result.job_id and reattach.after >= 4          # JobAccepted, then 3 Progress
    assert reattach.error.code == grpc.StatusCode.UNAVAILABLE
    _check_one_uninterrupted_job(job_server, result, submitted, 30)
    with NSTClient(job_server.target, timeout_s=300, job_api=False) as plain:
        assert plain.stylize(content, style, iterations=30, **TINY).image_png == result.image_png
    print(f"\nstream cut after event {reattach.after}; reattached in {reattach.waited_s:.3f} s "
          f"({reattach.tries} WatchJob call(s)); one job, run once")


def test_async_stylize_reattaches_after_a_dropped_stream(job_server, relay, small_images):
    content, style = small_images
    reattaches = []

    async def on_progress(progress: pb.Progress) -> None:
        if progress.iteration == 2 and not relay.cuts:
            relay.cut()

    async def run():
        async with AsyncNSTClient(relay.target, timeout_s=300) as client:
            return await client.stylize(content, style, iterations=20, **TINY, on_progress=on_progress,
                                        on_reattach=reattaches.append)
    submitted = _submitted(job_server)
    result = asyncio.run(run())
    assert relay.cuts == 1 and len(reattaches) == 1 and reattaches[0].job_id == result.job_id
    _check_one_uninterrupted_job(job_server, result, submitted, 20)
    print(f"\nasyncio client: reattached after event {reattaches[0].after} in {reattaches[0].waited_s:.3f} s")


def test_nst_stylize_says_it_reattached(job_server, relay, small_images, tmp_path, capsys):
    """``nst stylize`` through the relay, cut once the server has run a few iterations: it prints that it
    reattached, writes the picture, and the server ran one job."""
    content, style = small_images
    (tmp_path / "c.png").write_bytes(content)
    (tmp_path / "s.png").write_bytes(style)
    iterations_before = job_server.metric("nst_iterations_total")

    def cut_mid_job() -> None:
        serving.wait_for(lambda: job_server.metric("nst_iterations_total") >= iterations_before + 3, 120, 0.02)
        relay.cut()
    cutter = threading.Thread(target=cut_mid_job)
    cutter.start()
    submitted = _submitted(job_server)
    code = nst_main(["stylize", str(tmp_path / "c.png"), str(tmp_path / "s.png"), "-o", str(tmp_path / "out.png"),
                     "--server", relay.target, "--size", "48", "--iterations", "40", "--seed", "5", "--scales", "1",
                     "--pyramid-levels", "1", "--quiet"])
    cutter.join(timeout=60)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert relay.cuts == 1 and "reattached to job" in captured.err, captured.err
    assert "sending the job again" not in captured.err and "attempts" not in captured.out
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")
    assert _submitted(job_server) == submitted + 1
    print("\n" + next(line for line in captured.err.splitlines() if "reattached" in line))


def test_cancelling_the_stylize_task_cancels_the_job(job_server, small_images):
    content, style = small_images

    async def run() -> str:
        seen: list[pb.Progress] = []
        async with AsyncNSTClient(job_server.target, timeout_s=300) as client:
            task = asyncio.create_task(client.stylize(content, style, iterations=2000, **TINY,
                                                      on_progress=seen.append))
            while len(seen) < 2:
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            (job,) = [j for j in await client.jobs() if j.state in (pb.JOB_STATE_CANCELLED, pb.JOB_STATE_RUNNING)
                      and j.max_iterations == 2000]
            return job.job_id
    job_id = asyncio.run(run())
    with NSTClient(job_server.target) as client:
        status = serving.wait_for(lambda: (s := client.job(job_id)).state == pb.JOB_STATE_CANCELLED and s, 30)
    assert status.iterations < 2000


# -- a server without the job API ------------------------------------------------------------------------------


class StylizeOnly(pb_grpc.StyleTransferServicer):
    """A server as it was before the job API: ``Stylize`` (relayed to a real nst-server); every other method
    UNIMPLEMENTED (the generated base class)."""

    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.stub = pb_grpc.StyleTransferStub(self.channel)
        self.calls = 0

    def Stylize(self, request, context):
        self.calls += 1
        call = self.stub.Stylize(request)
        context.add_callback(call.cancel)
        yield from call


@pytest.fixture()
def old_server(job_server):
    servicer = StylizeOnly(job_server.target)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_StyleTransferServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)
        servicer.channel.close()


def test_stylize_falls_back_to_the_stylize_stream_on_a_server_without_the_job_api(job_server, old_server,
                                                                                 small_images):
    target, servicer = old_server
    content, style = small_images
    submitted = _submitted(job_server)
    with NSTClient(target, timeout_s=300) as client:
        result = client.stylize(content, style, iterations=4, **TINY)
        with pytest.raises(NSTError) as error:
            client.submit(content, style, iterations=4, **TINY)
    assert error.value.code == grpc.StatusCode.UNIMPLEMENTED

    async def run():
        async with AsyncNSTClient(target, timeout_s=300) as client:
            return await client.stylize(content, style, iterations=4, **TINY)
    async_result = asyncio.run(run())
    assert servicer.calls == 2 and _submitted(job_server) == submitted         # no job-API job anywhere
    for one in (result, async_result):
        assert one.iterations == 4 and one.attempts == 1 and len(one.job_id) == 12      # a Stylize call's id
    assert result.image_png == async_result.image_png


# -- two named replicas behind one multi-address target ------------------------------------------------------


@pytest.fixture(scope="module")
def named_pair(onnx_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("named_pair")
    replicas = [serving.launch(onnx_path, folder / f"r{i}.log", [*SERVER_ARGS, "--replica-name", f"nst-{i}",
                                                                 "--state-dir", str(folder / f"state{i}")])
                for i in range(2)]
    try:
        for replica in replicas:
            serving.wait_listening(replica)
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


def _misrouted(replicas) -> float:
    """Calls about one job that reached a replica without it (NOT_FOUND), all replicas together."""
    return sum(r.metric("nst_rpcs_total", method=f"/nst.v1.StyleTransfer/{rpc}", code="NOT_FOUND")
               for r in replicas for rpc in JOB_RPCS)


def test_a_job_is_reached_through_the_fleet_target_on_the_replica_named_in_its_id(named_pair, small_images,
                                                                                  tmp_path, capsys):
    content, style = small_images
    fleet = "ipv4:" + ",".join(r.target for r in named_pair)
    misrouted = _misrouted(named_pair)
    with NSTClient(fleet, timeout_s=300) as submitter:
        replies = [submitter.submit(content, style, iterations=5 + i, request_id=f"fleet-{uuid.uuid4()}", **TINY)
                   for i in range(4)]
        # stylize through the same target: submitted to one replica, watched on it
        stylized = submitter.stylize(content, style, iterations=4, **TINY)
    owners = {job_owner(reply.job_id) for reply in replies}
    assert owners == {"nst-0", "nst-1"}, [r.job_id for r in replies]          # round robin used both
    assert job_owner(stylized.job_id) in owners and stylized.attempts == 1
    with NSTClient(fleet, timeout_s=300) as other:                  # another client, knowing nothing of them
        for i, reply in enumerate(replies):
            events = [e for e in other.watch(reply.job_id) if e.number]
            assert events[-1].state == pb.JOB_STATE_SUCCEEDED
            png = other.result(reply.job_id)
            assert png.startswith(b"\x89PNG") and other.job(reply.job_id).iterations == 5 + i
            owner = named_pair[int(job_owner(reply.job_id).rsplit("-", 1)[1])]
            with NSTClient(owner.target) as direct:
                assert direct.result(reply.job_id) == png
        long = other.submit(content, style, iterations=2000, **TINY)
    with NSTClient(fleet) as third:
        serving.wait_for(lambda: third.job(long.job_id).iterations >= 1, 60)
        assert third.cancel(long.job_id).job_id == long.job_id
        assert serving.wait_for(lambda: third.job(long.job_id).state == pb.JOB_STATE_CANCELLED, 30)
    # The CLI's watch and result take the same target.
    job_id = replies[0].job_id
    assert nst_main(["watch", job_id, "--server", fleet, "--quiet"]) == 0
    assert nst_main(["result", job_id, "-o", str(tmp_path / "r.png"), "--server", fleet]) == 0
    assert f"job {job_id} succeeded" in capsys.readouterr().out
    assert _misrouted(named_pair) == misrouted                  # no call about a job reached the other replica
    held = {}
    for replica in named_pair:
        with NSTClient(replica.target) as direct:
            held[replica.target] = {job.job_id for job in direct.jobs()}
        name = f"nst-{named_pair.index(replica)}"
        assert all(job_owner(job) == name for job in held[replica.target]) and held[replica.target]
    with NSTClient(fleet) as lister:                            # ListJobs through the fleet: every replica's jobs
        listed = [job.job_id for job in lister.jobs()]
    assert sorted(listed) == sorted(set().union(*held.values()))

    async def list_async() -> list[str]:
        async with AsyncNSTClient(fleet) as client:
            return [job.job_id for job in await client.jobs()]
    assert sorted(asyncio.run(list_async())) == sorted(listed)


def test_a_fleet_client_finds_a_job_again_after_its_replica_moved(named_pair, small_images):
    """The address remembered for an owner is forgotten after UNAVAILABLE and the owner looked for again."""
    content, style = small_images
    fleet = "ipv4:" + ",".join(r.target for r in named_pair)
    with NSTClient(fleet, timeout_s=300) as client:
        reply = client.submit(content, style, iterations=3, **TINY)
        key = job_owner(reply.job_id)
        serving.wait_for(lambda: client.job(reply.job_id).state == pb.JOB_STATE_SUCCEEDED, 60)
        client._routes[key] = "ipv4:127.0.0.1:1"                 # a stale address (nothing listens there)
        with pytest.raises(NSTError) as error:
            client.job(reply.job_id)
        assert error.value.code == grpc.StatusCode.UNAVAILABLE and key not in client._routes
        started = time.perf_counter()
        assert client.job(reply.job_id).state == pb.JOB_STATE_SUCCEEDED
        print(f"\nowner {key} found again in {time.perf_counter() - started:.3f} s")


def test_stylize_reattaches_to_its_replica_restarted_on_its_state_folder(onnx_path, small_images, tmp_path):
    """SIGKILL the server mid-job and start it again on the same port and --state-dir: stylize keeps reattaching
    (reattach_s 120) instead of sending the job again, and gets the job's result from the restarted process: one job,
    run twice by the server (runs 2), submitted once."""
    content, style = small_images
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [*SERVER_ARGS, "--port", str(port), "--state-dir", str(tmp_path / "state")]
    first = serving.start(onnx_path, tmp_path / "first.log", args)
    killed, reattaches, retries, outcome = threading.Event(), [], [], {}

    def on_progress(progress: pb.Progress) -> None:
        if progress.iteration == 3 and not killed.is_set():
            first.process.kill()
            first.process.wait(timeout=30)
            killed.set()

    def run() -> None:
        try:
            with NSTClient(f"127.0.0.1:{port}", timeout_s=300, reattach_s=120) as client:
                outcome["result"] = client.stylize(content, style, iterations=30, **TINY, on_progress=on_progress,
                                                   on_reattach=reattaches.append, on_retry=retries.append)
        except Exception as exc:                          # reported below
            outcome["error"] = exc
    thread = threading.Thread(target=run)
    thread.start()
    second = None
    try:
        assert killed.wait(timeout=120)
        started = time.perf_counter()
        second = serving.start(onnx_path, tmp_path / "second.log", args)
        thread.join(timeout=240)
        assert "error" not in outcome, outcome.get("error")
        result = outcome["result"]
        assert retries == [] and result.attempts == 1 and result.iterations == 30
        assert len(reattaches) == 1 and reattaches[0].job_id == result.job_id
        with NSTClient(second.target) as direct:
            (job,) = list(direct.jobs())
            assert job.job_id == result.job_id and job.runs == 2 and job.state == pb.JOB_STATE_SUCCEEDED
            assert direct.result(result.job_id) == result.image_png
        print(f"\nkilled after iteration 3; restarted and reattached after {reattaches[0].tries} tries, "
              f"{reattaches[0].waited_s:.1f} s after the break ({time.perf_counter() - started:.1f} s to the "
              f"result from the restart)")
    finally:
        thread.join(timeout=10)
        if second is not None:
            second.stop()
        first.stop()


def test_route_candidates_of_a_headless_dns_target_start_with_the_owners_pod():
    """Under ``dns:///NAME:PORT``, a job named ``POD.…`` is looked for at ``dns:///POD.NAME:PORT`` first (the
    StatefulSet pod's DNS name behind the headless Service), then at the addresses NAME resolves to; an address
    list is asked address by address; one server is never asked."""
    token = "0123456789abcdef" * 2
    with NSTClient("dns:///localhost:50051") as client:
        candidates = client._route_candidates(f"nst-server-1.{token}")
        assert candidates[0] == "dns:///nst-server-1.localhost:50051"
        assert set(candidates[1:]) <= {"ipv4:127.0.0.1:50051", "ipv6:[::1]:50051"} and len(candidates) > 1
        assert "dns:///nst-server-1.localhost:50051" not in client._route_candidates(token)    # no name: no pod
    with NSTClient("dns://8.8.8.8/nst-headless.nst.svc.cluster.local:50051") as client:
        assert client._route_candidates(f"nst-server-0.{token}")[0] == \
            "dns://8.8.8.8/nst-server-0.nst-headless.nst.svc.cluster.local:50051"
    with NSTClient("ipv4:127.0.0.1:5001,127.0.0.1:5002") as client:
        assert client._route_candidates(token) == ["ipv4:127.0.0.1:5001", "ipv4:127.0.0.1:5002"]
    with NSTClient("127.0.0.1:5001") as client:
        assert client._known_stub(token) is client._stub


def test_which_broken_streams_are_reattached():
    """A watch that ends with UNAVAILABLE, a reset, or its own deadline (a proxy's limit on a stream's length)
    before the call's deadline is watched again, with a backoff, for up to reattach_s; NOT_FOUND (the replica
    lost the job) and reattach_s without a message send the job again; a refused call and the call's own deadline
    end it."""
    from nst_client.client import _Attempts, _JobLost, _Reattaching

    def error(code: grpc.StatusCode) -> NSTError:
        return NSTError(code, code.name)
    state = _Reattaching("j", reattach_s=60.0, attempts=_Attempts(120.0, 2, 0.0))
    waits = [state.broke(error(code)) for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                                   grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)]
    assert waits == [0.1, 0.2, 0.4, 0.8] and state.tries == 4
    reattached = state.received(pb.JobEvent(number=7))
    assert (reattached.after, reattached.tries, reattached.error.code) == (0, 4, grpc.StatusCode.INTERNAL)
    assert state.after == 7 and state.received(pb.JobEvent(number=8)) is None and state.backoff_s == 0.1
    with pytest.raises(_JobLost):
        state.broke(error(grpc.StatusCode.NOT_FOUND))
    with pytest.raises(NSTError) as refused:
        state.broke(error(grpc.StatusCode.UNAUTHENTICATED))
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    impatient = _Reattaching("j", reattach_s=0.0, attempts=_Attempts(None, 2, 0.0))
    with pytest.raises(_JobLost) as lost:
        impatient.broke(error(grpc.StatusCode.UNAVAILABLE))
    assert lost.value.error.code == grpc.StatusCode.UNAVAILABLE
    late = _Reattaching("j", reattach_s=60.0, attempts=_Attempts(0.01, 2, 0.0))
    time.sleep(0.02)
    with pytest.raises(NSTError) as expired:
        late.broke(error(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert expired.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_job_cancelled_by_someone_else_ends_stylize_at_once_without_a_reattach(job_server, small_images):
    """Another client cancels the job stylize follows (CancelJob): stylize raises CANCELLED with the server's
    message as soon as the job's last event arrives; it neither reattaches nor sends the job again."""
    content, style = small_images
    reattaches, retries, cancelled = [], [], []

    def on_progress(progress: pb.Progress) -> None:
        if progress.iteration == 2 and not cancelled:
            with NSTClient(job_server.target) as other:
                (job,) = list(other.jobs(state="running"))
                cancelled.append(other.cancel(job.job_id).job_id)

    submitted = _submitted(job_server)
    with NSTClient(job_server.target, timeout_s=300) as client:
        started = time.perf_counter()
        with pytest.raises(NSTError) as error:
            client.stylize(content, style, iterations=2000, **TINY, on_progress=on_progress,
                           on_reattach=reattaches.append, on_retry=retries.append)
        took_s = time.perf_counter() - started
    assert error.value.code == grpc.StatusCode.CANCELLED and cancelled[0] in error.value.details
    assert reattaches == [] and retries == [] and _submitted(job_server) == submitted + 1
    assert took_s < 30, took_s
