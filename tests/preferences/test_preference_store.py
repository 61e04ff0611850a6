"""Preference records and the append-only store: validation, concurrency, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from diffkt3d.preferences import SCHEMA_VERSION, PreferenceRecord, PreferenceStore


def _payload(case_id: str = "pt_201", chosen: str = "c1-seed1", rater: str = "dr_a", **extra) -> dict:
    return {"case_id": case_id, "chosen_id": chosen, "rater": rater,
            "candidates": [{"id": "c0-seed0", "seed": 0, "model_version": "m@1", "scorecard_total": 80.0,
                            "scorecard_items": {"PTV70 D95%": 9.0}},
                           {"id": "c1-seed1", "seed": 1, "model_version": "m@1"}], **extra}


# -- record --------------------------------------------------------------------------------------
def test_record_roundtrip_and_server_fields():
    rec = PreferenceRecord.from_dict({**_payload(comment="ok"), "time_utc": "1999", "schema_version": 99}, new=True)
    assert rec.time_utc != "1999" and rec.schema_version == SCHEMA_VERSION and len(rec.record_id) == 32
    # the client may choose the record id (its idempotency key), which is kept
    key = "a" * 16 + "-retry_1"
    assert PreferenceRecord.from_dict({**_payload(), "record_id": key}, new=True).record_id == key
    back = PreferenceRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back == rec
    assert back.rejected_ids == ["c0-seed0"]


@pytest.mark.parametrize("change, message", [
    ({"chosen_id": "c9"}, "not one of the candidates"),
    ({"case_id": "../etc"}, "not a valid id"),
    ({"case_id": "a/b"}, "not a valid id"),
    ({"rater": ""}, "rater"),
    ({"candidates": [{"id": "c0", "seed": 0, "model_version": "m"}]}, "at least 2"),
    ({"candidates": [{"id": "c0", "seed": 0, "model_version": "m"}] * 2, "chosen_id": "c0"}, "unique"),
    ({"candidates": [{"id": "c0", "seed": -1, "model_version": "m"}, {"id": "c1", "seed": 1, "model_version": "m"}],
      "chosen_id": "c0"}, "seed"),
    ({"colour": "red"}, "unknown fields"),
    ({"record_id": "short"}, "record_id must be 16-64"),
    ({"record_id": "../../" + "a" * 20}, "record_id must be 16-64"),
    ({"external": "yes"}, "external must be true or false"),
])
def test_record_rejects_bad_input(change, message):
    with pytest.raises(ValueError, match=message):
        PreferenceRecord.from_dict({**_payload(), **change}, new=True)


def test_record_missing_field_named():
    p = _payload()
    del p["rater"]
    with pytest.raises(ValueError, match="'rater'"):
        PreferenceRecord.from_dict(p, new=True)


# -- store ---------------------------------------------------------------------------------------
def test_append_and_query(tmp_path):
    store = PreferenceStore(tmp_path)
    store.append(PreferenceRecord.from_dict(_payload("pt_201", rater="a"), new=True))
    store.append(PreferenceRecord.from_dict(_payload("pt_202", rater="b"), new=True))
    assert [r.case_id for r in store.read().records] == ["pt_201", "pt_202"]
    assert [r.case_id for r in store.query(rater="b")] == ["pt_202"]
    assert store.labelled_cases(rater="a") == {"pt_201"}
    # the file is plain JSONL, one complete object per line
    lines = (tmp_path / "preferences.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["schema_version"] == SCHEMA_VERSION for line in lines)


_WRITER_SCRIPT = """
import sys
from diffkt3d.preferences import PreferenceRecord, PreferenceStore
root, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = PreferenceStore(root)
for i in range(n):
    store.append(PreferenceRecord.from_dict({"case_id": f"case{worker}", "chosen_id": "a", "rater": f"w{worker}",
        "comment": f"{worker}-{i}-" + "x" * 500,
        "candidates": [{"id": "a", "seed": 0, "model_version": "m"}, {"id": "b", "seed": 1, "model_version": "m"}]},
        new=True))
"""


def test_eight_writer_processes_fifty_records_each(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER_SCRIPT, str(tmp_path), str(w), "50"])
             for w in range(8)]
    for p in procs:
        assert p.wait(timeout=180) == 0
    result = PreferenceStore(tmp_path).read()
    assert result.skipped == []
    assert len(result.records) == 400
    # every (worker, i) exactly once, and each worker's records in its own order
    keys = [tuple(r.comment.split("-")[:2]) for r in result.records]
    assert len(set(keys)) == 400
    for w in range(8):
        mine = [int(i) for ww, i in keys if ww == str(w)]
        assert mine == list(range(50))


_KILL_SCRIPT = """
import sys
from diffkt3d.preferences import PreferenceRecord, PreferenceStore
store = PreferenceStore(sys.argv[1])
i = 0
while True:
    store.append(PreferenceRecord.from_dict({"case_id": "pt_201", "chosen_id": "a", "rater": "k",
        "comment": str(i) + "y" * 1500,
        "candidates": [{"id": "a", "seed": 0, "model_version": "m"}, {"id": "b", "seed": 1, "model_version": "m"}]},
        new=True))
    i += 1
    if i == 5:
        print("ready", flush=True)
"""


def test_kill_minus_nine_mid_writing_leaves_a_readable_store(tmp_path):
    for attempt in range(3):
        root = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(root)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.2 + 0.1 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raw = (root / "preferences.jsonl").read_bytes()
        result = PreferenceStore(root).read()
        assert result.skipped == []
        # every line on disk is a complete record, numbered 0..n-1 without gaps
        assert raw.endswith(b"\n") and len(result.records) == raw.count(b"\n") >= 5
        assert [int(r.comment.split("y")[0]) for r in result.records] == list(range(len(result.records)))
        # and the store keeps working after the crash
        PreferenceStore(root).append(PreferenceRecord.from_dict(_payload(), new=True))
        assert len(PreferenceStore(root).read().records) == len(result.records) + 1


def test_torn_last_line_is_skipped_and_never_swallows_the_next_record(tmp_path):
    store = PreferenceStore(tmp_path)
    store.append(PreferenceRecord.from_dict(_payload("pt_201"), new=True))
    good = (tmp_path / "preferences.jsonl").read_bytes()
    # simulate a power loss in the middle of the second record: half a line, no newline
    second = json.dumps(PreferenceRecord.from_dict(_payload("pt_202"), new=True).to_dict()).encode()
    (tmp_path / "preferences.jsonl").write_bytes(good + second[: len(second) // 2])
    result = store.read()
    assert [r.case_id for r in result.records] == ["pt_201"]
    assert len(result.skipped) == 1 and "torn" in result.skipped[0][1]
    store.append(PreferenceRecord.from_dict(_payload("pt_203"), new=True))
    result = store.read()
    assert [r.case_id for r in result.records] == ["pt_201", "pt_203"]
    assert len(result.skipped) == 1 and "invalid" in result.skipped[0][1]


def test_store_rejects_nothing_silently_on_bad_lines(tmp_path):
    (tmp_path / "preferences.jsonl").write_text('{"case_id": "x"}\nnot json\n')
    result = PreferenceStore(tmp_path).read()
    assert result.records == [] and [n for n, _ in result.skipped] == [1, 2]
