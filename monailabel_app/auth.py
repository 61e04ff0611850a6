"""Authentication, role-based access and the audit trail for the DiffKT3D server.

Switch: MONAI Label's own setting `MONAI_LABEL_AUTH_ENABLE=true` (environment), with the clinic's
identity provider in `MONAI_LABEL_AUTH_REALM_URI` (an OpenID Connect issuer, e.g. a Keycloak
realm). Off by default: the local demo needs no login. See docs/security.md.

Why not MONAI Label 0.8.5's token check as is (monailabel/endpoints/user/auth.py): it calls
`jwt.decode` without `algorithms`, which PyJWT 2 rejects, so every token is refused (401); it
never checks issuer or audience; it fetches the realm's `public_key` once and caches it forever
(no key rotation, Keycloak only); and its roles (monailabel-user/annotator/admin) put model upload
and delete under "annotator". So we keep MONAI Label's settings (switch, realm, claim names,
client id), its `/auth/` login endpoints and its `RBAC` dependencies, and replace the two weak
parts:

* `TokenVerifier`: PyJWT with an explicit algorithm list, expiry required, issuer checked, audience
  checked by default (a token the provider issued for another application is refused), keys from the provider's JWKS (OIDC discovery; rotation handled by
  `PyJWKClient`) or, for a Keycloak realm URL without discovery, the realm's `public_key`.
* `AuthMiddleware`: one policy table (`POLICY`) for every route, MONAI Label's and ours:
  401 without / with an invalid or expired token, 403 without the role, deny-by-default for
  unknown writes. MONAI Label's `get_current_user` dependency is overridden to hand its `RBAC`
  checks the identity this middleware established, so they pass exactly when the policy did.

The middleware also writes the audit trail (`diffkt3d.audit`) for every audited action, whether
auth is on or off (then the user is "anonymous"), including refused attempts. An allowed audited
action is first written to a write-ahead journal (`<audit dir>/journal/audit.jsonl`, status 0);
when that entry cannot be written the request is refused with 503 before anything is done, so no
change goes ahead unaudited. The outcome entry (final status) goes to the trail when the answer is
sent; if that write fails, the outcome goes to the journal instead and the failure is logged.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any

import jwt
import requests
from fastapi import Depends
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffkt3d.audit import AuditEntry, AuditLog

log = logging.getLogger(__name__)

CLINICIAN, PHYSICIST, ADMIN = "clinician", "physicist", "admin"
ROLES = (CLINICIAN, PHYSICIST, ADMIN)
ANONYMOUS = "anonymous"
DEFAULT_AUDIENCE = "diffkt3d"  # the `aud` access tokens must carry unless `auth_audience` says otherwise
STATE_IDENTITY = "diffkt3d_identity"  # request.state key of the Identity
STATE_AUDIT = "diffkt3d_audit_details"  # request.state key routes fill with ids for the audit entry
# MONAI Label's own role check as a route dependency (a no-op unless MONAI_LABEL_AUTH_ENABLE; with
# auth on it sees the identity AuthMiddleware established). Module level so FastAPI can resolve the
# annotation in modules that use postponed annotations; every app route takes it from here.
UserDep = Annotated[User, Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))]
JOURNAL_DIR = "journal"  # write-ahead journal of audited actions, under the audit log's directory
AUDIT_UNAVAILABLE = ("audit trail unavailable: the server could not record this action in its audit log, so it "
                     "was not carried out (nothing was changed); ask the server's administrator to check the "
                     "audit directory (disk space, permissions), then retry")


@dataclass(frozen=True)
class Action:
    """What a request does, who may do it, and whether it goes into the audit trail."""

    name: str
    roles: tuple[str, ...]
    audited: bool


READ = Action("read", ROLES, audited=False)
RATE = Action("preference.record", (CLINICIAN, ADMIN), audited=True)
# Anyone who may view may upload a case to look at, but what reaches the server's disk is on record.
SESSION_UPLOAD = Action("session.upload", ROLES, audited=True)
ADMIN_ONLY = Action("admin", (ADMIN,), audited=False)
UNKNOWN_WRITE = Action("unknown.write", (ADMIN,), audited=True)


def _data(name: str) -> Action:
    return Action(name, (PHYSICIST, ADMIN), audited=True)


# (methods, path regex, action); first match wins. Paths as MONAI Label serves them (no API prefix).
POLICY: tuple[tuple[frozenset[str], re.Pattern[str], Action], ...] = tuple(
    (frozenset(m.split()), re.compile(p), a) for m, p, a in (
        # the viewer: discovery, inference on a case or an uploaded session, next case to label
        ("GET HEAD", r"/info/?", READ),
        ("POST", r"/infer/[^/]+", READ),
        ("PUT", r"/session/?", SESSION_UPLOAD),
        ("GET DELETE", r"/session/[^/]+", READ),
        ("POST", r"/activelearning/[^/]+", READ),
        ("GET", r"/diffkt3d/preferences/?", READ),
        ("POST", r"/diffkt3d/preferences/?", RATE),
        ("GET", r"/diffkt3d/audit/?", ADMIN_ONLY),
        # a running inference's progress, and cancelling it (whoever knows its random job id)
        ("GET DELETE", r"/diffkt3d/jobs/[^/]+", READ),
        # model versions: physicists see them, only an administrator changes the served one
        ("GET", r"/diffkt3d/models(/[^/]+)?/?", Action("model.list", (PHYSICIST, ADMIN), audited=False)),
        ("POST", r"/diffkt3d/models/[^/]+/promote/?", Action("model.promote", (ADMIN,), audited=True)),
        ("GET", r"/logs(/.*)?", ADMIN_ONLY),
        # training runs and models: physicist / admin
        ("POST", r"/train/[^/]+", _data("train.start")),
        ("POST", r"/train/?", _data("train.start")),
        ("DELETE", r"/train/?", _data("train.stop")),
        ("PUT", r"/model/[^/]+", _data("model.upload")),
        ("DELETE", r"/model/[^/]+", _data("model.delete")),
        ("GET", r"/model/(info/)?[^/]+", _data("model.download")),
        ("POST DELETE", r"/batch/infer(/[^/]+)?", _data("batch_infer")),
        ("POST DELETE", r"/scoring(/[^/]*)?", _data("scoring")),
        # the datastore: reading one case is viewing; bulk download and any change are data work
        ("GET", r"/datastore/dataset", _data("data.download")),
        ("PUT", r"/datastore/(image|)", _data("data.image_upload")),
        ("PUT", r"/datastore/label", _data("data.label_upload")),
        ("PUT", r"/datastore/(image/info|label/info|updatelabelinfo)", _data("data.info_update")),
        ("DELETE", r"/datastore/(image|label|)", _data("data.delete")),
    ))


def action_for(method: str, path: str) -> Action:
    """The policy entry of a request; unknown GET/HEAD are reads, any other unknown request is
    admin-only (deny by default) and audited."""
    for methods, pattern, action in POLICY:
        if method in methods and pattern.fullmatch(path):
            return action
    return READ if method in ("GET", "HEAD") else UNKNOWN_WRITE


# Reachable without a token when auth is on: login (MONAI Label's /auth/ endpoints) and CORS preflight.
PUBLIC_PATHS = re.compile(r"/auth/(token)?")


@dataclass(frozen=True)
class Identity:
    """Who sent a request: the token's user name and DiffKT3D roles."""

    username: str
    roles: tuple[str, ...]


