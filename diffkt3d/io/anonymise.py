"""Pseudonymise cases before they leave the clinic (exports for training or sharing).

A case id is often the name of the folder a clinic exported, which may be the patient's name or
record number. Anonymising replaces it by a keyed pseudonym, `anon-` + the first 12 hex digits of
HMAC-SHA256(key, case id): the same key gives the same pseudonym (so a clinic holding the key can
re-link a case, and repeated exports line up), without the key the original id cannot be
recovered or guessed by hashing candidate names. DICOM patient tags written on export are the
pseudonym too, and `Case.source` (the original path) is cleared.

Image content (faces in a head CT, burnt-in text) is not touched: defacing is out of scope.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import replace

from diffkt3d.data.case import Case

PSEUDONYM_PREFIX = "anon-"


def new_key() -> str:
    """A random key (hex); keep it if cases must be re-linked later, else let it go."""
    return secrets.token_hex(32)


def pseudonym(case_id: str, key: str) -> str:
    """Keyed pseudonym of a case id, a valid case id itself (letters, digits, '-')."""
    if not key:
        raise ValueError("anonymisation key is empty")
    digest = hmac.new(key.encode(), case_id.encode(), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:12]


def anonymised(case: Case, key: str) -> Case:
    """A shallow copy of `case` under its pseudonym, without its source path (arrays are shared)."""
    return replace(case, case_id=pseudonym(case.case_id, key), source="")
