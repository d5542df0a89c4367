"""Python client of the ``nst.v1.StyleTransfer`` gRPC API on ``grpc.aio`` (asyncio): :class:`AsyncNSTClient`.

It is :class:`nst_client.NSTClient` with coroutines: the same arguments, methods, results
(:class:`~nst_client.StylizeResult`) and errors (:class:`~nst_client.NSTError`, with the same ``code``,
``details`` and ``field_violations``), built from the same helpers (connection settings, resend policy, the
reader that assembles a result from the stream). Many jobs can run at once on one client::

    async with AsyncNSTClient("127.0.0.1:50051", timeout_s=300) as client:
        results = await asyncio.gather(client.stylize(c1, s, max_side_px=256),
                                       client.stylize(c2, s, StylizeOptions(iterations=100)))
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from nst_proto.v1 import style_transfer_pb2 as pb
from nst_client.client import (CANCEL_S, ROUTE_PROBE_S, SUBMIT_S, NSTError, Reattach, Retry, StylizeResult, _Attempts,
                               _capped, _Client, _health_status_name, _JobLost, _JobReader, _not_serving,
                               _Reattaching, _unreachable, check_timeout, job_state, submit_request)
from nst_client.options import Image, StylizeOptions, StylizeOverrides, build_request

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from typing import Unpack
    else:
        from typing_extensions import Unpack

async def _call(callback: Callable | None, argument) -> None:
    if callback is not None:
        outcome = callback(argument)
        if inspect.isawaitable(outcome):
            await outcome


class AsyncNSTClient(_Client):
    """An asyncio channel to one server or to many replicas; use as ``async with``, or ``await close()``.

    The arguments are :class:`nst_client.NSTClient`'s, with the same meaning: TLS (``tls``, ``tls_ca``,
    ``tls_server_name``), the bearer ``token`` sent as metadata on every call, round robin and gRPC retries of
    refusals for balanced targets (``balance``), resubmission of jobs whose stream broke after ``JobAccepted``
    (``max_resubmits``), resending of refused jobs (``busy_retry_s``), keepalive, ``channel_options``, the
    default deadline of :meth:`stylize` (``timeout_s``, all attempts together), reattaching (``reattach_s``) and
    the job API (``job_api``).

    What differs from the synchronous client:

    * Create it inside the event loop that uses it (a ``grpc.aio`` channel belongs to one loop), and close it
      with ``await client.close()`` or ``async with``.
    * Every method is a coroutine, except :meth:`stream`, an async generator.
    * :meth:`stylize`'s callbacks may be plain functions or coroutine functions (then awaited, which holds the
      stream: keep them short).
    * Image file paths are read on the event loop's thread (pass bytes to keep large reads off it).

    Raises:
        OSError: ``tls_ca`` names a file that cannot be read. ValueError: a target in none of the forms
            :class:`~nst_client.NSTClient` takes (``::1:50051``: write ``[::1]:50051``; no port), a number out of
            its range (NaN, negative ``max_resubmits`` or ``busy_retry_s``, a keepalive time under 1 s, a
            ``timeout_s`` of 0), or a token with characters a header cannot hold; the message names the argument.
    """

    _channels = grpc.aio

    async def __aenter__(self) -> "AsyncNSTClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self, grace_s: float | None = None) -> None:
        """Close the channel; calls still in flight are cancelled (after ``grace_s`` seconds, if given)."""
        for channel in self._route_channels:
            await channel.close(grace_s)
        await self._channel.close(grace_s)

    async def health(self, service: str = "", timeout_s: float | None = 5.0) -> str:
        """The server's health status name (``SERVING``, ``NOT_SERVING`` …); ``timeout_s`` > 0 s (None or inf:
        no deadline). Raises :class:`NSTError`; ValueError for a ``timeout_s`` out of range."""
        timeout = check_timeout(timeout_s)
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                             metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error) from None
        return _health_status_name(reply)

    async def wait_until_serving(self, timeout_s: float | None = 120.0) -> None:
        """Wait until health is SERVING; ``timeout_s`` > 0 s (None or inf: no limit).

        Raises:
            NSTError: DEADLINE_EXCEEDED after ``timeout_s``. ValueError: ``timeout_s`` out of range.
        """
        limit = check_timeout(timeout_s)
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        while True:
            try:
                wait = None if deadline is None else max(0.1, deadline - loop.time())
                await asyncio.wait_for(self._channel.channel_ready(), timeout=wait)
                if await self.health() == "SERVING":
                    return
            except (NSTError, asyncio.TimeoutError):
                pass
            if deadline is not None and loop.time() >= deadline:
                raise _not_serving(self.target, limit, self.proxy)
            await asyncio.sleep(0.2)

    async def model_info(self, timeout_s: float | None = 5.0) -> pb.ModelInfo:
        """``GetModelInfo``; ``timeout_s`` > 0 s (None or inf: no deadline). Raises :class:`NSTError`; ValueError
        for a ``timeout_s`` out of range."""
        timeout = check_timeout(timeout_s)
        try:
            return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout,
                                                 metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error) from None

    async def stream(self, request: pb.StylizeRequest,
                     timeout_s: float | None = None) -> AsyncIterator[pb.StylizeResponse]:
        """The raw response stream of one job, an async generator (``async for message in client.stream(r)``).

        Leaving it early cancels the job on the server: ``break`` (the generator is closed when it is dropped,
        within an event loop turn), ``await stream.aclose()`` (at once; ``contextlib.aclosing`` does it), or the
        reading task being cancelled.

        Raises:
            NSTError: the call failed (status code, the server's message and field violations). ValueError:
                ``timeout_s`` out of range (as the client's).
        """
        call = self._stub.Stylize(request, timeout=self._timeout(timeout_s), metadata=self._metadata)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            call.cancel()

    async def stylize(self, content: Image, style: Image | None, options: StylizeOptions | None = None, *,
                      styles: Sequence[tuple[Image, float]] | None = None, init_image: Image | None = None,
                      on_progress: Callable[[pb.Progress], None | Awaitable[None]] | None = None,
                      on_heartbeat: Callable[[pb.Heartbeat], None | Awaitable[None]] | None = None,
                      on_retry: Callable[[Retry], None | Awaitable[None]] | None = None,
                      on_reattach: Callable[[Reattach], None | Awaitable[None]] | None = None,
                      timeout_s: float | None = None, **overrides: Unpack[StylizeOverrides]) -> StylizeResult:
        """Run one job to completion, as :meth:`nst_client.NSTClient.stylize` does (same arguments, the job API
        with reattaching where the server has it, the ``Stylize`` stream where it does not, same resend rules,
        same result).

        Cancelling the task that awaits it cancels the job on the server (``CancelJob``).

        Args:
            content, style: encoded image bytes or file paths (``style`` may be None when ``styles`` is given).
            options: the job's controls (:class:`StylizeOptions`); None: the server's defaults.
            styles: more style images with their relative blend weights.
            init_image: the initial image for ``init="image"``.
            on_progress, on_heartbeat, on_retry, on_reattach: called with each ``nst.v1.Progress``, each
                ``nst.v1.Heartbeat``, a :class:`Retry` before each new attempt, a :class:`~nst_client.Reattach`
                when a broken stream was reattached; coroutine functions are awaited.
            timeout_s: deadline for the whole job, all attempts together, seconds, > 0 (None: the client's
                ``timeout_s``; ``math.inf`` or more than :data:`~nst_client.client.MAX_TIMEOUT_S`: none).
            **overrides: :class:`StylizeOptions` fields applied over ``options``.
        Raises:
            NSTError: the server refused or failed the job, the deadline passed, or the last attempt's stream
                broke. TypeError: an override names no option (before anything is sent), or a value of the wrong
                type. ValueError: a value out of its proto type's range or an unknown enum value. OSError: an image
                cannot be read.
        """
        request = build_request(content, style, options, styles=styles, init_image=init_image, **overrides)
        attempts = _Attempts(timeout_s if timeout_s is not None else self.timeout_s, self.max_resubmits,
                             self.busy_retry_s)
        if not self.job_api:
            return await self._stylize_stream(request, attempts, _JobReader(1, on_progress, on_heartbeat),
                                              on_progress, on_heartbeat, on_retry)
        submission = submit_request(request, None)          # one request_id for every attempt of this call
        while True:
            reader = _JobReader(attempts.attempt, on_progress, on_heartbeat)
            try:
                reply = await self._unary(self._stub.SubmitJob, submission,
                                          _capped(attempts.remaining_s(), SUBMIT_S))
            except NSTError as error:
                if error.code == grpc.StatusCode.UNIMPLEMENTED:       # a server without the job API
                    return await self._stylize_stream(request, attempts, reader, on_progress, on_heartbeat,
                                                      on_retry)
                retry = attempts.retry(error, accepted=False)
                if retry is None:
                    raise
                await _call(on_retry, retry)
                await asyncio.sleep(retry.wait_s)
                continue
            try:
                await self._follow(reply.job_id, reader, attempts, on_reattach)
                return reader.result()
            except _JobLost as lost:
                retry = attempts.retry(lost.error, accepted=True, lost=True)
                if retry is None:
                    raise lost.error from None
                await _call(on_retry, retry)
                await asyncio.sleep(retry.wait_s)
            except BaseException:
                if not reader.ended:          # the caller gave up (deadline, callback, task cancelled)
                    await asyncio.shield(self._cancel_quietly(reply.job_id))
                raise

    async def _follow(self, job_id: str, reader: _JobReader, attempts: _Attempts, on_reattach) -> None:
        """Watch ``job_id`` into ``reader`` until its result, reattaching after breaks, as NSTClient's."""
        state = _Reattaching(job_id, self.reattach_s, attempts)
        while True:
            try:
                stub = await self._job_stub(job_id)
            except NSTError as routing_error:                # its replica did not answer
                await asyncio.sleep(state.broke(routing_error))
                continue
            try:
                call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after=state.after),
                                     timeout=attempts.remaining_s(), metadata=self._metadata)
                try:
                    async for event in call:
                        reattached = state.received(event)
                        if reattached is not None:
                            await _call(on_reattach, reattached)
                        outcome = reader.feed_event(event)       # NSTError: the job failed or was cancelled
                        if inspect.isawaitable(outcome):
                            await outcome
                finally:
                    call.cancel()
                if reader.ended:
                    return
                error = NSTError(grpc.StatusCode.UNAVAILABLE, f"the watch of job {job_id} ended before the job did")
            except grpc.RpcError as rpc_error:
                error = self._error(rpc_error)
            if error.code == grpc.StatusCode.UNAVAILABLE:
                self._forget_route(job_id)
            await asyncio.sleep(state.broke(error))

    async def _job_stub(self, job_id: str):
        """The stub for the calls about ``job_id``, as NSTClient's: on a fleet, its replica's."""
        stub = self._known_stub(job_id)
        if stub is not None:
            return stub
        unreachable: list[str] = []
        for target in await asyncio.to_thread(self._route_candidates, job_id):
            candidate = self._route_stub(target)
            try:
                await candidate.GetJob(pb.GetJobRequest(job_id=job_id), timeout=ROUTE_PROBE_S,
                                       metadata=self._metadata)
            except grpc.RpcError as error:
                if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise self._error(error) from None
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    unreachable.append(target)
                continue
            self._routed(job_id, target)
            return candidate
        if unreachable:                   # the job may be on one of them: not "not found"
            raise _unreachable(job_id, unreachable)
        return self._stub

    async def _cancel_quietly(self, job_id: str) -> None:
        try:
            await self.cancel(job_id, timeout_s=CANCEL_S)
        except (NSTError, ValueError):
            pass

    async def _stylize_stream(self, request: pb.StylizeRequest, attempts: _Attempts, reader: _JobReader,
                              on_progress, on_heartbeat, on_retry) -> StylizeResult:
        """:meth:`stylize` over the ``Stylize`` stream (servers without the job API)."""
        while True:
            try:
                # Read to the end of the stream, past the Result (leaving early would cancel the call, and the
                # server would count a delivered job as cancelled); closed at once if a callback raises.
                async with contextlib.aclosing(self.stream(request, timeout_s=attempts.remaining_s())) as stream:
                    async for message in stream:
                        outcome = reader.feed(message)
                        if inspect.isawaitable(outcome):
                            await outcome
                return reader.result()
            except NSTError as error:
                retry = attempts.retry(error, accepted=reader.accepted is not None)
                if retry is None:
                    raise
                await _call(on_retry, retry)
                await asyncio.sleep(retry.wait_s)
                reader = _JobReader(attempts.attempt, on_progress, on_heartbeat)

    # -- the job API, as NSTClient's (same arguments, results and errors) ------------------------------------------

    async def _unary(self, method, request, timeout_s: float | None):
        try:
            return await method(request, timeout=check_timeout(timeout_s), metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error) from None

    async def submit(self, content: Image, style: Image | None, options: StylizeOptions | None = None, *,
                     request_id: str | None = None, styles: Sequence[tuple[Image, float]] | None = None,
                     init_image: Image | None = None, timeout_s: float | None = 60.0,
                     **overrides: Unpack[StylizeOverrides]) -> pb.SubmitJobResponse:
        """``SubmitJob``, as :meth:`nst_client.NSTClient.submit`."""
        request = build_request(content, style, options, styles=styles, init_image=init_image, **overrides)
        return await self._unary(self._stub.SubmitJob, submit_request(request, request_id), timeout_s)

    async def watch(self, job_id: str, after: int = 0,
                    timeout_s: float | None = None) -> AsyncIterator[pb.JobEvent]:
        """``WatchJob``, an async generator, as :meth:`nst_client.NSTClient.watch`; leaving it leaves the job
        running."""
        timeout = check_timeout(timeout_s)
        call = (await self._job_stub(job_id)).WatchJob(pb.WatchJobRequest(job_id=job_id, after=after),
                                                       timeout=timeout, metadata=self._metadata)
        try:
            async for event in call:
                yield event
        except grpc.RpcError as error:
            raise self._job_error(job_id, error) from None
        finally:
            call.cancel()

    async def _job_unary(self, method: str, job_id: str, request, timeout_s: float | None):
        timeout = check_timeout(timeout_s)
        try:
            return await getattr(await self._job_stub(job_id), method)(request, timeout=timeout,
                                                                       metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._job_error(job_id, error) from None

    def _job_error(self, job_id: str, error: grpc.RpcError) -> NSTError:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            self._forget_route(job_id)
        return self._error(error)

    async def job(self, job_id: str, timeout_s: float | None = 30.0) -> pb.JobStatus:
        """``GetJob``, as :meth:`nst_client.NSTClient.job`."""
        return await self._job_unary("GetJob", job_id, pb.GetJobRequest(job_id=job_id), timeout_s)

    async def result(self, job_id: str, timeout_s: float | None = None) -> bytes:
        """``GetJobResult``, the PNG's chunks joined, as :meth:`nst_client.NSTClient.result`."""
        timeout = check_timeout(timeout_s)
        call = (await self._job_stub(job_id)).GetJobResult(pb.GetJobResultRequest(job_id=job_id), timeout=timeout,
                                                           metadata=self._metadata)
        try:
            return b"".join([chunk.data async for chunk in call])
        except grpc.RpcError as error:
            raise self._job_error(job_id, error) from None

    async def cancel(self, job_id: str, timeout_s: float | None = 30.0) -> pb.JobStatus:
        """``CancelJob``, as :meth:`nst_client.NSTClient.cancel`."""
        return await self._job_unary("CancelJob", job_id, pb.CancelJobRequest(job_id=job_id), timeout_s)

    async def jobs(self, state: str | int | None = None, page_size: int = 0,
                   timeout_s: float | None = 30.0) -> list[pb.JobStatus]:
        """``ListJobs``, every page (of every replica), as :meth:`nst_client.NSTClient.jobs` (a list here)."""
        number = job_state(state)
        targets = await asyncio.to_thread(self._route_candidates, "") if self.balanced else []
        stubs = [self._route_stub(target) for target in targets] or [self._stub]   # channels: on the loop's thread
        found: list[pb.JobStatus] = []
        unreachable: list[NSTError] = []
        for stub in stubs:
            request = pb.ListJobsRequest(page_size=page_size, state=number)
            try:
                while True:
                    page = await self._unary(stub.ListJobs, request, timeout_s)
                    found.extend(page.jobs)
                    if not page.next_page_token:
                        break
                    request.page_token = page.next_page_token
            except NSTError as error:
                if len(stubs) == 1 or error.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                unreachable.append(error)
        if len(unreachable) == len(stubs):
            raise unreachable[0]
        return found
