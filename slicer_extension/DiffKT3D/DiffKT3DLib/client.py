"""HTTP client for the DiffKT3D MONAI Label server (request format: docs/request-format.md).

Blocking calls, meant to run inside a worker job (worker.py), never on the GUI thread. Every call
has a (connect, read) timeout. A 4xx/5xx answer raises `ServerError` carrying the server's
`detail` message, so the panel can show it instead of "Status: 500".

Transport: `requests` when importable (Slicer ships it), else the standard library `urllib`
(with a small multipart encoder). No Slicer import.

Authentication (docs/security.md): when the server has it on, `login()` exchanges a user name and
password for a bearer token through the server's `POST /auth/token` (the server forwards them to
the clinic's identity provider), or `set_token()` takes a token obtained elsewhere; every later
call sends `Authorization: Bearer <token>`. A 401 raises `AuthenticationRequired`.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import logging
import mimetypes
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from base64 import urlsafe_b64decode
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .client_jobs import JobCalls
from .constants import (
    CONNECT_TIMEOUT_S,
    DEFAULT_SERVER_URL,
    DOSE_TASK,
    IMPUTE_TASKS,
    INFER_TIMEOUT_S,
    SMALL_CALL_TIMEOUT_S,
)

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 256 * 1024
_HOST_PORT_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+$")


class ClientError(Exception):
    """Any failure of a server call, with a message fit for the user."""


class ServerError(ClientError):
    """The server answered with an error status.

    Args:
        status: HTTP status code.
        detail: the server's `detail` message (or the body text).
        path: request path.
    """

    def __init__(self, status: int, detail: str, path: str):
        self.status, self.detail, self.path = status, detail, path
        super().__init__(f"server error {status} on {path}: {detail}")


class AuthenticationRequired(ServerError):
    """401: no token, or the token is invalid or expired - log in (again)."""

    def __init__(self, detail: str, path: str):
        super().__init__(401, detail, path)
        self.args = (f"the server requires a login ({detail}); log in with your clinic account",)


class ServerUnreachable(ClientError):
    """No connection (server down, wrong URL, network)."""


class ServerTimeout(ClientError):
    """The server did not answer within the call's timeout."""


class CancelToken(Protocol):
    """What the client needs from a job context (worker.JobContext satisfies it)."""

    def check_cancelled(self) -> None: ...

    def progress(self, fraction: float | None, message: str = "") -> None: ...


def normalize_server_url(url: str | None) -> str:
    """Canonical base URL: "" -> default, "host:port" -> "http://host:port", no trailing "/".

    Raises:
        ValueError: not an http(s) URL or host:port.
    """
    url = (url or "").strip()
    if not url:
        return DEFAULT_SERVER_URL
    if "://" not in url:
        if not _HOST_PORT_RE.match(url.rstrip("/")):
            raise ValueError(f"server URL {url!r} is neither http(s)://host[:port] nor host:port")
        url = "http://" + url
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"server URL {url!r} must be http(s)://host[:port]")
    try:
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"server URL {url!r} has an invalid port") from None
    return url.rstrip("/")


@dataclass
class InferResult:
    """Answer of an infer call.

    Args:
        params: the JSON part.
        image_path: where the returned NIfTI was written (None for output=json).
    """

    params: dict[str, Any]
    image_path: Path | None


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes


class _Transport(Protocol):
    def request(self, method: str, url: str, *, query: dict | None, json_body: Any,
                form: dict[str, str] | None, files: list[tuple[str, Path]] | None,
                timeout: tuple[float, float], cancel: CancelToken | None,
                headers: dict[str, str] | None = None) -> _Response: ...


