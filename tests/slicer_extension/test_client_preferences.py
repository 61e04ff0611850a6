"""The client sends every preference with its own record_id, and resends the same id when the first
answer is lost to a timeout, so the server stores the choice once."""

from __future__ import annotations

import json

from DiffKT3DLib.client import DiffKT3DClient, ServerTimeout, _Response

RECORD = {"case_id": "pt_201", "chosen_id": "c0", "rater": "dr",
          "candidates": [{"id": "c0", "seed": 0, "model_version": "m"}, {"id": "c1", "seed": 1, "model_version": "m"}]}


class _LosesFirstAnswer:
    """A transport whose first POST times out (the server may have stored it), later ones answer."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    def request(self, method, url, *, query, json_body, form, files, timeout, cancel, headers=None):
        self.bodies.append(json_body)
        if len(self.bodies) == 1:
            raise ServerTimeout("no answer in time")
        body = json.dumps({"record": {**json_body, "time_utc": "t"}}).encode()
        return _Response(200, {"content-type": "application/json"}, body)


def test_a_timed_out_preference_is_resent_with_the_same_record_id():
    transport = _LosesFirstAnswer()
    client = DiffKT3DClient("127.0.0.1:1", transport=transport)
    stored = client.record_preference(dict(RECORD))
    first, second = transport.bodies
    assert len(first["record_id"]) == 32 and first == second  # the retry is the same write
    assert stored["record_id"] == first["record_id"]
    # a new choice gets a new id; an id the caller chose is kept
    client.record_preference(dict(RECORD))
    assert transport.bodies[2]["record_id"] != first["record_id"]
    client.record_preference({**RECORD, "record_id": "mine-0123456789abcdef"})
    assert transport.bodies[3]["record_id"] == "mine-0123456789abcdef"
