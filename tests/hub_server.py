"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only).

Tests push to it and load from it with the *installed* `huggingface_hub` / `transformers` clients, so the
upload and download code paths are the real ones, only the remote end is local. It implements the subset of
the Hub API those clients use for models (and datasets): repo creation / deletion / settings, `whoami-v2`,
repo info, tree listing, paths-info, refs, commits listing, branches, `preupload` + ndjson `commit`,
`validate-yaml`, and file download through `/{repo}/resolve/{revision}/{path}` (GET and HEAD, with the
`X-Repo-Commit`, `ETag` and `Content-Length` headers `hf_hub_download` relies on, ranges included).

Every file is committed as a regular (non-LFS) blob: `preupload` answers `"uploadMode": "regular"`, so the
client never starts an LFS or Xet transfer, also when `hf_xet` is installed (the client chooses LFS/Xet only
for files the server marks as `lfs`). Downloads carry no Xet headers, so `hf_hub_download` uses plain HTTP.

Blobs are stored content-addressed under a temporary directory, and every repo's refs and commits are
mirrored to a JSON file there (written atomically) after each change; the live state is kept in memory.

Usage::

    with HubServer() as hub, hub.activate():      # clients now talk to hub.url, cache in a temp HF_HOME
        HfApi().create_repo("test-user/tiny")
        ...
        hub.fail("commit", status=500)            # the next commit request answers 500
        hub.repo_files("test-user/tiny")          # {path: bytes} at the head of main

`activate()` points the already-imported clients at the server (it patches `huggingface_hub.constants`,
the module-level `HfApi` and transformers' shared `HfApi`, and sets `HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN`);
`client_env()` gives the environment for a subprocess, where setting `HF_ENDPOINT` before the import is the
whole story.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# Sub-resources of /api/{type}s/{repo_id}/...; used to split the repo id from the action in a path.
API_ACTIONS = {"revision", "tree", "preupload", "commit", "commits", "branch", "refs", "paths-info", "settings"}

# Steps tests can make fail with HubServer.fail(step, ...).
FAILURE_STEPS = (
    "whoami",
    "create_repo",
    "delete_repo",
    "settings",
    "repo_info",
    "tree",
    "paths_info",
    "refs",
    "commits",
    "create_branch",
    "delete_branch",
    "preupload",
    "commit",
    "validate_yaml",
    "resolve",
)

# What a new repo holds, as on the real Hub (the initial commit makes branches and /resolve work at once).
INITIAL_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)

DEFAULT_USER = "test-user"
DEFAULT_ORG = "test-org"


def _now() -> str:
    """Timestamps in the one format `huggingface_hub.utils.parse_datetime` accepts."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as `oid` / ETag for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def parse_front_matter(text: str) -> dict | None:
    """YAML front matter of a README (None when there is none). Raises ValueError when it is not a mapping."""
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        raise ValueError(f"invalid YAML in the README metadata: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("the README metadata must be a YAML mapping (key: value lines)")
    return data


@dataclasses.dataclass
class FileEntry:
    sha256: str
    git_oid: str
    size: int


@dataclasses.dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, FileEntry]


@dataclasses.dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    commits: dict[str, Commit] = dataclasses.field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclasses.dataclass
class User:
    name: str
    role: str = "write"  # "write" or "read"
    orgs: tuple[str, ...] = ()


@dataclasses.dataclass
class RecordedRequest:
    method: str
    path: str
    status: int
    step: str | None


@dataclasses.dataclass
class _Failure:
    status: int
    message: str
    times: int


class HubError(Exception):
    """An error answer: status, message and the `X-Error-Code` the client maps to its exception classes."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body or {}