class RequestsTransport:
    """`requests` transport (streams the answer so a cancel is seen between chunks)."""

    def __init__(self) -> None:
        import requests

        self._requests = requests

    def request(self, method, url, *, query, json_body, form, files, timeout, cancel, headers=None):
        requests = self._requests
        handles = []
        try:
            file_parts = None
            if files:
                handles = [open(path, "rb") for _, path in files]  # noqa: SIM115 - closed below
                file_parts = [(field_name, (path.name, fh, _mime(path)))
                              for (field_name, path), fh in zip(files, handles, strict=True)]
            # No shared Session: jobs (a dose and a preview) may run in parallel threads.
            resp = requests.request(method, url, params=query, json=json_body, data=form,
                                    files=file_parts, timeout=timeout, stream=True, headers=headers)
            chunks = []
            for chunk in resp.iter_content(_CHUNK_BYTES):
                if cancel is not None:
                    cancel.check_cancelled()
                chunks.append(chunk)
            return _Response(resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, b"".join(chunks))
        except (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout) as exc:
            raise ServerTimeout(_timeout_message(method, url, timeout, exc)) from None
        except requests.exceptions.ConnectionError as exc:
            if "timed out" in str(exc).lower():
                raise ServerTimeout(_timeout_message(method, url, timeout, exc)) from None
            raise ServerUnreachable(f"cannot reach the server at {_base(url)}: {_short(exc)}") from None
        finally:
            for fh in handles:
                fh.close()


class UrllibTransport:
    """Standard-library transport for a Python without `requests`."""

    def request(self, method, url, *, query, json_body, form, files, timeout, cancel, headers=None):
        if query:
            url = url + "?" + urllib.parse.urlencode(query)
        headers = dict(headers or {})
        data = None
        if json_body is not None:
            data = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif form and not files:  # a plain form (the login)
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif form or files:
            data, content_type = _encode_multipart(form or {}, files or [])
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        # urllib has one timeout for connect and each socket read: use the read timeout.
        try:
            resp = urllib.request.urlopen(req, timeout=timeout[1])
        except urllib.error.HTTPError as exc:
            return _Response(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())
        except TimeoutError as exc:
            raise ServerTimeout(_timeout_message(method, url, timeout, exc)) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise ServerTimeout(_timeout_message(method, url, timeout, exc)) from None
            raise ServerUnreachable(f"cannot reach the server at {_base(url)}: {exc.reason}") from None
        try:
            chunks = []
            while True:
                if cancel is not None:
                    cancel.check_cancelled()
                try:
                    chunk = resp.read(_CHUNK_BYTES)
                except TimeoutError as exc:
                    raise ServerTimeout(_timeout_message(method, url, timeout, exc)) from None
                if not chunk:
                    break
                chunks.append(chunk)
            return _Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, b"".join(chunks))
        finally:
            resp.close()


def default_transport() -> _Transport:
    try:
        return RequestsTransport()
    except ImportError:
        logger.info("requests is not installed: using urllib")
        return UrllibTransport()


