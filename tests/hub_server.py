"""A stand-in for the Hugging Face Hub: the API subset `huggingface_hub` 2.4 speaks (docs/design.md §7), in memory.

Written for the publishing tests; it is not the Hub and does not try to be one. It keeps model repositories as
content-addressed commits (path → file, file = bytes + git blob sha1 + sha256 for LFS files), answers the
requests the unmodified client makes for `create_repo`, `upload_folder` (classic LFS path: set
``HF_HUB_DISABLE_XET=1``), `create_tag`/`create_branch`, `list_repo_refs`, `list_repo_tree`, `repo_info`,
`snapshot_download` and `hf_hub_download`, and logs every request (``server.requests``) so a test can check
what went over the wire. API calls need ``Authorization: Bearer <token>``; LFS uploads go to a signed href
that carries no token (as the real Hub's storage URLs).

    with HubServer(token="hf_test") as hub:      # hub.endpoint = "http://127.0.0.1:<port>"
        ...
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024  # files this large go through LFS, as on the Hub
INITIAL_FILES = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def blob_id(self) -> str:
        return git_blob_sha1(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)  # commit sha → tree
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in self.commits:
            return revision
        return self.branches.get(revision) or self.tags.get(revision)


@dataclass
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes


class HubServer:
    """Threaded HTTP server on 127.0.0.1:<free port>. ``fail_next[(method, kind)] = [503, …]`` injects errors."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}  # sha256 → content, shared by all repos
        self.requests: list[Request] = []
        self.commit_count = 0  # commits made through the commit endpoint (not the initial one)
        self.fail_next: dict[str, list[int]] = {}  # request kind ("commit", "preupload", …) → statuses to answer
        self.lock = threading.Lock()
        self._signing_key = secrets.token_bytes(16)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def kinds_seen(self) -> list[str]:
        return [_kind(request.method, urlsplit(request.url).path) for request in self.requests]

    # -- storage -------------------------------------------------------------------------------------------
    def new_commit(self, repo: Repo, parent: str | None, tree: dict[str, StoredFile], message: str) -> str:
        listing = sorted((path, f.blob_id) for path, f in tree.items())
        sha = hashlib.sha1(json.dumps([parent, listing, message, len(repo.commits)]).encode()).hexdigest()
        repo.commits[sha] = tree
        return sha

    def sign(self, oid: str) -> str:
        return hmac.new(self._signing_key, oid.encode(), hashlib.sha256).hexdigest()


