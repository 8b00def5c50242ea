"""A stand-in for the Hugging Face Hub on 127.0.0.1, so Hub references are tested without the internet.

It answers what ``huggingface_hub`` asks when ``HF_ENDPOINT`` points at it:

    HEAD / GET /{org}/{repo}/resolve/{revision}/{path}   X-Repo-Commit, ETag (the content's sha256, as the Hub
                                                         gives for LFS files), Content-Length; the bytes on GET
    GET /api/models/{org}/{repo}[/revision/{revision}]   {"id", "sha", "siblings": [{"rfilename": ...}]}

and fails as the Hub does: 404 with ``X-Error-Code`` RepoNotFound / RevisionNotFound / EntryNotFound; a
private repository answers 401 (``X-Error-Message: Invalid credentials in Authorization header``) to a
request without its token, or with another one; a forbidden repository answers 403. Every request is logged
(``requests``: method, path, Authorization header).
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: Dict[str, Dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    refs: Dict[str, str] = field(default_factory=dict)  # branch -> sha
    token: Optional[str] = None  # private: only this bearer token gets in
    forbidden: bool = False


class HubServer:
    def __init__(self):
        self.repos: Dict[str, Repo] = {}
        self.requests: List[Tuple[str, str, Optional[str]]] = []
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def commit(self, repo: str, files: Dict[str, bytes], *, branch: str = "main", token: Optional[str] = None,
               forbidden: bool = False) -> str:
        """Add a commit holding exactly ``files`` on ``branch``; returns its 40-hex sha."""
        r = self.repos.setdefault(repo, Repo())
        r.token, r.forbidden = token, forbidden
        h = hashlib.sha1(f"{repo}\0{len(r.commits)}".encode())
        for name in sorted(files):
            h.update(name.encode() + b"\0" + files[name])
        sha = h.hexdigest()
        r.commits[sha] = dict(files)
        r.refs[branch] = sha
        return sha

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- routing -----------------------------------------------------------------------------------------

    def answer(self, method: str, path: str, auth: Optional[str]):
        """(status, headers, body) for one request."""
        self.requests.append((method, path, auth))
        parts = [unquote(p) for p in urlsplit(path).path.split("/")[1:]]
        if len(parts) == 4 and parts[:2] == ["api", "models"]:
            repo, revision, name = "/".join(parts[2:4]), "main", None
        elif len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "revision":
            repo, revision, name = "/".join(parts[2:4]), "/".join(parts[5:]), None
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        else:
            return _error(404, "not a Hub route")
        r = self.repos.get(repo)
        if r is None:
            return _error(401, "Repository not found", code="RepoNotFound")
        if r.forbidden:
            return _error(403, "Access to this repository is forbidden")
        if r.token is not None and auth != f"Bearer {r.token}":
            return _error(401, "Invalid credentials in Authorization header")
        sha = r.refs.get(revision, revision if revision in r.commits else None)
        if sha is None:
            return _error(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        files = r.commits[sha]
        if name is None:
            body = json.dumps({"id": repo, "modelId": repo, "sha": sha, "private": r.token is not None,
                               "siblings": [{"rfilename": f} for f in sorted(files)]}).encode()
            return 200, {"Content-Type": "application/json"}, body
        if name not in files:
            return _error(404, f"Entry not found: {name}", code="EntryNotFound", commit=sha)
        data = files[name]
        return 200, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                     "Content-Type": "application/octet-stream"}, data


def _error(status: int, message: str, code: Optional[str] = None, commit: Optional[str] = None):
    headers = {"X-Error-Message": message, "Content-Type": "application/json"}
    if code:
        headers["X-Error-Code"] = code
    if commit:
        headers["X-Repo-Commit"] = commit
    return status, headers, json.dumps({"error": message}).encode()


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, with_body: bool) -> None:
            status, headers, body = hub.answer(self.command, self.path, self.headers.get("Authorization"))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_HEAD(self):
            self._reply(False)

        def do_GET(self):
            self._reply(True)

        def log_message(self, *args):
            pass

    return Handler
