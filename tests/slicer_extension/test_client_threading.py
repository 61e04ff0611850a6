"""Worker threading, timeouts, cancel and error messages against a deliberately slow HTTP server.

The "GUI" here is the test's own loop: it must keep ticking (poll every ~10 ms) while a request
is in flight, exactly as Slicer's QTimer would.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from DiffKT3DLib import worker
from DiffKT3DLib.client import (
    DiffKT3DClient,
    RequestsTransport,
    ServerError,
    ServerTimeout,
    ServerUnreachable,
    UrllibTransport,
)


class _SlowHandler(BaseHTTPRequestHandler):
    """/info/?delay=S sleeps S seconds then answers; /fail answers 422 with a detail message."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        url = urlsplit(self.path)
        delay = float(parse_qs(url.query).get("delay", ["0"])[0])
        if url.path == "/fail":
            self._send(422, {"detail": "case session-x, file PTV70.nii.gz: target PTV70 is empty"})
            return
        time.sleep(delay)
        self._send(200, {"models": {"dose": {}, "impute_ct": {}}, "slept": delay})

    def _send(self, status: int, body: dict):
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)


@pytest.fixture(scope="module")
def slow_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"  # host:port form on purpose
    server.shutdown()


TRANSPORTS = {"requests": RequestsTransport, "urllib": UrllibTransport}


def _client(url, transport, read_timeout_s=10.0):
    return DiffKT3DClient(url, small_timeout_s=read_timeout_s, transport=TRANSPORTS[transport]())


def _run_gui_loop(runner, job, timeout_s):
    """Poll like a QTimer until the job ends; return the longest single `poll()` call (s).

    What the GUI thread spends inside our code is what must stay short; the gaps between ticks
    also include the OS scheduler (this machine is shared), so they are not what we assert on.
    """
    worst = 0.0
    deadline = time.monotonic() + timeout_s
    while not job.finished:
        t0 = time.monotonic()
        runner.poll()
        worst = max(worst, time.monotonic() - t0)
        assert time.monotonic() < deadline, f"{job.description} did not finish in {timeout_s} s"
        time.sleep(0.01)
    return worst


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_slow_request_never_blocks_the_gui_loop(slow_server, transport):
    client = _client(slow_server, transport)
    runner = worker.ThreadRunner()
    got = []
    t0 = time.monotonic()
    job = runner.submit(lambda ctx: client._json(client._call("GET", "/info/", query={"delay": 1.0}), "/"),
                        description="slow info", on_done=got.append)
    submit_s = time.monotonic() - t0
    worst_poll = _run_gui_loop(runner, job, timeout_s=10)
    elapsed = time.monotonic() - t0
    # a blocking call would take >= 1 s inside submit or poll; ours are queue operations
    assert submit_s < 0.1, f"submit took {submit_s:.3f} s"
    assert worst_poll < 0.1, f"a poll() took {worst_poll:.3f} s"
    assert 0.9 < elapsed < 5.0
    assert job.state == "done" and got[0]["slept"] == 1.0
    runner.shutdown()


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_read_timeout_reports_an_error_in_time(slow_server, transport):
    client = _client(slow_server, transport, read_timeout_s=0.5)
    runner = worker.ThreadRunner()
    errors = []
    t0 = time.monotonic()
    job = runner.submit(lambda ctx: client._call("GET", "/info/", query={"delay": 3.0}),
                        description="timeout", on_error=errors.append, on_done=lambda r: pytest.fail("done?"))
    worst_poll = _run_gui_loop(runner, job, timeout_s=5)
    elapsed = time.monotonic() - t0
    assert job.state == "failed" and isinstance(errors[0], ServerTimeout)
    assert "read 0.5 s" in str(errors[0]) and "/info/" in str(errors[0])
    assert 0.4 < elapsed < 2.5, f"timeout surfaced after {elapsed:.2f} s"
    assert worst_poll < 0.1


def test_cancel_frees_the_gui_at_once_and_drops_the_late_result(slow_server):
    client = _client(slow_server, "requests")
    runner = worker.ThreadRunner()
    events = []
    job = runner.submit(lambda ctx: client._call("GET", "/info/", query={"delay": 1.5}, cancel=ctx),
                        description="cancel me", on_done=lambda r: events.append("done"),
                        on_error=lambda e: events.append(f"error {e}"), on_cancel=lambda: events.append("cancelled"))
    time.sleep(0.2)
    assert job.state == "running"
    t0 = time.monotonic()
    runner.cancel(job)
    runner.poll()
    assert events == ["cancelled"] and time.monotonic() - t0 < 0.1
    assert not runner.busy
    time.sleep(2.0)  # the server answers meanwhile; the answer must be dropped
    runner.poll()
    assert events == ["cancelled"] and job.state == "cancelled"


def test_job_sees_cancel_and_reports_progress():
    runner = worker.ThreadRunner()
    progress, events = [], []
    started = threading.Event()

    def work(ctx):
        ctx.progress(0.5, "half way")
        started.set()
        while True:
            ctx.check_cancelled()
            time.sleep(0.01)

    job = runner.submit(work, on_progress=lambda f, m: progress.append((f, m)),
                        on_cancel=lambda: events.append("cancelled"))
    assert started.wait(2)
    runner.poll()
    assert progress == [(0.5, "half way")]
    runner.cancel(job)
    runner.poll()
    assert events == ["cancelled"]


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_server_detail_message_reaches_the_user(slow_server, transport):
    client = _client(slow_server, transport)
    with pytest.raises(ServerError) as err:
        client._call("GET", "/fail")
    assert err.value.status == 422
    assert "target PTV70 is empty" in str(err.value) and "422" in str(err.value)


def test_unreachable_server_is_a_clear_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = DiffKT3DClient(f"127.0.0.1:{port}", connect_timeout_s=1.0)
    with pytest.raises(ServerUnreachable, match=f"cannot reach the server at http://127.0.0.1:{port}"):
        client.info()


def test_errors_in_result_handling_go_to_on_error():
    runner = worker.InlineRunner()
    errors = []

    def bad_done(result):
        raise ValueError("the server sent no dose for candidate c1")

    job = runner.submit(lambda ctx: 1, on_done=bad_done, on_error=errors.append)
    runner.poll()
    assert job.state == "failed" and "no dose for candidate c1" in str(errors[0])


def test_quick_job_is_not_stuck_behind_a_long_one_and_queued_cancel_never_runs():
    runner = worker.ThreadRunner(workers=2)
    release = threading.Event()
    ran, done = [], []
    long_job = runner.submit(lambda ctx: release.wait(10), description="long", on_done=lambda r: done.append("long"))
    quick = runner.submit(lambda ctx: ran.append("quick") or "q", description="quick", on_done=done.append)
    worker.wait_for(runner, quick, 5)
    assert done == ["q"] and not long_job.finished  # the second worker served it
    # both workers busy -> the next job waits in the queue; cancelled there, it never runs
    blocker = runner.submit(lambda ctx: release.wait(10), description="blocker")
    queued = runner.submit(lambda ctx: ran.append("queued"), description="queued",
                           on_cancel=lambda: done.append("queued cancelled"))
    runner.cancel(queued)
    runner.poll()
    release.set()
    worker.wait_for(runner, long_job, 5)
    worker.wait_for(runner, blocker, 5)
    time.sleep(0.2)
    runner.poll()
    assert "queued" not in ran and "queued cancelled" in done
    runner.shutdown()
