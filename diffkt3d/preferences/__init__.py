"""Clinician preference labels between candidate doses: record format and durable append-only store.

    from diffkt3d.preferences import PreferenceRecord, PreferenceStore
    store = PreferenceStore(root)
    store.append(PreferenceRecord.from_dict(payload, new=True))
    store.read().records
"""

from diffkt3d.preferences.record import SCHEMA_VERSION, CandidateRef, PreferenceRecord
from diffkt3d.preferences.store import STORE_FILE, PreferenceStore, ReadResult

__all__ = ["SCHEMA_VERSION", "STORE_FILE", "CandidateRef", "PreferenceRecord", "PreferenceStore",
           "ReadResult"]
