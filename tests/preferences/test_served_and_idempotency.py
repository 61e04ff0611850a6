"""A retried preference is stored once; a reused record id with other content is refused; a record
must be about a known case and candidates the server served (unless it says it is external)."""

from __future__ import annotations

import pytest

from diffkt3d.preferences import (
    PreferenceRecord,
    PreferenceStore,
    RecordIdConflict,
    ServedCandidates,
    UnknownCaseError,
    UnservedCandidatesError,
)

KEY = "0123456789abcdef0123456789abcdef"


def _record(case_id: str = "pt_201", chosen: str = "c1-seed1", **extra) -> PreferenceRecord:
    return PreferenceRecord.from_dict({"case_id": case_id, "chosen_id": chosen, "rater": "dr_a",
                                       "candidates": [{"id": "c0-seed0", "seed": 0, "model_version": "m"},
                                                      {"id": "c1-seed1", "seed": 1, "model_version": "m"}],
                                       **extra}, new=True)


def test_a_retried_record_id_returns_the_stored_record(tmp_path):
    store = PreferenceStore(tmp_path)
    first, created = store.add_once(_record(record_id=KEY))
    again, created_again = store.add_once(_record(record_id=KEY))  # the client's retry, a moment later
    assert created and not created_again
    assert again == first and len(store.read().records) == 1


def test_a_reused_record_id_with_other_content_is_a_conflict(tmp_path):
    store = PreferenceStore(tmp_path)
    store.add_once(_record(record_id=KEY))
    with pytest.raises(RecordIdConflict, match="different content"):
        store.add_once(_record(chosen="c0-seed0", record_id=KEY))
    assert [r.chosen_id for r in store.read().records] == ["c1-seed1"]
    # without a client id every write is a new record
    store.add_once(_record())
    store.add_once(_record())
    assert len(store.read().records) == 3


def test_served_registry_vouches_for_cases_and_candidates(tmp_path):
    served = ServedCandidates(tmp_path)
    assert served.served_ids("pt_201") is None
    served.add("pt_201", "r1", ["c0-seed0", "c1-seed1"])
    served.add("session-abc", "r2", ["c0-seed0", "c1-seed1"])
    assert ServedCandidates(tmp_path).served_ids("pt_201") == {"c0-seed0", "c1-seed1"}  # persisted
    served.check(_record(), in_datastore=True)
    served.check(_record("session-abc"), in_datastore=False)
    with pytest.raises(UnknownCaseError, match="'session-zzz' is not in the datastore"):
        served.check(_record("session-zzz"), in_datastore=False)
    with pytest.raises(UnservedCandidatesError, match=r"candidates \['c0-seed0', 'c1-seed1'\] were never served"):
        served.check(_record("pt_202"), in_datastore=True)
    served.check(_record("pt_202", external=True), in_datastore=True)  # made elsewhere, and says so
    with pytest.raises(UnknownCaseError):  # external does not make an unknown case known
        served.check(_record("nowhere", external=True), in_datastore=False)
