"""A local stand-in for the Hugging Face Hub HTTP API, for tests only.

This is a test double, not a Hub implementation: it answers the handful of endpoints `huggingface_hub` 2.x calls for
`create_repo`, `create_branch`, `upload_folder` (without Xet: run clients with `HF_HUB_DISABLE_XET=1`),
`model_info`/`repo_info` and `hf_hub_download`, keeps repositories in memory, and records every request so tests
can assert on what reached the "Hub". Uploads always take the regular (inline base64) path: the preupload endpoint
answers `uploadMode: "regular"` for every file, so no LFS or Xet transfer is ever needed.

Endpoints:
- `POST /api/repos/create` (`{"name", "organization", "visibility"}`; 409 if it exists)
- `POST /api/models/{repo}/branch/{branch}` (from `startingPoint` or `main`; 409 if it exists)
- `POST /api/models/{repo}/preupload/{revision}` (everything `regular`)
- `POST /api/models/{repo}/commit/{revision}` (NDJSON: `header`, `file` base64, `deletedFile`)
- `GET /api/models/{repo}[/revision/{revision}]` (model info with `siblings`)
- `POST /api/validate-yaml` (always valid)
- `HEAD`/`GET /{repo}/resolve/{revision}/{path}` (`ETag`, `X-Repo-Commit`, `Content-Length`; 404 with the Hub's
  `X-Error-Code` values `RepoNotFound`, `RevisionNotFound`, `EntryNotFound`)

Private repositories are only served to requests carrying an `Authorization` header (any token is accepted).
`fail_next(status, ...)` makes the next matching requests fail, optionally echoing the caller's token in the error
body the way a careless proxy might, to test that clients keep tokens out of their errors.
"""

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class FakeRepo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> {path: content}
    messages: dict[str, str] = field(default_factory=dict)  # commit oid -> summary

    def files(self, revision: str) -> dict[str, bytes] | None:
        oid = self.branches.get(revision, revision if revision in self.commits else None)
        return None if oid is None else self.commits[oid]

    def commit_oid(self, revision: str) -> str:
        return self.branches.get(revision, revision)


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    """Run with `with FakeHub() as hub:`; `hub.endpoint` is the URL to use as `HF_ENDPOINT`."""

    def __init__(self):
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[RecordedRequest] = []
        self._failures: list[tuple[int, str, bool]] = []  # (status, path substring, echo token)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def fail_next(self, status: int, path_contains: str = "", echo_token: bool = False, times: int = 1):
        """Answer the next `times` requests whose path contains `path_contains` with `status`."""
        self._failures += [(status, path_contains, echo_token)] * times

    def create_repo(self, repo_id: str, private: bool = False) -> FakeRepo:
        repo = self.repos[repo_id] = FakeRepo(private=private)
        self._commit(repo, "main", {}, "initial commit", parent=None)
        return repo

    def _commit(self, repo: FakeRepo, branch: str, files: dict[str, bytes], message: str, parent: str | None) -> str:
        oid = hashlib.sha1(f"{branch}:{len(repo.commits)}:{message}".encode()).hexdigest()
        repo.commits[oid] = {**(repo.commits[parent] if parent else {}), **files}
        repo.messages[oid] = message
        repo.branches[branch] = oid
        return oid

    def _take_failure(self, path: str) -> tuple[int, bool] | None:
        for i, (status, path_contains, echo) in enumerate(self._failures):
            if path_contains in path:
                del self._failures[i]
                return status, echo
        return None


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output clean; requests are in `hub.requests`
            pass

        # -- plumbing ------------------------------------------------------------------------------------------
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, payload, headers: dict[str, str] | None = None, head: bool = False):
            self._send(
                status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}, head
            )

        def _error(self, status: int, message: str, code: str | None = None, head: bool = False):
            self._json(status, {"error": message}, {"X-Error-Code": code} if code else {}, head)

        def _repo(self, repo_id: str, head: bool = False) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self.headers.get("Authorization")):
                self._error(404, "Repository not found", "RepoNotFound", head)
                return None
            return repo

        def _handle(self, method: str):
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub.requests.append(RecordedRequest(method, path, parse_qs(url.query), self.headers.get("Authorization")))
            body = self._body() if method in ("POST", "PUT") else b""
            with hub._lock:
                if failure := hub._take_failure(path):
                    status, echo = failure
                    message = "Invalid credentials" + (f" for {self.headers.get('Authorization')}" if echo else "")
                    headers = {"X-Error-Message": message} if echo else {}
                    return self._json(status, {"error": message}, headers, head=method == "HEAD")
                parts = [unquote(p) for p in url.path.strip("/").split("/")]
                if method == "POST" and parts[:3] == ["api", "repos", "create"]:
                    return self._create_repo(json.loads(body))
                if method == "POST" and parts == ["api", "validate-yaml"]:
                    return self._json(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id, rest = "/".join(parts[2:4]), parts[4:]
                    if method == "GET" and not rest:
                        return self._model_info(repo_id, "main")
                    if method == "GET" and rest[:1] == ["revision"]:
                        return self._model_info(repo_id, "/".join(rest[1:]))
                    if method == "POST" and rest[:1] == ["branch"]:
                        return self._create_branch(repo_id, "/".join(rest[1:]), json.loads(body or b"{}"))
                    if method == "POST" and rest[:1] == ["preupload"]:
                        return self._preupload(repo_id, "/".join(rest[1:]), json.loads(body))
                    if method == "POST" and rest[:1] == ["commit"]:
                        return self._commit(repo_id, "/".join(rest[1:]), body)
                if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                    return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head=method == "HEAD")
                self._error(404, f"fake hub: no route for {method} {path}")

        def do_GET(self):
            self._handle("GET")

        def do_HEAD(self):
            self._handle("HEAD")

        def do_POST(self):
            self._handle("POST")

        def do_PUT(self):
            self._handle("PUT")

        # -- endpoints -----------------------------------------------------------------------------------------
        def _create_repo(self, payload: dict):
            if payload.get("type", "model") != "model":
                return self._error(400, "fake hub: only model repositories are supported")
            repo_id = f"{payload.get('organization') or 'fake-user'}/{payload['name']}"
            url = f"{hub.endpoint}/{repo_id}"
            if repo_id in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            hub.create_repo(repo_id, private=payload.get("visibility") == "private")
            self._json(200, {"url": url, "name": repo_id, "id": repo_id})

        def _create_branch(self, repo_id: str, branch: str, payload: dict):
            if (repo := self._repo(repo_id)) is None:
                return
            if branch in repo.branches:
                return self._error(409, f"Reference already exists: refs/heads/{branch}")
            start = payload.get("startingPoint", "main")
            if repo.files(start) is None:
                return self._error(404, f"Invalid rev id: {start}", "RevisionNotFound")
            repo.branches[branch] = repo.commit_oid(start)
            self._json(200, {})

        def _preupload(self, repo_id: str, revision: str, payload: dict):
            if (repo := self._repo(repo_id)) is None:
                return
            existing = repo.files(revision) or {}
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": _git_blob_sha1(existing[f["path"]]) if f["path"] in existing else None,
                }
                for f in payload["files"]
            ]
            self._json(200, {"files": files, "commitOid": repo.commit_oid(revision)})

        def _commit(self, repo_id: str, revision: str, body: bytes):
            if (repo := self._repo(repo_id)) is None:
                return
            if revision not in repo.branches:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            summary, files, deleted = "", {}, []
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    summary = item["value"]["summary"]
                elif item["key"] == "file" and item["value"].get("encoding") == "base64":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    deleted.append(item["value"]["path"])
                else:
                    return self._error(400, f"fake hub: unsupported commit operation {item['key']!r}")
            parent = repo.branches[revision]
            oid = hub._commit(repo, revision, files, summary, parent)
            for path in deleted:
                repo.commits[oid].pop(path, None)
            self._json(
                200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
            )

        def _model_info(self, repo_id: str, revision: str):
            if (repo := self._repo(repo_id)) is None:
                return
            if (files := repo.files(revision)) is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            self._json(
                200,
                {
                    "id": repo_id,
                    "private": repo.private,
                    "sha": repo.commit_oid(revision),
                    "siblings": [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())],
                },
            )

        def _resolve(self, repo_id: str, revision: str, filename: str, head: bool):
            if (repo := self._repo(repo_id, head)) is None:
                return
            if (files := repo.files(revision)) is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head)
            if filename not in files:
                return self._error(404, "Entry not found", "EntryNotFound", head)
            content = files[filename]
            headers = {"ETag": f'"{_git_blob_sha1(content)}"', "X-Repo-Commit": repo.commit_oid(revision)}
            self._send(200, content, {"Content-Type": "application/octet-stream", **headers}, head)

    return Handler