class DiffKT3DClient(JobCalls):
    """Client of one DiffKT3D server.

    Args:
        server_url: base URL or host:port (normalised, default http://127.0.0.1:8000).
        connect_timeout_s: TCP connect timeout of every call.
        small_timeout_s: read timeout of quick calls (info, session upload, preferences).
        infer_timeout_s: read timeout of model calls (dose, imputation).
        transport: injected for tests; default requests, else urllib.
    """

    def __init__(self, server_url: str | None = None, *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 small_timeout_s: float = SMALL_CALL_TIMEOUT_S, infer_timeout_s: float = INFER_TIMEOUT_S,
                 transport: _Transport | None = None):
        self.server_url = normalize_server_url(server_url)
        self.connect_timeout_s = connect_timeout_s
        self.small_timeout_s = small_timeout_s
        self.infer_timeout_s = infer_timeout_s
        self.transport = transport or default_transport()
        self.token: str | None = None  # bearer token when the server requires a login

    # -- plumbing ------------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, query: dict | None = None, json_body: Any = None,
              form: dict[str, str] | None = None, files: list[tuple[str, Path]] | None = None,
              read_timeout_s: float | None = None, cancel: CancelToken | None = None) -> _Response:
        timeout = (self.connect_timeout_s, read_timeout_s or self.small_timeout_s)
        logger.debug("%s %s %s", method, path, query or "")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        resp = self.transport.request(method, self.server_url + path, query=query, json_body=json_body,
                                      form=form, files=files, timeout=timeout, cancel=cancel, headers=headers)
        if resp.status == 401:
            raise AuthenticationRequired(_detail(resp), path)
        if resp.status >= 400:
            raise ServerError(resp.status, _detail(resp), path)
        return resp

    def _json(self, resp: _Response, path: str) -> Any:
        try:
            return json.loads(resp.body.decode() or "null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ClientError(f"the server's answer to {path} is not JSON: {resp.body[:120]!r}") from None

    # -- authentication ------------------------------------------------------------------------
    def auth_enabled(self) -> bool:
        """Whether the server asks for a login (`GET /auth/` exists only when it does)."""
        try:
            body = self._json(self._call("GET", "/auth/"), "/auth/")
        except ServerError as exc:
            if exc.status == 404:
                return False
            raise
        return bool((body or {}).get("enabled"))

    def login(self, username: str, password: str) -> str:
        """`POST /auth/token`: log in with the clinic account; keeps and returns the user name.

        Raises:
            ValueError: empty user name or password.
            AuthenticationRequired: wrong user name or password.
        """
        if not username.strip() or not password:
            raise ValueError("enter your user name and password to log in")
        resp = self._call("POST", "/auth/token", form={"username": username.strip(), "password": password})
        token = (self._json(resp, "/auth/token") or {}).get("access_token")
        if not token:
            raise ClientError("the server answered the login without a token: is authentication on?")
        return self.set_token(token)

    def set_token(self, token: str | None) -> str:
        """Use a bearer token obtained elsewhere (pasted); None logs out. Returns the token's user name."""
        self.token = (token or "").strip() or None
        return self.username or ""

    @property
    def username(self) -> str | None:
        """User name in the token (display only: the server checks the signature, not us)."""
        return token_username(self.token) if self.token else None

    # -- discovery -----------------------------------------------------------------------------
    def info(self, cancel: CancelToken | None = None) -> dict[str, Any]:
        """`GET /info/`: the server's models, trainers, strategies and DiffKT3D section."""
        return self._json(self._call("GET", "/info/", cancel=cancel), "/info/")

    @staticmethod
    def available_tasks(info: dict[str, Any]) -> dict[str, list[str]]:
        """{"dose": [...], "impute": [...], "strategies": [...], "trainers": [...]} from /info/.

        Raises:
            ClientError: the server has no dose task (not a DiffKT3D server).
        """
        models = list((info.get("models") or {}).keys())
        if DOSE_TASK not in models:
            raise ClientError(f"the server lists no '{DOSE_TASK}' task (found {models or 'none'}): "
                              "is this a DiffKT3D server?")
        return {"dose": [DOSE_TASK],
                "impute": [t for t in IMPUTE_TASKS.values() if t in models],
                "strategies": list((info.get("strategies") or {}).keys()),
                "trainers": list((info.get("trainers") or {}).keys())}

    # -- cases -----------------------------------------------------------------------------------
    def upload_case(self, files: dict[str, Path], expiry_s: int = 3600,
                    cancel: CancelToken | None = None) -> str:
        """`PUT /session/` with all files of a case (repeated field `files`); returns session id."""
        if not files:
            raise ValueError("no files to upload")
        parts = [("files", Path(p)) for p in files.values()]
        resp = self._call("PUT", "/session/", query={"expiry": int(expiry_s)}, files=parts, cancel=cancel)
        body = self._json(resp, "/session/")
        session_id = (body or {}).get("session_id")
        if not session_id:
            raise ClientError(f"the server created no session (answer: {str(body)[:200]})")
        return str(session_id)

    def delete_session(self, session_id: str) -> None:
        self._call("DELETE", f"/session/{urllib.parse.quote(session_id)}")

    # -- inference -----------------------------------------------------------------------------
    def infer(self, task: str, out_dir: str | Path, *, image: str | None = None,
              session_id: str | None = None, params: dict[str, Any] | None = None,
              output: str = "all", read_timeout_s: float | None = None,
              cancel: CancelToken | None = None) -> InferResult:
        """`POST /infer/<task>` on a datastore case (`image`) or an uploaded session.

        Returns:
            the JSON part and, for output "all"/"image", the NIfTI written into `out_dir`.
        """
        if (image is None) == (session_id is None):
            raise ValueError("give exactly one of image (datastore id) or session_id")
        query = {"output": output, **({"image": image} if image else {"session_id": session_id})}
        path = f"/infer/{urllib.parse.quote(task)}"
        if cancel is not None:
            cancel.progress(None, f"waiting for the server ({task})")
        resp = self._call("POST", path, query=query, form={"params": json.dumps(params or {})},
                          read_timeout_s=read_timeout_s or self.infer_timeout_s, cancel=cancel)
        content_type = resp.headers.get("content-type", "")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if output == "json":
            return InferResult(self._json(resp, path), None)
        if content_type.startswith("multipart/"):
            parts = _parse_multipart(content_type, resp.body)
            params_part = parts.get("params")
            image_part = parts.get("image")
            if params_part is None:
                raise ClientError(f"the answer of {path} has no 'params' part (parts: {sorted(parts)})")
            result = json.loads(params_part[1].decode() or "{}")
            image_path = None
            if image_part is not None:
                image_path = out_dir / _safe_name(image_part[0] or f"{task}.nii.gz")
                image_path.write_bytes(image_part[1])
            return InferResult(result, image_path)
        # output=image: the bare file.
        image_path = out_dir / _safe_name(_filename(resp.headers) or f"{task}.nii.gz")
        image_path.write_bytes(resp.body)
        return InferResult({}, image_path)

    # -- preferences and active learning -----------------------------------------------------------
    def record_preference(self, record: dict[str, Any]) -> dict[str, Any]:
        """`POST /diffkt3d/preferences`; returns the stored record. A client-made `record_id` lets a write
        whose answer timed out be sent again: the server answers with what it stored, not a copy."""
        record = {**record, "record_id": record.get("record_id") or uuid.uuid4().hex}
        try:
            resp = self._call("POST", "/diffkt3d/preferences", json_body=record)
        except ServerTimeout:
            logger.info("preference %s: no answer in time, sending it again with the same id", record["record_id"])
            resp = self._call("POST", "/diffkt3d/preferences", json_body=record)
        body = self._json(resp, "/diffkt3d/preferences")
        return (body or {}).get("record", body)

    def preferences(self, case_id: str | None = None, rater: str | None = None) -> list[dict[str, Any]]:
        query = {k: v for k, v in (("case_id", case_id), ("rater", rater)) if v}
        body = self._json(self._call("GET", "/diffkt3d/preferences", query=query), "/diffkt3d/preferences")
        return list((body or {}).get("records", []))

    def next_case(self, rater: str, strategy: str = "preference") -> dict[str, Any]:
        """`POST /activelearning/<strategy>`: the next case to label ({} when none is left)."""
        path = f"/activelearning/{urllib.parse.quote(strategy)}"
        return self._json(self._call("POST", path, json_body={"rater": rater}), path) or {}


# -- helpers -------------------------------------------------------------------------------------
def token_username(token: str, claim: str = "preferred_username") -> str | None:
    """The user name claim of a JWT, read without verifying it (for display; None if unreadable)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    value = claims.get(claim) if isinstance(claims, dict) else None
    return value if isinstance(value, str) else None


def _detail(resp: _Response) -> str:
    """The server's `detail` message, else a short body text."""
    text = resp.body.decode(errors="replace").strip()
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text[:300] or f"HTTP {resp.status} with an empty body"
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list):  # FastAPI validation errors
            return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg', d)}"
                             if isinstance(d, dict) else str(d) for d in detail)
        return str(detail)
    return text[:300]


def _parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart body (the MONAI Label `output=all` answer)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
    parts: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            parts[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return parts


def _encode_multipart(form: dict[str, str], files: list[tuple[str, Path]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in form.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n").encode()
        out += value.encode() + b"\r\n"
    for name, path in files:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                f"filename=\"{path.name}\"\r\nContent-Type: {_mime(path)}\r\n\r\n").encode()
        out += path.read_bytes() + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def _mime(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _filename(headers: dict[str, str]) -> str | None:
    m = re.search(r'filename="?([^";]+)"?', headers.get("content-disposition", ""))
    return m.group(1) if m else None


def _safe_name(name: str) -> str:
    """A server-given file name reduced to a base name (never a path)."""
    base = Path(name.replace("\\", "/")).name
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", base) or "result.nii.gz"


def _base(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _short(exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^')\]]+)", text)
    return m.group(1) if m else text[:160]


def _timeout_message(method: str, url: str, timeout: tuple[float, float], exc: BaseException) -> str:
    path = urllib.parse.urlsplit(url).path
    return (f"{method} {path}: no answer from {_base(url)} within the timeout "
            f"(connect {timeout[0]:g} s, read {timeout[1]:g} s)")

