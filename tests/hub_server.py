"""A small stand-in for the Hugging Face Hub, for driving the real ``huggingface_hub`` client.

It speaks the HTTP routes the client uses for what zoo does (model info by revision, refs,
branches, the recursive tree, resolve/download with ``ETag``/``X-Repo-Commit``, repo
creation, whoami, YAML validation, preupload, the Git-LFS batch/upload/verify exchange,
the ndjson commit, and listing models by tag) over an in-memory git-like store: every
commit is an immutable snapshot of the repo's files, branches and tags point at commits.

Object ids follow git and Git-LFS: a file's ``oid`` is the git blob sha1 of its content,
or, for an LFS file, of its LFS pointer; the LFS ``oid`` and the download ``ETag`` are the
content's sha256. So a client that verifies files against the tree sees what it would on
the real Hub.

Not covered (see docs/hub.md): Xet storage, multipart LFS, pull requests, gated repos,
rate limits, redirects to a CDN, pagination, fine-grained token scopes.

Every request is recorded in ``hits`` as ``(method, route)`` with the route's template
(``GET /{repo}/resolve/{revision}/{path}``), so tests can assert on the protocol, and the
server answers at most ``max_requests`` requests (503 after that, counted in
``overflow``) so a client stuck in a retry loop ends the test instead of hanging it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
    )


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        return git_blob_sha1(lfs_pointer(self.data) if self.lfs else self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "oid": self.oid, "size": len(self.data), "path": path}
        if self.lfs:
            pointer = lfs_pointer(self.data)
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(pointer)}
        return entry


@dataclass
class Commit:
    sha: str
    files: dict[str, StoredFile]
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    created: str = ""

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and revision in self.commits:
            sha = revision
        return self.commits.get(sha) if sha else None


class _Reply(Exception):
    """Raised inside a handler to send an error response."""

    def __init__(self, status: int, message: str, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class StandInHub:
    """The stand-in Hub: ``with StandInHub() as hub: ... hub.url ...``.

    Args:
        tokens: token -> ``{"name": user, "role": "write" | "read", "orgs": [...]}``.
        upload_mode: ``"lfs"`` (weights go through the LFS batch + PUT + verify exchange)
            or ``"regular"`` (every file is sent inline, base64, in the commit payload).
        max_requests: answer at most this many requests.
    """

    def __init__(self, tokens=None, upload_mode: str = "lfs", max_requests: int = 500):
        if upload_mode not in ("lfs", "regular"):
            raise ValueError(f"upload_mode must be 'lfs' or 'regular', got {upload_mode!r}")
        self.tokens = tokens or {}
        self.upload_mode = upload_mode
        self.max_requests = max_requests
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.hits: list[tuple[str, str]] = []
        self.overflow = 0
        self._lock = threading.Lock()
        self._counter = 0
        self.url = ""
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> StandInHub:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"  # kept after stop(), for "the server is gone" tests
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> StandInHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def routes(self) -> set[str]:
        """The distinct ``METHOD route`` strings hit so far."""
        with self._lock:
            return {f"{m} {r}" for m, r in self.hits}

    # ------------------------------------------------------------------ store

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self._lock:
            if repo_id in self.repos:
                raise _Reply(409, "You already created this model repo", headers={"url": repo_id})
            repo = Repo(repo_id, private, created=_now())
            self.repos[repo_id] = repo
            self._commit(
                repo,
                "main",
                {".gitattributes": StoredFile(GITATTRIBUTES, False)},
                [],
                "initial commit",
            )
            return repo

    def put_files(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Commit ``files`` directly (as another tool would); returns the commit sha."""
        with self._lock:
            repo = self.repos[repo_id]
            adds = {p: StoredFile(d, self._is_lfs(p, len(d))) for p, d in files.items()}
            return self._commit(repo, branch, adds, [], "direct commit").sha

    def _is_lfs(self, path: str, size: int) -> bool:
        return self.upload_mode == "lfs" and size > 0 and path.endswith(LFS_SUFFIXES)

    def _commit(self, repo, branch, adds, deletes, message, parent=None) -> Commit:
        head = repo.branches.get(branch)
        if parent is not None and parent != head:
            raise _Reply(412, f"parent commit {parent} is not the head of {branch} ({head})")
        files = dict(repo.commits[head].files) if head else {}
        for path in deletes:
            files.pop(path, None)
        files.update(adds)
        self._counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}\0{head}\0{message}\0{self._counter}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].oid}\0".encode())
        commit = Commit(digest.hexdigest(), files, message, _now())
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def _card_data(self, commit: Commit) -> dict:
        readme = commit.files.get("README.md")
        if readme is None:
            return {}
        match = re.match(rb"^---\n(.*?)\n---\n", readme.data, re.DOTALL)
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    def _model_json(self, repo: Repo, commit: Commit, base: str) -> dict:
        card = self._card_data(commit)
        tags = list(card.get("tags") or [])
        library = card.get("library_name")
        if library and library not in tags:
            tags.insert(0, library)
        return {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "library_name": library,
            "tags": tags,
            "cardData": card,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, str, re.Pattern, str]] = [
    (m, template, re.compile(pattern + r"$"), handler)
    for m, template, pattern, handler in [
        ("GET", "/api/whoami-v2", r"/api/whoami-v2", "whoami"),
        ("POST", "/api/repos/create", r"/api/repos/create", "create_repo"),
        ("POST", "/api/validate-yaml", r"/api/validate-yaml", "validate_yaml"),
        ("GET", "/api/models", r"/api/models", "list_models"),
        ("GET", "/api/models/{repo}", rf"/api/models/{_REPO}", "model_info"),
        (
            "GET",
            "/api/models/{repo}/revision/{revision}",
            rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)",
            "model_info",
        ),
        ("GET", "/api/models/{repo}/refs", rf"/api/models/{_REPO}/refs", "refs"),
        (
            "POST",
            "/api/models/{repo}/branch/{branch}",
            rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)",
            "create_branch",
        ),
        (
            "GET",
            "/api/models/{repo}/tree/{revision}",
            rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?",
            "tree",
        ),
        (
            "POST",
            "/api/models/{repo}/paths-info/{revision}",
            rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)",
            "paths_info",
        ),
        (
            "POST",
            "/api/models/{repo}/preupload/{revision}",
            rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)",
            "preupload",
        ),
        (
            "POST",
            "/api/models/{repo}/commit/{revision}",
            rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)",
            "commit",
        ),
        (
            "POST",
            "/{repo}.git/info/lfs/objects/batch",
            rf"/{_REPO}\.git/info/lfs/objects/batch",
            "lfs_batch",
        ),
        ("PUT", "/lfs/upload/{oid}", r"/lfs/upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
        ("POST", "/lfs/verify/{oid}", r"/lfs/verify/(?P<oid>[0-9a-f]{64})", "lfs_verify"),
        (
            "HEAD",
            "/{repo}/resolve/{revision}/{path}",
            rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
            "resolve",
        ),
        (
            "GET",
            "/{repo}/resolve/{revision}/{path}",
            rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
            "resolve",
        ),
    ]
]


