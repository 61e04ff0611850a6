"""A small, real OpenID Connect provider for tests: RS256 keys, discovery, JWKS, password grant.

It answers the same URLs as a Keycloak realm (`<base>/realms/<realm>`, its `public_key`,
`.well-known/openid-configuration`, `protocol/openid-connect/certs` and `.../token`), over HTTP
from a thread, so a server subprocess validates tokens exactly as it would against the clinic's
provider. Tokens are signed with PyJWT; `issue()` also makes expired or foreign-signed tokens.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REALM = "diffkt3d"
CLIENT_ID = "diffkt3d-slicer"
AUDIENCE = "diffkt3d"  # what the server checks by default (monailabel_app.auth.DEFAULT_AUDIENCE)


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class LocalOIDCProvider:
    """Start with `start()`, stop with `stop()`.

    Args:
        users: user name -> (password, realm roles).
    """

    def __init__(self, users: dict[str, tuple[str, list[str]]]):
        self.users = users
        self.key = new_key()
        self.kid = "test-key-1"
        self.discovery = True  # False: a bare Keycloak-style realm URL (public_key only)
        self._server: ThreadingHTTPServer | None = None
        self.token_requests = 0

    def rotate(self) -> None:
        """New signing key under a new key id (old tokens stop verifying)."""
        self.key = new_key()
        self.kid = f"test-key-{int(self.kid.rsplit('-', 1)[1]) + 1}"

    @property
    def realm_uri(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/realms/{REALM}"

    def issue(self, username: str, roles: list[str], *, expires_in_s: float = 300,
              key: rsa.RSAPrivateKey | None = None, issuer: str | None = None, **extra: Any) -> str:
        now = int(time.time())
        claims = {"iss": issuer or self.realm_uri, "sub": f"id-{username}", "aud": AUDIENCE,
                  "iat": now, "exp": now + int(expires_in_s), "preferred_username": username,
                  "realm_access": {"roles": roles}, "azp": CLIENT_ID, **extra}
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": self.kid})

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def public_key_b64(self) -> str:
        der = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode()

    def start(self) -> LocalOIDCProvider:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                base = f"/realms/{REALM}"
                if self.path == base:
                    self._json(200, {"realm": REALM, "public_key": provider.public_key_b64()})
                elif self.path == f"{base}/.well-known/openid-configuration" and provider.discovery:
                    uri = provider.realm_uri
                    self._json(200, {"issuer": uri, "jwks_uri": f"{uri}/protocol/openid-connect/certs",
                                     "token_endpoint": f"{uri}/protocol/openid-connect/token"})
                elif self.path == f"{base}/protocol/openid-connect/certs":
                    self._json(200, provider.jwks())
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self) -> None:
                if self.path != f"/realms/{REALM}/protocol/openid-connect/token":
                    self._json(404, {"error": "not found"})
                    return
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                provider.token_requests += 1
                if form.get("grant_type") != "password" or form.get("client_id") != CLIENT_ID:
                    self._json(400, {"error": "unauthorized_client"})
                    return
                user = provider.users.get(form.get("username", ""))
                if user is None or user[0] != form.get("password"):
                    self._json(401, {"error": "invalid_grant", "error_description": "Invalid user credentials"})
                    return
                token = provider.issue(form["username"], user[1])
                self._json(200, {"access_token": token, "token_type": "Bearer", "expires_in": 300})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
