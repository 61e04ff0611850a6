"""monailabel_app.auth without a server: the policy table, token checks against a real local
OpenID Connect provider (key rotation, Keycloak realm key without discovery, provider down)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from oidc_provider import LocalOIDCProvider  # noqa: E402

from monailabel_app.auth import (  # noqa: E402
    ADMIN,
    CLINICIAN,
    PHYSICIST,
    AuthError,
    AuthSettings,
    TokenVerifier,
    action_for,
)

ROLE_NAMES = {CLINICIAN: "diffkt3d-clinician", PHYSICIST: "diffkt3d-physicist", ADMIN: "diffkt3d-admin"}


@pytest.fixture
def idp():
    provider = LocalOIDCProvider({}).start()
    yield provider
    provider.stop()


def _verifier(idp, **kw) -> TokenVerifier:
    return TokenVerifier(AuthSettings(enabled=True, realm_uri=idp.realm_uri, timeout_s=5, **kw))


def test_policy_table():
    assert action_for("GET", "/info/").roles == (CLINICIAN, PHYSICIST, ADMIN)
    assert action_for("POST", "/infer/dose").name == "read"
    assert action_for("POST", "/diffkt3d/preferences").roles == (CLINICIAN, ADMIN)
    for method, path, name in (("POST", "/train/any2any", "train.start"), ("DELETE", "/train/", "train.stop"),
                               ("PUT", "/model/dose", "model.upload"), ("DELETE", "/model/dose", "model.delete"),
                               ("PUT", "/datastore/image", "data.image_upload"),
                               ("PUT", "/datastore/", "data.image_upload"),
                               ("PUT", "/datastore/label", "data.label_upload")):
        action = action_for(method, path)
        assert action.name == name and action.roles == (PHYSICIST, ADMIN) and action.audited
    assert action_for("GET", "/diffkt3d/audit").roles == (ADMIN,)
    # unknown writes: admin only and audited (deny by default); unknown reads: any role
    unknown = action_for("POST", "/some/new/route")
    assert unknown.roles == (ADMIN,) and unknown.audited
    assert action_for("GET", "/some/new/route").name == "read"


def test_roles_claim_paths_and_role_mapping(idp):
    token = idp.issue("u", ["diffkt3d-physicist", "other"], resource_access={"slicer": {"roles": ["diffkt3d-admin"]}})
    assert _verifier(idp).verify(token).roles == (PHYSICIST,)
    client_roles = _verifier(idp, roles_claim="resource_access#slicer#roles").verify(token)
    assert client_roles.username == "u" and client_roles.roles == (ADMIN,)
    renamed = _verifier(idp, role_names={**ROLE_NAMES, PHYSICIST: "other"}).verify(token)
    assert renamed.roles == (PHYSICIST,)


def test_audience_and_username_are_checked(idp):
    v = _verifier(idp, audience="diffkt3d")
    with pytest.raises(AuthError) as err:
        v.verify(idp.issue("u", []))  # aud "account"
    assert err.value.status == 401 and "audience" in err.value.detail.lower()
    assert v.verify(idp.issue("u", [], aud="diffkt3d")).username == "u"
    with pytest.raises(AuthError, match="user name"):
        _verifier(idp).verify(idp.issue("", []))


def test_key_rotation_is_picked_up_from_the_jwks(idp):
    v = _verifier(idp, jwks_cooldown_s=0)
    assert v.verify(idp.issue("u", [])).username == "u"
    old = idp.issue("u", [])
    idp.rotate()
    assert v.verify(idp.issue("u", [])).username == "u"  # new kid -> key set fetched again
    with pytest.raises(AuthError) as err:
        v.verify(old)
    assert err.value.status == 401
    # within the cooldown an unknown key id is refused rather than fetched again
    v2 = _verifier(idp, jwks_cooldown_s=600)
    assert v2.verify(idp.issue("u", [])).username == "u"
    idp.rotate()
    with pytest.raises(AuthError):
        v2.verify(idp.issue("u", []))


def test_keycloak_realm_public_key_without_discovery(idp):
    idp.discovery = False
    v = _verifier(idp)
    assert v.verify(idp.issue("u", [])).username == "u"
    with pytest.raises(AuthError):
        v.verify(idp.issue("u", [], key=__import__("oidc_provider").new_key()))


def test_provider_down_is_503_and_recovers(idp):
    v = _verifier(idp)
    token = idp.issue("u", [])
    idp.stop()
    with pytest.raises(AuthError) as err:
        v.verify(token)
    assert err.value.status == 503 and "unreachable" in err.value.detail
    idp.start()  # on a new port: point the settings at it, as a restarted provider would be
    v.settings.realm_uri = idp.realm_uri
    assert v.verify(idp.issue("u", [])).username == "u"
