"""Clinician preference labels between candidate doses: record format and durable append-only store.

    from diffkt3d.preferences import PreferenceRecord, PreferenceStore
    store = PreferenceStore(root)
    store.add_once(PreferenceRecord.from_dict(payload, new=True))  # a retried record_id is not stored twice
    store.read().records
"""

from diffkt3d.preferences.record import SCHEMA_VERSION, CandidateRef, PreferenceRecord
from diffkt3d.preferences.served import (
    SERVED_FILE,
    ServedCandidates,
    UnknownCaseError,
    UnservedCandidatesError,
)
from diffkt3d.preferences.store import STORE_FILE, PreferenceStore, ReadResult, RecordIdConflict

__all__ = ["SCHEMA_VERSION", "SERVED_FILE", "STORE_FILE", "CandidateRef", "PreferenceRecord", "PreferenceStore",
           "ReadResult", "RecordIdConflict", "ServedCandidates", "UnknownCaseError", "UnservedCandidatesError"]