LOCAL_IDENTITY = Identity(ANONYMOUS, ROLES)  # auth off: everything allowed, audited as anonymous


@dataclass
class AuthSettings:
    """Authentication settings: MONAI Label's auth settings plus DiffKT3D's `--conf auth_*` keys.

    Args:
        enabled: `MONAI_LABEL_AUTH_ENABLE`.
        realm_uri: `MONAI_LABEL_AUTH_REALM_URI`, the provider's issuer URL (Keycloak: realm URL).
        username_claim: `MONAI_LABEL_AUTH_TOKEN_USERNAME` (default "preferred_username").
        roles_claim: `MONAI_LABEL_AUTH_TOKEN_ROLES`, a '#'-separated path into the token
            (default "realm_access#roles"; Keycloak client roles: "resource_access#<client>#roles").
        client_id: `MONAI_LABEL_AUTH_CLIENT_ID`, used by the password login.
        timeout_s: `MONAI_LABEL_AUTH_TIMEOUT`, for calls to the provider.
        role_names: DiffKT3D role -> the provider's role name (`--conf auth_role_clinician` etc.,
            default "diffkt3d-clinician", "diffkt3d-physicist", "diffkt3d-admin").
        issuer: required `iss` (`--conf auth_issuer`; default the discovery document's issuer,
            or unchecked when the provider has no discovery document).
        audience: required `aud` (`--conf auth_audience`, default "diffkt3d"; Keycloak adds it to
            access tokens with an audience mapper, docs/security.md).
        verify_audience: check `aud` (`--conf auth_verify_audience`, default true). Turning it off
            is an explicit opt-out, logged at start-up: any token of the provider is then
            accepted, including tokens issued to other applications of the realm.
        jwks_uri: key set URL (`--conf auth_jwks_uri`; default from discovery).
        algorithms: accepted signature algorithms (`--conf auth_algorithms`, comma-separated,
            default "RS256"); never "none" or HS*, which a public key cannot verify.
        leeway_s: clock skew allowed on exp/nbf/iat (`--conf auth_leeway_s`, default 30).
        jwks_cooldown_s: at most one key-set refetch per this many seconds for an unknown key id
            (`--conf auth_jwks_cooldown_s`, default 30): a rotated key is picked up within it,
            and tokens with made-up key ids cannot make the server hammer the provider.
    """

    enabled: bool = False
    realm_uri: str = ""
    username_claim: str = "preferred_username"
    roles_claim: str = "realm_access#roles"
    client_id: str = ""
    timeout_s: float = 10.0
    role_names: dict[str, str] = field(default_factory=lambda: {r: f"diffkt3d-{r}" for r in ROLES})
    issuer: str = ""
    audience: str = DEFAULT_AUDIENCE
    verify_audience: bool = True
    jwks_uri: str = ""
    algorithms: tuple[str, ...] = ("RS256",)
    leeway_s: float = 30.0
    jwks_cooldown_s: float = 30.0

    @classmethod
    def from_monailabel(cls, conf: dict[str, str]) -> AuthSettings:
        """Read MONAI Label's settings (environment) and the app's `--conf` keys."""
        from monailabel.config import settings

        algorithms = tuple(a.strip() for a in conf.get("auth_algorithms", "RS256").split(",") if a.strip())
        bad = [a for a in algorithms if not a.startswith(("RS", "PS", "ES", "EdDSA"))]
        if bad or not algorithms:
            raise ValueError(f"auth_algorithms {conf.get('auth_algorithms')!r}: only public-key algorithms "
                             "(RS*, PS*, ES*, EdDSA) can be verified with the provider's keys")
        verify_text = conf.get("auth_verify_audience", "true").strip().lower()
        if verify_text not in ("true", "false"):
            raise ValueError(f"auth_verify_audience must be true or false, found {verify_text!r}")
        audience = conf.get("auth_audience", DEFAULT_AUDIENCE).strip()
        if verify_text == "true" and not audience:
            raise ValueError("auth_audience is empty: name the audience the provider puts in access tokens for "
                             "this server, or opt out explicitly with --conf auth_verify_audience false")
        return cls(enabled=bool(settings.MONAI_LABEL_AUTH_ENABLE),
                   realm_uri=settings.MONAI_LABEL_AUTH_REALM_URI.rstrip("/"),
                   username_claim=settings.MONAI_LABEL_AUTH_TOKEN_USERNAME,
                   roles_claim=settings.MONAI_LABEL_AUTH_TOKEN_ROLES,
                   client_id=settings.MONAI_LABEL_AUTH_CLIENT_ID,
                   timeout_s=float(settings.MONAI_LABEL_AUTH_TIMEOUT),
                   role_names={r: conf.get(f"auth_role_{r}", f"diffkt3d-{r}") for r in ROLES},
                   issuer=conf.get("auth_issuer", ""), audience=audience,
                   verify_audience=verify_text == "true",
                   jwks_uri=conf.get("auth_jwks_uri", ""), algorithms=algorithms,
                   leeway_s=float(conf.get("auth_leeway_s", "30")),
                   jwks_cooldown_s=float(conf.get("auth_jwks_cooldown_s", "30")))


