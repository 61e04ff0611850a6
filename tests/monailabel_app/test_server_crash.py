"""Preference records survive `kill -9` of the server in the middle of a stream of writes."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests
from server_process import start_server, stop_server

from diffkt3d.preferences import ServedCandidates  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _record(i: int, writer: int) -> dict:
    return {"case_id": "session-1", "chosen_id": "b", "rater": f"w{writer}", "comment": f"{writer}:{i}",
            "candidates": [{"id": "a", "seed": 0, "model_version": "m"}, {"id": "b", "seed": 1, "model_version": "m"}]}


def test_kill_minus_nine_mid_write_then_restart(tmp_path):
    pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")
    studies = tmp_path / "studies"
    studies.mkdir()
    conf = {"state_dir": str(tmp_path / "state"), "model_dir": str(tmp_path / "model")}
    # the case of the records, as if the server had served its candidates in a session earlier
    ServedCandidates(tmp_path / "state" / "preferences").add("session-1", "r0", ["a", "b"])
    proc, url = start_server(tmp_path, studies, conf)
    acked: list[str] = []  # comments of records the server confirmed with 201
    lock = threading.Lock()
    stop = threading.Event()

    def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                r = requests.post(f"{url}/diffkt3d/preferences", json=_record(i, w), timeout=10)
            except requests.RequestException:
                return  # the server is gone
            if r.status_code == 201:
                with lock:
                    acked.append(f"{w}:{i}")
            i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(4.0)
    stop_server(proc, signal.SIGKILL)  # kill -9 the whole server while writes are in flight
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acked) > 10, "too few writes before the kill to test anything"

    proc, url = start_server(tmp_path, studies, conf)
    try:
        got = requests.get(f"{url}/diffkt3d/preferences", timeout=30).json()
    finally:
        stop_server(proc)
    stored = [r["comment"] for r in got["records"]]
    assert got["skipped_lines"] == []  # no partial record on disk
    assert set(acked) <= set(stored)  # every acknowledged record survived
    assert len(stored) == len(set(stored)) and len(stored) <= len(acked) + 4  # at most one unacked per writer