class _Handler(BaseHTTPRequestHandler):
    server_hub: StandInHub
    timeout = 10  # a stuck connection ends instead of holding a thread

    def log_message(self, format, *args):  # keep test output clean
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ------------------------------------------------------------------ plumbing

    def _dispatch(self, method: str) -> None:
        hub = self.server_hub
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        body = self._read_body()
        with hub._lock:
            over = len(hub.hits) >= hub.max_requests
            if over:
                hub.overflow += 1
        if over:
            self._send(503, {"error": "stand-in Hub request budget exhausted"})
            return
        for route_method, template, pattern, name in _ROUTES:
            match = pattern.match(split.path) if route_method == method else None
            if match:
                with hub._lock:
                    hub.hits.append((method, template))
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                try:
                    getattr(self, f"_{name}")(body=body, **params)
                except _Reply as reply:
                    headers = dict(reply.headers)
                    if reply.code:
                        headers["X-Error-Code"] = reply.code
                    headers["X-Error-Message"] = reply.message
                    self._send(reply.status, {"error": reply.message}, headers)
                return
        with hub._lock:
            hub.hits.append((method, f"UNKNOWN {split.path}"))
        self._send(404, {"error": f"stand-in Hub has no route {method} {split.path}"})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload, headers=None, content_type="application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _user(self, required: bool = False) -> dict | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        user = self.server_hub.tokens.get(token) if token else None
        if required and user is None:
            raise _Reply(401, "Invalid credentials in Authorization header")
        return user

    def _require_write(self, namespace: str) -> dict:
        user = self._user(required=True)
        if user.get("role") != "write":
            raise _Reply(403, "You don't have the rights to write with this token (read-only)")
        if namespace != user["name"] and namespace not in user.get("orgs", []):
            raise _Reply(
                403,
                f"You don't have the rights to create a model under the namespace {namespace!r}",
            )
        return user

    def _repo(self, repo_id: str) -> Repo:
        repo = self.server_hub.repos.get(repo_id)
        user = self._user()
        visible = repo is not None and (
            not repo.private
            or (user is not None and repo_id.split("/")[0] in [user["name"], *user.get("orgs", [])])
        )
        if not visible:
            raise _Reply(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise _Reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ routes

    def _whoami(self, body):
        user = self._user(required=True)
        self._send(
            200,
            {
                "type": "user",
                "name": user["name"],
                "orgs": [{"name": o, "roleInOrg": "write"} for o in user.get("orgs", [])],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test", "role": user["role"]},
                },
            },
        )

    def _create_repo(self, body):
        payload = json.loads(body or b"{}")
        namespace = payload.get("organization") or (self._user() or {}).get("name")
        self._require_write(namespace or "")
        repo_id = f"{namespace}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise _Reply(400, "the stand-in Hub hosts model repos only")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        try:
            self.server_hub.create_repo(repo_id, private=private)
        except _Reply as reply:
            self._send(409, {"error": reply.message, "url": f"{self._base()}/{repo_id}"})
            return
        self._send(200, {"url": f"{self._base()}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, body):
        content = json.loads(body).get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            if match:
                yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            self._send(400, {"errors": [{"message": str(error)}], "warnings": []})
            return
        self._send(200, {"errors": [], "warnings": []})

    def _list_models(self, body):
        hub, user = self.server_hub, self._user()
        wanted = self.query.get("filter", [])
        search = (self.query.get("search") or [""])[0]
        author = (self.query.get("author") or [None])[0]
        out = []
        with hub._lock:
            for repo in hub.repos.values():
                owner = repo.repo_id.split("/")[0]
                if repo.private and (
                    user is None or owner not in [user["name"], *user.get("orgs", [])]
                ):
                    continue
                info = hub._model_json(repo, repo.commits[repo.branches["main"]], self._base())
                matches = all(t in info["tags"] for t in wanted) and search in repo.repo_id
                if matches and (author is None or owner == author):
                    if "cardData" not in self.query and "full" not in self.query:
                        info.pop("cardData")
                        info.pop("siblings")
                    out.append(info)
        limit = int((self.query.get("limit") or [len(out)])[0])
        self._send(200, out[:limit])

    def _model_info(self, body, repo, rev="main"):
        with self.server_hub._lock:
            stored = self._repo(repo)
            commit = self._commit_at(stored, rev)
            info = self.server_hub._model_json(stored, commit, self._base())
        self._send(200, info)

    def _refs(self, body, repo):
        with self.server_hub._lock:
            stored = self._repo(repo)

            def refs(kind, table):
                return [
                    {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s}
                    for n, s in sorted(table.items())
                ]

            payload = {
                "branches": refs("heads", stored.branches),
                "tags": refs("tags", stored.tags),
                "converts": [],
            }
        self._send(200, payload)

    def _create_branch(self, body, repo, rev):
        self._require_write(repo.split("/")[0])
        start = json.loads(body or b"{}").get("startingPoint")
        with self.server_hub._lock:
            stored = self._repo(repo)
            if rev in stored.branches:
                raise _Reply(409, f"Reference already exists: refs/heads/{rev}")
            origin = self._commit_at(stored, start or "main")
            stored.branches[rev] = origin.sha
        self._send(200, {})

    def _tree(self, body, repo, rev, path=""):
        with self.server_hub._lock:
            commit = self._commit_at(self._repo(repo), rev)
            recursive = (self.query.get("recursive") or ["False"])[0].lower() == "true"
            prefix = f"{path.rstrip('/')}/" if path else ""
            entries, folders = [], set()
            for name, stored in sorted(commit.files.items()):
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix) :]
                if "/" in rest and not recursive:
                    folders.add(prefix + rest.split("/")[0])
                    continue
                for i, _ in enumerate(rest.split("/")[:-1]):
                    folders.add(prefix + "/".join(rest.split("/")[: i + 1]))
                entries.append(stored.tree_entry(name))
        listing = [
            {"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)
        ]
        self._send(200, listing + entries)

    def _paths_info(self, body, repo, rev):
        paths = parse_qs(body.decode()).get("paths", []) if body else []
        with self.server_hub._lock:
            commit = self._commit_at(self._repo(repo), rev)
            out = [commit.files[p].tree_entry(p) for p in paths if p in commit.files]
        self._send(200, out)

    def _preupload(self, body, repo, rev):
        self._require_write(repo.split("/")[0])
        hub = self.server_hub
        with hub._lock:
            stored = self._repo(repo)
            commit = self._commit_at(stored, rev)
            files = []
            for item in json.loads(body)["files"]:
                existing = commit.files.get(item["path"])
                files.append(
                    {
                        "path": item["path"],
                        "uploadMode": "lfs"
                        if hub._is_lfs(item["path"], item["size"])
                        else "regular",
                        "shouldIgnore": False,
                        "oid": existing.oid if existing else None,
                    }
                )
        self._send(200, {"files": files, "commitOid": commit.sha})

    def _lfs_batch(self, body, repo):
        self._require_write(repo.split("/")[0])
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise _Reply(400, "the stand-in Hub only accepts LFS uploads")
        base, objects = self._base(), []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.server_hub.lfs_store:
                entry["actions"] = {
                    "upload": {"href": f"{base}/lfs/upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{base}/lfs/verify/{obj['oid']}", "header": {}},
                }
            objects.append(entry)
        self._send(
            200,
            {"transfer": "basic", "objects": objects},
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_upload(self, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            raise _Reply(400, "uploaded content does not match its sha256")
        with self.server_hub._lock:
            self.server_hub.lfs_store[oid] = body
        self._send(200, {})

    def _lfs_verify(self, body, oid):
        payload = json.loads(body)
        stored = self.server_hub.lfs_store.get(oid)
        if stored is None or len(stored) != payload.get("size"):
            raise _Reply(404, f"LFS object {oid} was not uploaded")
        self._send(200, {"message": "Everything good"})

    def _commit(self, body, repo, rev):
        self._require_write(repo.split("/")[0])
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, "commit payload must start with a header line")
        header, adds, deletes = lines[0]["value"], {}, []
        hub = self.server_hub
        with hub._lock:
            stored = self._repo(repo)
            if rev not in stored.branches:
                raise _Reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    adds[value["path"]] = StoredFile(data, False)
                elif key == "lfsFile":
                    data = hub.lfs_store.get(value["oid"])
                    if data is None:
                        raise _Reply(
                            400, f"LFS object {value['oid']} for {value['path']} was never uploaded"
                        )
                    adds[value["path"]] = StoredFile(data, True)
                elif key in ("deletedFile", "deletedFolder"):
                    deletes.append(value["path"])
                else:
                    raise _Reply(400, f"the stand-in Hub does not handle commit operation {key!r}")
            commit = hub._commit(
                stored, rev, adds, deletes, header.get("summary", ""), header.get("parentCommit")
            )
        self._send(
            200,
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self._base()}/{repo}/commit/{commit.sha}",
                "pullRequestUrl": None,
            },
        )

    def _resolve(self, body, repo, rev, path):
        with self.server_hub._lock:
            commit = self._commit_at(self._repo(repo), rev)
            stored = commit.files.get(path)
        if stored is None:
            raise _Reply(
                404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.sha}
            )
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if stored.lfs:
            headers.update(
                {
                    "ETag": f'"{stored.sha256}"',
                    "X-Linked-Etag": f'"{stored.sha256}"',
                    "X-Linked-Size": str(len(stored.data)),
                }
            )
        else:
            headers["ETag"] = f'"{stored.oid}"'
        self._send(200, stored.data, headers, content_type="application/octet-stream")

    def _base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"