class HubServer:
    """A Hub-compatible server on 127.0.0.1 (free port) storing repos in a temporary directory.

    Tokens: `token` (user `test-user`, member of `test-org`, write), `read_token` (same user, read-only) and
    `other_token` (user `other-user`, write). Private repos are visible only to their namespace's members.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self._own_root = root is None
        self.root = str(root) if root is not None else tempfile.mkdtemp(prefix="cat-hf-hub-")
        self.storage_dir = os.path.join(self.root, "storage")
        self.client_home = os.path.join(self.root, "client_home")
        os.makedirs(self.storage_dir, exist_ok=True)
        os.makedirs(self.client_home, exist_ok=True)
        self.token = "hf_test_write_token"
        self.read_token = "hf_test_read_token"
        self.other_token = "hf_other_user_token"
        self.user = DEFAULT_USER
        self.tokens: dict[str, User] = {
            self.token: User(DEFAULT_USER, "write", (DEFAULT_ORG,)),
            self.read_token: User(DEFAULT_USER, "read", (DEFAULT_ORG,)),
            self.other_token: User("other-user", "write", ()),
        }
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[RecordedRequest] = []
        self._failures: dict[str, list[_Failure]] = {}
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._commit_counter = 0
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        handler = type("BoundHubRequestHandler", (_HubRequestHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            with self._lock:
                connections = list(self._connections)
            for conn in connections:  # wake keep-alive handler threads blocked on an idle client connection
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test controls

    def fail(self, step: str, status: int = 500, message: str | None = None, times: int = 1) -> None:
        """Make the next `times` requests of `step` (see FAILURE_STEPS) answer `status` with `message`."""
        if step not in FAILURE_STEPS:
            raise ValueError(f"unknown step {step!r}; choose one of {', '.join(FAILURE_STEPS)}")
        message = message or f"injected failure of step {step!r} (test server)"
        with self._lock:
            self._failures.setdefault(step, []).append(_Failure(status, message, times))

    @property
    def fail_next_commit(self) -> bool:
        return bool(self._failures.get("commit"))

    @fail_next_commit.setter
    def fail_next_commit(self, value: bool) -> None:
        with self._lock:
            if value:
                self.fail("commit", status=500)
            else:
                self._failures.pop("commit", None)

    def _take_failure(self, step: str) -> _Failure | None:
        with self._lock:
            queue = self._failures.get(step)
            if not queue:
                return None
            failure = queue[0]
            failure.times -= 1
            if failure.times <= 0:
                queue.pop(0)
            return failure

    def requests_for(self, step: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.step == step]

    def add_user(self, name: str, token: str, role: str = "write", orgs: tuple[str, ...] = ()) -> None:
        with self._lock:
            self.tokens[token] = User(name, role, tuple(orgs))

    # ------------------------------------------------------------------ inspection helpers

    def get_repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        with self._lock:
            return self.repos.get((repo_type, repo_id))

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        repo = self.get_repo(repo_id, repo_type)
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on the test server")
        return repo.private

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        repo = self.get_repo(repo_id, repo_type)
        return dict(repo.branches) if repo is not None else {}

    def repo_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """All files of `repo_id` at `revision`, as {path: content}."""
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"no {repo_type} repo {repo_id!r} on the test server")
            commit = self._resolve(repo, revision)
            return {path: self._read_blob(entry.sha256) for path, entry in sorted(commit.files.items())}

    def commit_count(self, repo_id: str, repo_type: str = "model") -> int:
        repo = self.get_repo(repo_id, repo_type)
        return len(repo.commits) if repo is not None else 0

    # ------------------------------------------------------------------ client wiring

    def client_env(self, token: str | None = "default") -> dict[str, str]:
        """Environment variables pointing a *fresh* Python process (subprocess) at this server."""
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HOME": self.client_home,
            "HF_HUB_CACHE": os.path.join(self.client_home, "hub"),
            "HF_XET_CACHE": os.path.join(self.client_home, "xet"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
        }
        if token is not None:
            env["HF_TOKEN"] = self.token if token == "default" else token
        return env

    @contextlib.contextmanager
    def activate(self, token: str | None = "default") -> Iterator[HubServer]:
        """Point the clients already imported in this process at the server, restoring everything on exit.

        `huggingface_hub` reads HF_ENDPOINT / HF_HOME once, at import, into `huggingface_hub.constants` (and
        builds a module-level `HfApi` and transformers a shared one from them), so setting the environment
        is not enough in a process that imported them already: the derived constants are patched too.
        `token=None` runs without a token (anonymous), any other string uses that token.
        """
        import huggingface_hub.constants as constants
        import huggingface_hub.hf_api as hf_api_module

        env = self.client_env(token)
        home = env["HF_HOME"]
        constant_values: dict[str, Any] = {
            "ENDPOINT": self.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_URL_HOSTS": frozenset(set(getattr(constants, "HF_URL_HOSTS", ())) | {"127.0.0.1"}),
            "HF_HOME": home,
            "HF_HUB_CACHE": env["HF_HUB_CACHE"],
            "HF_XET_CACHE": env["HF_XET_CACHE"],
            "HF_ASSETS_CACHE": os.path.join(home, "assets"),
            "HF_TOKEN_PATH": os.path.join(home, "token"),
            "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
        }
        saved_env = {key: os.environ.get(key) for key in [*env, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]}
        saved_constants = {name: getattr(constants, name) for name in constant_values if hasattr(constants, name)}
        saved_api_endpoint = hf_api_module.api.endpoint
        transformers_hub = sys.modules.get("transformers.utils.hub")
        saved_transformers_api = getattr(transformers_hub, "_hf_api", None)
        try:
            os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)
            if token is None:
                os.environ.pop("HF_TOKEN", None)
            os.environ.update(env)
            for name in saved_constants:
                setattr(constants, name, constant_values[name])
            hf_api_module.api.endpoint = self.url
            if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
                transformers_hub._hf_api = None  # rebuilt lazily with the patched endpoint
            yield self
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            for name, value in saved_constants.items():
                setattr(constants, name, value)
            hf_api_module.api.endpoint = saved_api_endpoint
            if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
                transformers_hub._hf_api = saved_transformers_api

    # ------------------------------------------------------------------ storage (call with the lock held)

    def _blob_path(self, sha256: str) -> str:
        return os.path.join(self.storage_dir, "blobs", sha256[:2], sha256)

    def _store_blob(self, data: bytes) -> FileEntry:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._blob_path(sha256)
        if not os.path.exists(path):
            _atomic_write(path, data)
        return FileEntry(sha256=sha256, git_oid=git_blob_oid(data), size=len(data))

    def _read_blob(self, sha256: str) -> bytes:
        with open(self._blob_path(sha256), "rb") as f:
            return f.read()

    def _persist(self, repo: Repo) -> None:
        state = dataclasses.asdict(repo)
        path = os.path.join(self.storage_dir, "repos", repo.repo_type, repo.repo_id + ".json")
        _atomic_write(path, json.dumps(state, indent=1, sort_keys=True).encode())

    def _new_commit(self, repo: Repo, parent: str | None, title: str, message: str, author: str,
                    files: dict[str, FileEntry]) -> Commit:
        self._commit_counter += 1
        listing = "\n".join(f"{p} {e.git_oid}" for p, e in sorted(files.items()))
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{self._commit_counter}\n{listing}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(oid, parent, title, message, author, _now(), dict(files))
        repo.commits[oid] = commit
        return commit

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if revision in repo.tags:
            return repo.commits[repo.tags[revision]]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return repo.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one HTTP request to the Hub endpoint it stands for."""

    hub: HubServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server_version = "cat-hf-test-hub/1"
    timeout = 60  # idle keep-alive connections are dropped after this

    # ------------------------------------------------------------------ plumbing

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.hub._lock:
            self.hub._connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr logging
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", content_length: int | None = None) -> None:
        self._status = status
        self._record()  # before the client can read the answer: a test may inspect `requests` right after it
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _json_body(self) -> Any:
        body = self._read_body()
        if not body:
            return {}
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("application/x-www-form-urlencoded"):
            return {k: v if len(v) > 1 or k == "paths" else v[0] for k, v in parse_qs(body.decode()).items()}
        try:
            return json.loads(body)
        except json.JSONDecodeError as e:
            raise HubError(400, f"request body is not valid JSON: {e}") from e

    def _dispatch(self, method: str) -> None:
        self._status = 0
        self._step: str | None = None
        self._recorded = False
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        try:
            self.user = self._authenticate()
            self._route(method, split.path)
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json({"error": e.message, **e.body}, e.status, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a server bug: answer 500 so the test sees it, and keep serving
            self._json({"error": f"test hub server error: {type(e).__name__}: {e}"}, 500)
        finally:
            self._record()  # requests that never got an answer (a dropped connection)

    def _record(self) -> None:
        if not self._recorded:
            self._recorded = True
            with self.hub._lock:
                self.hub.requests.append(RecordedRequest(self.command, self.path, self._status, self._step))

    def _authenticate(self) -> User | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.split(" ", 1)[1].strip() if " " in auth else auth.strip()
        user = self.hub.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _step_check(self, step: str) -> None:
        self._step = step
        failure = self.hub._take_failure(step)
        if failure is not None:
            raise HubError(failure.status, failure.message)

    # ------------------------------------------------------------------ routing

    def _route(self, method: str, path: str) -> None:
        raw = [s for s in path.split("/") if s != ""]
        if raw[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami()
        if raw[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if raw[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if raw[:3] == ["api", "repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if len(raw) >= 3 and raw[0] == "api" and raw[1] in REPO_TYPES:
            return self._route_api(method, REPO_TYPES[raw[1]], raw[2:])
        # /{repo_id}/resolve/{revision}/{path}, /datasets/{repo_id}/resolve/...
        repo_type = "model"
        if raw and raw[0] in REPO_TYPES and raw[0] != "models":
            repo_type, raw = REPO_TYPES[raw[0]], raw[1:]
        for i in (2, 1):
            if len(raw) > i + 2 and raw[i] == "resolve" and method in ("GET", "HEAD"):
                repo_id = "/".join(unquote(s) for s in raw[:i])
                return self._resolve_file(repo_type, repo_id, unquote(raw[i + 1]), unquote("/".join(raw[i + 2 :])))
        raise HubError(404, f"{method} {path} is not implemented by the test hub server")

    def _route_api(self, method: str, repo_type: str, segs: list[str]) -> None:
        if len(segs) >= 3 and segs[2] in API_ACTIONS:
            repo_id, action, rest = "/".join(segs[:2]), segs[2], segs[3:]
        elif len(segs) >= 2 and segs[1] in API_ACTIONS:
            repo_id, action, rest = segs[0], segs[1], segs[2:]
        else:
            repo_id, action, rest = "/".join(segs), "", []
        repo_id = unquote(repo_id)
        rev = unquote(rest[0]) if rest else "main"
        sub_path = unquote("/".join(rest[1:]))
        if action == "" and method == "GET":
            return self._repo_info(repo_type, repo_id, None)
        if action == "revision" and method == "GET":
            return self._repo_info(repo_type, repo_id, rev)
        if action == "tree" and method == "GET":
            return self._tree(repo_type, repo_id, rev, sub_path)
        if action == "paths-info" and method == "POST":
            return self._paths_info(repo_type, repo_id, rev)
        if action == "refs" and method == "GET":
            return self._refs(repo_type, repo_id)
        if action == "commits" and method == "GET":
            return self._commits(repo_type, repo_id, rev)
        if action == "branch" and method == "POST" and rest:
            return self._create_branch(repo_type, repo_id, rev)
        if action == "branch" and method == "DELETE" and rest:
            return self._delete_branch(repo_type, repo_id, rev)
        if action == "preupload" and method == "POST":
            return self._preupload(repo_type, repo_id, rev)
        if action == "commit" and method == "POST":
            return self._commit(repo_type, repo_id, rev)
        if action == "settings" and method == "PUT":
            return self._settings(repo_type, repo_id)
        raise HubError(404, f"{method} /api/{repo_type}s/.../{action} is not implemented by the test hub server")

    # ------------------------------------------------------------------ access control

    def _can_write_namespace(self, namespace: str) -> bool:
        return self.user is not None and (namespace == self.user.name or namespace in self.user.orgs)

    def _repo_for_read(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is not None and (not repo.private or self._can_write_namespace(repo.namespace)):
            return repo
        # The Hub answers 401 to anonymous requests and 404 otherwise, and never tells private from missing.
        raise HubError(401 if self.user is None else 404, "Repository not found", "RepoNotFound")

    def _repo_for_write(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repo_for_read(repo_type, repo_id)
        self._require_write(repo.namespace)
        return repo

    def _require_write(self, namespace: str) -> None:
        if self.user is None:
            raise HubError(401, "You must be authenticated (pass a token) to write to the Hub")
        if not self._can_write_namespace(namespace):
            raise HubError(403, f"You don't have the rights to write under the namespace {namespace!r}")
        if self.user.role != "write":
            raise HubError(403, "This token has read-only access; a token with the 'write' role is needed")

    # ------------------------------------------------------------------ endpoints

    def _whoami(self) -> None:
        self._step_check("whoami")
        if self.user is None:
            raise HubError(401, "Invalid username or password.")
        user = self.user
        self._json({
            "type": "user",
            "id": hashlib.sha1(user.name.encode()).hexdigest()[:24],
            "name": user.name,
            "fullname": user.name,
            "email": f"{user.name}@example.invalid",
            "emailVerified": True,
            "isPro": False,
            "orgs": [{"type": "org", "name": org, "fullname": org} for org in user.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test token", "role": user.role}},
        })

    def _validate_yaml(self) -> None:
        self._step_check("validate_yaml")
        body = self._json_body()
        try:
            parse_front_matter(body.get("content", ""))
        except ValueError as e:
            self._json({"errors": [{"message": str(e)}], "warnings": []}, 400)
            return
        self._json({"errors": [], "warnings": []})

    def _create_repo(self) -> None:
        self._step_check("create_repo")
        body = self._json_body()
        name = body.get("name")
        if not name or "/" in name:
            raise HubError(400, f"invalid repo name {name!r}")
        if self.user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = body.get("organization") or self.user.name
        repo_type = body.get("type") or "model"
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.url}/{URL_PREFIXES.get(repo_type, '')}{repo_id}"
        self._require_write(namespace)
        private = body.get("visibility") == "private" if "visibility" in body else bool(body.get("private", False))
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub.repos:
                # The body carries the url: `create_repo(exist_ok=True)` reads it from the 409 answer.
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private, created_at=_now())
            entry = self.hub._store_blob(INITIAL_GITATTRIBUTES)
            commit = self.hub._new_commit(repo, None, "initial commit", "", self.user.name, {".gitattributes": entry})
            repo.branches["main"] = commit.oid
            self.hub.repos[(repo_type, repo_id)] = repo
            self.hub._persist(repo)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        self._step_check("delete_repo")
        body = self._json_body()
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or (self.user.name if self.user else "")
        repo_id = f"{namespace}/{body.get('name')}"
        with self.hub._lock:
            self._repo_for_write(repo_type, repo_id)
            del self.hub.repos[(repo_type, repo_id)]
        self._json({})

    def _settings(self, repo_type: str, repo_id: str) -> None:
        self._step_check("settings")
        body = self._json_body()
        with self.hub._lock:
            repo = self._repo_for_write(repo_type, repo_id)
            if "visibility" in body:
                repo.private = body["visibility"] == "private"
            elif "private" in body:
                repo.private = bool(body["private"])
            self.hub._persist(repo)
        self._json({})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        self._step_check("repo_info")
        with self.hub._lock:
            repo = self._repo_for_read(repo_type, repo_id)
            commit = self.hub._resolve(repo, revision or "main")
            blobs = self.query.get("blobs", "").lower() in ("1", "true")
            card: dict = {}
            if "README.md" in commit.files:
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    card = parse_front_matter(self.hub._read_blob(commit.files["README.md"].sha256).decode()) or {}
            config: dict | None = None
            if "config.json" in commit.files and repo_type == "model":
                with contextlib.suppress(ValueError):
                    full = json.loads(self.hub._read_blob(commit.files["config.json"].sha256))
                    config = {k: full[k] for k in ("architectures", "model_type") if k in full}
            siblings = []
            for path, entry in sorted(commit.files.items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    sibling.update(size=entry.size, blobId=entry.git_oid)
                siblings.append(sibling)
            tags = list(card.get("tags") or [])
            if card.get("library_name"):
                tags.append(card["library_name"])
            info: dict[str, Any] = {
                "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo.namespace,
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": tags,
                "cardData": card or None,
                "siblings": siblings,
                "usedStorage": sum(e.size for e in commit.files.values()),
            }
            if repo_type == "model":
                info.update(
                    modelId=repo_id,
                    pipeline_tag=card.get("pipeline_tag"),
                    library_name=card.get("library_name"),
                    config=config,
                    spaces=[],
                )
        self._json(info)

    def _tree_items(self, commit: Commit, paths: list[str], recursive: bool, expand: bool) -> list[dict]:
        def folder_item(folder: str) -> dict:
            listing = "\n".join(
                f"{p} {e.git_oid}" for p, e in sorted(commit.files.items()) if p.startswith(folder + "/")
            )
            return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": folder}

        last_commit = {"id": commit.oid, "title": commit.title, "date": commit.date}
        items: list[dict] = []
        for path in paths:
            if path in commit.files:
                entry = commit.files[path]
                item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
            else:
                item = folder_item(path)
            if expand:
                item["lastCommit"] = last_commit
            items.append(item)
        return items

    def _tree(self, repo_type: str, repo_id: str, revision: str, sub_path: str) -> None:
        self._step_check("tree")
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        expand = self.query.get("expand", "").lower() in ("1", "true")
        with self.hub._lock:
            repo = self._repo_for_read(repo_type, repo_id)
            commit = self.hub._resolve(repo, revision)
            prefix = sub_path.strip("/") + "/" if sub_path.strip("/") else ""
            under = [p for p in commit.files if p.startswith(prefix)]
            if prefix and not under:
                raise HubError(404, f"{sub_path} does not exist on {revision}", "EntryNotFound",
                               {"X-Repo-Commit": commit.oid})
            paths: set[str] = set()
            for p in under:
                parts = p[len(prefix):].split("/")
                if recursive:
                    paths.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
                else:
                    paths.add(prefix + parts[0])
            items = self._tree_items(commit, sorted(paths), recursive, expand)
        self._json(items)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._step_check("paths_info")
        body = self._json_body()
        requested = body.get("paths") or []
        if isinstance(requested, str):
            requested = [requested]
        expand = str(body.get("expand", "")).lower() in ("1", "true")
        with self.hub._lock:
            repo = self._repo_for_read(repo_type, repo_id)
            commit = self.hub._resolve(repo, revision)
            existing = [
                p.strip("/") for p in requested
                if p.strip("/") in commit.files or any(f.startswith(p.strip("/") + "/") for f in commit.files)
            ]
            items = self._tree_items(commit, existing, False, expand)
        self._json(items)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        self._step_check("refs")
        with self.hub._lock:
            repo = self._repo_for_read(repo_type, repo_id)
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in sorted(repo.branches.items())
            ]
            tags = [
                {"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in sorted(repo.tags.items())
            ]
        self._json({"branches": branches, "converts": [], "tags": tags, "pullRequests": []})

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._step_check("commits")
        with self.hub._lock:
            repo = self._repo_for_read(repo_type, repo_id)
            commit: Commit | None = self.hub._resolve(repo, revision)
            history = []
            while commit is not None:
                history.append({
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": commit.author}],
                    "date": commit.date,
                })
                commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(history)

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        self._step_check("create_branch")
        body = self._json_body()
        with self.hub._lock:
            repo = self._repo_for_write(repo_type, repo_id)
            if branch.startswith("refs/") or not re.fullmatch(r"[A-Za-z0-9._\-/]+", branch):
                raise HubError(400, f"Invalid reference for a branch: {branch}")
            if branch in repo.branches:
                raise HubError(409, "Reference already exists")
            start = self.hub._resolve(repo, body.get("startingPoint") or "main")
            repo.branches[branch] = start.oid
            self.hub._persist(repo)
        self._json({})

    def _delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        self._step_check("delete_branch")
        with self.hub._lock:
            repo = self._repo_for_write(repo_type, repo_id)
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            self.hub._persist(repo)
        self._json({})

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._step_check("preupload")
        body = self._json_body()
        with self.hub._lock:
            repo = self._repo_for_write(repo_type, repo_id)
            commit = self.hub._resolve(repo, revision)
            files = []
            for f in body.get("files", []):
                existing = commit.files.get(f["path"])
                files.append({
                    "path": f["path"],
                    "uploadMode": "regular",  # never LFS/Xet: the whole file travels inside the commit payload
                    "shouldIgnore": False,
                    "oid": existing.git_oid if existing is not None else None,
                })
        self._json({"files": files, "commitOid": commit.oid})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._step_check("commit")
        body = self._read_body()
        if self.query.get("create_pr") in ("1", "true"):
            raise HubError(400, "pull requests (create_pr) are not supported by the test hub server")
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HubError(400, f"commit payload is not valid ndjson: {e}") from e
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "commit payload has no header line with a summary")
        with self.hub._lock:
            repo = self._repo_for_write(repo_type, repo_id)
            if revision not in repo.branches:
                if revision in repo.tags or re.fullmatch(r"[0-9a-f]{40}", revision):
                    raise HubError(400, f"Cannot commit to {revision}: it is not a branch")
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
            parent = header.get("parentCommit")
            if parent and not head.oid.startswith(parent):
                raise HubError(412, f"A commit has happened since {parent}. Please refresh and try again.")
            files = dict(head.files)
            for line in lines:
                key, value = line.get("key"), line.get("value") or {}
                if key == "header":
                    continue
                path = str(value.get("path", "")).strip("/")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"unsupported encoding {value.get('encoding')!r} for {path}")
                    files[path] = self.hub._store_blob(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    sha256 = value.get("oid", "")
                    if not os.path.exists(self.hub._blob_path(sha256)):
                        raise HubError(422, f"LFS object {sha256} for {path} was never uploaded")
                    data = self.hub._read_blob(sha256)
                    files[path] = FileEntry(sha256, git_blob_oid(data), len(data))
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(path + "/")}
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            if "README.md" in files and files.get("README.md") is not head.files.get("README.md"):
                try:
                    parse_front_matter(self.hub._read_blob(files["README.md"].sha256).decode())
                except (ValueError, UnicodeDecodeError) as e:
                    raise HubError(400, f"Invalid metadata in README.md: {e}") from e
            commit = self.hub._new_commit(
                repo, head.oid, header["summary"], header.get("description", ""), self.user.name, files
            )
            repo.branches[revision] = commit.oid
            self.hub._persist(repo)
        prefix = URL_PREFIXES.get(repo_type, "")
        self._json({
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.hub.url}/{prefix}{repo_id}/commit/{commit.oid}",
            "hookOutput": "",
            "pullRequestUrl": None,
        })

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        self._step_check("resolve")
        with self.hub._lock:
            repo = self._repo_for_read(repo_type, repo_id)
            commit = self.hub._resolve(repo, revision)
            entry = commit.files.get(path)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
            data = self.hub._read_blob(entry.sha256) if self.command == "GET" else b""
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{entry.git_oid}"',
            "Accept-Ranges": "bytes",
        }
        range_header = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header or "")
        if self.command == "GET" and match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else entry.size - 1
            else:
                start, end = max(entry.size - int(match.group(2)), 0), entry.size - 1
            end = min(end, entry.size - 1)
            if start > end:
                headers["Content-Range"] = f"bytes */{entry.size}"
                self._send(416, b"", headers)
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
            self._send(206, data[start : end + 1], headers, "application/octet-stream")
            return
        self._send(200, data, headers, "application/octet-stream", content_length=entry.size)


__all__ = ["HubServer", "HubError", "FAILURE_STEPS", "git_blob_oid", "parse_front_matter"]