# Routes: (method, regex on the path) → kind. Repo ids are "namespace/name".
REPO = r"(?P<repo>[^/]+/[^/]+?)"
ROUTES = [
    ("POST", r"/api/repos/create", "create"),
    ("POST", r"/api/validate-yaml", "validate-yaml"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/api/models/{REPO}/tag/(?P<rev>[^/]+)", "tag"),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)", "branch"),
    ("GET", rf"/api/models/{REPO}/refs", "refs"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("GET", rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", "info"),
    ("GET", rf"/api/models/{REPO}", "info"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs-batch"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", "lfs-verify"),
    ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", "lfs-put"),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


def _route(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    for route_method, pattern, kind in ROUTES:
        match = re.fullmatch(pattern, path)
        if route_method == method and match:
            return kind, {k: v for k, v in match.groupdict().items() if v is not None}
    return None


def _kind(method: str, path: str) -> str:
    found = _route(method, path)
    return found[0] if found else "unknown"


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length

        def log_message(self, *args) -> None:  # quiet: the test reads hub.requests instead
            pass

        def do_GET(self) -> None:
            self.handle_any("GET")

        do_POST = lambda self: self.handle_any("POST")  # noqa: E731
        do_PUT = lambda self: self.handle_any("PUT")  # noqa: E731
        do_HEAD = lambda self: self.handle_any("HEAD")  # noqa: E731

        # -- plumbing --------------------------------------------------------------------------------------
        def read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def send(self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None) -> None:
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def handle_any(self, method: str) -> None:
            body = self.read_body()
            url = urlsplit(self.path)
            with hub.lock:
                hub.requests.append(Request(method, self.path, dict(self.headers), body))
                found = _route(method, url.path)
                try:
                    if found is None:
                        raise HubError(404, f"no route {method} {url.path}")
                    kind, params = found
                    if failures := hub.fail_next.get(kind):
                        raise HubError(failures.pop(0), f"injected failure of {kind}")
                    if kind != "lfs-put" and self.headers.get("Authorization") != f"Bearer {hub.token}":
                        raise HubError(401, "Invalid credentials in Authorization header")
                    status, answer, headers = getattr(self, "on_" + kind.replace("-", "_"))(
                        params, body, parse_qs(url.query)
                    )
                except HubError as error:
                    headers = {"X-Error-Code": error.code} if error.code else {}
                    self.send(error.status, {"error": str(error)}, {**headers, "X-Error-Message": str(error)})
                    return
            self.send(status, answer, headers)

        def repo(self, params: dict[str, str]) -> Repo:
            repo = hub.repos.get(unquote(params["repo"]))
            if repo is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            return repo

        def commit_of(self, repo: Repo, revision: str) -> str:
            sha = repo.resolve(revision)
            if sha is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return sha

        # -- endpoints -------------------------------------------------------------------------------------
        def on_create(self, params, body, query):
            spec = json.loads(body)
            repo_id = f"{spec['organization']}/{spec['name']}" if spec.get("organization") else spec["name"]
            answer = {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id}
            if repo_id in hub.repos:  # the client reads `url` from the 409 answer too (exist_ok)
                return 409, {**answer, "error": "You already created this model repo"}, {}
            private = spec.get("private", spec.get("visibility", "private") != "public")
            repo = hub.repos[repo_id] = Repo(private=bool(private))
            tree = {path: StoredFile(data, lfs=False) for path, data in INITIAL_FILES.items()}
            repo.branches["main"] = hub.new_commit(repo, None, tree, "initial commit")
            return 200, answer, {}

        def on_validate_yaml(self, params, body, query):
            json.loads(body)
            return 200, {"errors": [], "warnings": []}, {}

        def on_preupload(self, params, body, query):
            repo = self.repo(params)
            tree = repo.commits[self.commit_of(repo, params["rev"])]
            files = []
            for entry in json.loads(body)["files"]:
                sample = base64.b64decode(entry["sample"])
                lfs = entry["size"] >= LFS_THRESHOLD or b"\0" in sample
                answer = {"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                stored = tree.get(entry["path"])
                if stored is not None:  # lets the client skip unchanged files (and so an empty commit)
                    answer["oid"] = stored.sha256 if stored.lfs else stored.blob_id
                files.append(answer)
            return 200, {"files": files}, {}

        def on_lfs_batch(self, params, body, query):
            self.repo(params)
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs_store:
                    entry["actions"] = {
                        "upload": {"href": f"{hub.endpoint}/lfs-storage/{obj['oid']}?signature={hub.sign(obj['oid'])}"},
                        "verify": {"href": f"{hub.endpoint}/{params['repo']}.git/info/lfs/objects/verify"},
                    }
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}, {}

        def on_lfs_put(self, params, body, query):
            oid = params["oid"]
            if not hmac.compare_digest(query.get("signature", [""])[0], hub.sign(oid)):
                raise HubError(403, "bad signature")
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, "content does not match its oid")
            hub.lfs_store[oid] = body
            return 200, b"", {}

        def on_lfs_verify(self, params, body, query):
            obj = json.loads(body)
            if obj["oid"] not in hub.lfs_store or len(hub.lfs_store[obj["oid"]]) != obj["size"]:
                raise HubError(404, "object not stored")
            return 200, {}, {}

        def on_commit(self, params, body, query):
            repo = self.repo(params)
            branch = unquote(params["rev"])
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            tree = dict(repo.commits[repo.branches[branch]])
            message = ""
            for line in body.decode().splitlines():
                record = json.loads(line)
                key, value = record["key"], record["value"]
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    tree[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    if value["oid"] not in hub.lfs_store:
                        raise HubError(422, f"LFS object {value['oid']} was not uploaded")
                    tree[value["path"]] = StoredFile(hub.lfs_store[value["oid"]], lfs=True)
                elif key == "deletedFile":
                    tree.pop(value["path"], None)
                else:
                    raise HubError(400, f"unsupported commit line {key!r}")
            sha = hub.new_commit(repo, repo.branches[branch], tree, message)
            repo.branches[branch] = sha
            hub.commit_count += 1
            return (
                200,
                {
                    "commitOid": sha,
                    "commitUrl": f"{hub.endpoint}/{params['repo']}/commit/{sha}",
                    "pullRequestUrl": None,
                },
                {},
            )

        def on_tag(self, params, body, query):
            repo = self.repo(params)
            tag = json.loads(body)["tag"]
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self.commit_of(repo, params["rev"])
            return 200, {}, {}

        def on_branch(self, params, body, query):
            repo = self.repo(params)
            name = unquote(params["branch"])
            if name in repo.branches:
                raise HubError(409, f"Branch {name} already exists")
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            repo.branches[name] = self.commit_of(repo, start)
            return 200, {}, {}

        def on_refs(self, params, body, query):
            repo = self.repo(params)

            def refs(kind, table):
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in table.items()]

            return 200, {"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags), "converts": []}, {}

        def on_tree(self, params, body, query):
            repo = self.repo(params)
            tree = repo.commits[self.commit_of(repo, params["rev"])]
            prefix = unquote(params.get("path", "")).strip("/")
            entries = []
            for path, stored in sorted(tree.items()):
                if prefix and not path.startswith(prefix + "/"):
                    continue
                entry = {"type": "file", "path": path, "size": len(stored.data), "oid": stored.blob_id}
                if stored.lfs:
                    entry["lfs"] = {"oid": stored.sha256, "size": len(stored.data), "pointerSize": 134}
                entries.append(entry)
            return 200, entries, {}

        def on_info(self, params, body, query):
            repo = self.repo(params)
            sha = self.commit_of(repo, params.get("rev", "main"))
            siblings = [{"rfilename": path} for path in sorted(repo.commits[sha])]
            return (
                200,
                {"id": unquote(params["repo"]), "sha": sha, "private": repo.private, "siblings": siblings, "tags": []},
                {},
            )

        def on_resolve(self, params, body, query):
            repo = self.repo(params)
            sha = self.commit_of(repo, params["rev"])
            stored = repo.commits[sha].get(unquote(params["path"]))
            if stored is None:
                raise HubError(404, "Entry not found", "EntryNotFound")
            headers = {"X-Repo-Commit": sha, "ETag": f'"{stored.blob_id}"'}
            if stored.lfs:
                headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(stored.data))})
            return 200, stored.data, headers

    return Handler