class AuthError(Exception):
    """A request cannot be authenticated: HTTP `status` (401, or 503 when the provider is down)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class TokenVerifier:
    """Checks bearer tokens against the provider's keys and maps them to an `Identity`.

    Keys are looked up lazily (the provider may start after the server) and a failed lookup is
    not cached, so the server recovers when the provider comes back.
    """

    def __init__(self, settings: AuthSettings):
        self.settings = settings
        self._jwks: jwt.PyJWKClient | None = None
        self._public_key: str | None = None
        self._issuer = settings.issuer
        self._token_endpoint: str | None = None

    def discover(self) -> None:
        """Fetch the OIDC discovery document (jwks_uri, issuer, token endpoint), else the realm's key."""
        s = self.settings
        try:
            r = requests.get(f"{s.realm_uri}/.well-known/openid-configuration", timeout=s.timeout_s)
            meta = r.json() if r.status_code == 200 else {}
            if not isinstance(meta, dict):
                meta = {}
            self._token_endpoint = meta.get("token_endpoint")
            self._issuer = self._issuer or meta.get("issuer", "")
            jwks_uri = s.jwks_uri or meta.get("jwks_uri")
            if jwks_uri:
                self._jwks = jwt.PyJWKClient(jwks_uri, cache_keys=False, lifespan=300, timeout=s.timeout_s,
                                             cooldown_duration=s.jwks_cooldown_s)
                return
            # A Keycloak realm URL answers with its public key (what MONAI Label 0.8.5 reads).
            r = requests.get(s.realm_uri, timeout=s.timeout_s)
            r.raise_for_status()
            key = r.json()["public_key"]
            self._public_key = f"-----BEGIN PUBLIC KEY-----\n{key}\n-----END PUBLIC KEY-----"
        except (requests.RequestException, ValueError, KeyError) as exc:
            raise AuthError(503, f"identity provider at {s.realm_uri} is unreachable or not an OpenID "
                                 f"Connect provider ({type(exc).__name__})") from None

    def token_endpoint(self) -> str:
        if self._token_endpoint is None:
            self.discover()
        if not self._token_endpoint:
            raise AuthError(503, "the identity provider's discovery document has no token_endpoint")
        return self._token_endpoint

    def verify(self, token: str) -> Identity:
        """Identity of a valid token.

        Raises:
            AuthError: 401 (bad signature, expired, wrong issuer/audience, no user name), 503
                (provider unreachable while fetching keys).
        """
        s = self.settings
        if self._jwks is None and self._public_key is None:
            self.discover()
        try:
            if self._jwks is not None:
                key: Any = self._jwks.get_signing_key_from_jwt(token).key
            else:
                key = self._public_key
            claims = jwt.decode(token, key, algorithms=list(s.algorithms),
                                audience=s.audience if s.verify_audience else None,
                                issuer=self._issuer or None, leeway=s.leeway_s,
                                options={"require": ["exp", *(["aud"] if s.verify_audience else [])],
                                         "verify_aud": s.verify_audience})
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired: log in again") from None
        except jwt.PyJWKClientConnectionError:
            raise AuthError(503, "identity provider's key set is unreachable") from None
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"invalid token ({type(exc).__name__}: {exc})") from None
        username = claims.get(s.username_claim)
        if not isinstance(username, str) or not username.strip():
            raise AuthError(401, f"token has no user name claim {s.username_claim!r}")
        provider_roles = _claim_path(claims, s.roles_claim)
        roles = tuple(r for r in ROLES if s.role_names[r] in provider_roles)
        return Identity(username, roles)


def _claim_path(claims: dict[str, Any], path: str) -> set[str]:
    """Roles at a '#'-separated claim path (MONAI Label's convention), as a set of strings."""
    value: Any = claims
    for part in path.split("#"):
        value = value.get(part) if isinstance(value, dict) else None
    return {str(v) for v in value} if isinstance(value, (list, tuple)) else set()


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AuthMiddleware:
    """Authenticate (when enabled), authorise by `POLICY`, and audit every audited action.

    Audited actions that pass the role check are journalled first (`journal`, status 0, with a
    request id the outcome entry repeats); if that fails the request is answered 503
    (`AUDIT_UNAVAILABLE`) without reaching the app.

    Args:
        app: the wrapped ASGI app.
        verifier: token verifier, or None when authentication is off.
        audit: the audit log.
        api_prefix: MONAI Label's API prefix (`settings.MONAI_LABEL_API_STR`, usually "").
        journal: the write-ahead journal (default `journal_for(audit)`).
    """

    def __init__(self, app: ASGIApp, verifier: TokenVerifier | None, audit: AuditLog, api_prefix: str = "",
                 journal: AuditLog | None = None):
        self.app, self.verifier, self.audit, self.prefix = app, verifier, audit, api_prefix
        self.journal: AuditLog | None = journal
        if journal is None:
            try:
                self.journal = journal_for(audit)
            except OSError:  # e.g. the directory cannot be created: audited actions are refused (503)
                log.exception("AUDIT JOURNAL UNAVAILABLE under %s", audit.root)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        rel = path[len(self.prefix):] if self.prefix and path.startswith(self.prefix) else path
        if self.verifier is not None and PUBLIC_PATHS.fullmatch(rel):
            await self.app(scope, receive, send)
            return
        action = action_for(method, rel)
        identity = LOCAL_IDENTITY
        if self.verifier is not None:
            token = bearer_token(scope)
            try:
                if token is None:
                    raise AuthError(401, "not authenticated: send 'Authorization: Bearer <token>' "
                                         "(log in with POST /auth/token)")
                identity = await run_in_threadpool(self.verifier.verify, token)
            except AuthError as exc:
                await self._refuse(send, exc.status, exc.detail, action, method, path, Identity(ANONYMOUS, ()))
                return
            if not set(action.roles) & set(identity.roles):
                needed = " or ".join(self.verifier.settings.role_names[r] for r in action.roles)
                await self._refuse(send, 403, f"{action.name} requires the role {needed}; user "
                                              f"{identity.username} has {list(identity.roles) or 'no DiffKT3D role'}",
                                   action, method, path, identity)
                return
        state = scope.setdefault("state", {})
        state[STATE_IDENTITY] = identity
        state[STATE_AUDIT] = {}
        if not action.audited:
            await self.app(scope, receive, send)
            return
        # Write-ahead: the attempt is on disk before the app may change anything, or nothing happens.
        request_id = uuid.uuid4().hex
        try:
            if self.journal is None:
                raise OSError("no audit journal")
            await run_in_threadpool(self.journal.append, AuditEntry(
                user=identity.username, roles=list(identity.roles), action=action.name, method=method, path=path,
                status=0, details={"stage": "before", "request": request_id}))
        except Exception:
            log.exception("AUDIT JOURNAL WRITE FAILED for %s %s by %s: request refused (503)", method, path,
                          identity.username)
            await self._refuse(send, 503, AUDIT_UNAVAILABLE, action, method, path, identity)
            return
        state[STATE_AUDIT]["request"] = request_id
        status, audited = 500, False

        async def audit_then_send(message: Message) -> None:
            # The entry is on disk before the last byte of the answer leaves: a client that saw
            # "done" can rely on the trail, and entries are in the order requests completed.
            nonlocal status, audited
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body") and not audited:
                audited = True
                await self._audit(identity, action, method, path, status, state[STATE_AUDIT])
            await send(message)

        try:
            await self.app(scope, receive, audit_then_send)
        finally:
            if not audited:  # failed before answering (or the client went away)
                await self._audit(identity, action, method, path, status, state[STATE_AUDIT])

    async def _refuse(self, send: Send, status: int, detail: str, action: Action, method: str, path: str,
                      identity: Identity) -> None:
        headers = [(b"content-type", b"application/json")]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        body = json.dumps({"detail": detail}).encode()
        headers.append((b"content-length", str(len(body)).encode()))
        log.info("%s %s refused (%d) for user %s", method, path, status, identity.username)
        if action.audited:
            await self._audit(identity, action, method, path, status, {"reason": detail})
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _audit(self, identity: Identity, action: Action, method: str, path: str, status: int,
                     details: dict[str, Any]) -> None:
        entry = AuditEntry(user=identity.username, roles=list(identity.roles), action=action.name,
                           method=method, path=path, status=status, details=details)
        try:
            await run_in_threadpool(self.audit.append, entry)
            return
        except Exception:  # the request has been answered; losing the entry must be loud
            log.exception("AUDIT LOG WRITE FAILED for %s %s by %s", method, path, identity.username)
        if details.get("request") and self.journal is not None:  # journalled: keep the outcome next to it
            try:
                await run_in_threadpool(self.journal.append, entry)
            except Exception:
                log.exception("AUDIT JOURNAL WRITE FAILED for the outcome of %s %s by %s", method, path,
                              identity.username)


def journal_for(audit: AuditLog) -> AuditLog:
    """The write-ahead journal kept next to an audit log (`<audit dir>/journal/audit.jsonl`)."""
    return AuditLog(audit.root / JOURNAL_DIR)
