"""A Hugging Face Hub-compatible HTTP server for the tests: what the genuine `huggingface_hub` client calls.

Stdlib only (`http.server.ThreadingHTTPServer`), bound to 127.0.0.1, storage in a temporary folder with real commit
history: every commit has a sha and a full snapshot of the repo's files, so branches, tags and any older commit
resolve. File contents are stored once, by sha256, in `objects/`; commit snapshots and refs are JSON files.

Implemented routes (model repos):

- `POST /api/repos/create`, `DELETE /api/repos/delete`, `GET /api/whoami-v2`
- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}` (repo info, siblings, card data)
- `POST /api/models/{repo}/preupload/{rev}` (upload mode per file, remote oid of unchanged files)
- `POST /{repo}.git/info/lfs/objects/batch`, `PUT /_lfs/{oid}` (the upload URL handed out), `POST /_lfs/verify`
- `POST /api/models/{repo}/commit/{rev}` (NDJSON: header, file, lfsFile, deletedFile, deletedFolder; `create_pr`,
  `parentCommit`)
- `GET /api/models/{repo}/tree/{rev}[/{path}]`, `POST /api/models/{repo}/paths-info/{rev}`
- `GET /api/models/{repo}/refs`, `GET /api/models/{repo}/commits/{rev}`, branch and tag create / delete
- `HEAD|GET /{repo}/resolve/{rev}/{path}` by branch, tag or commit sha (`X-Repo-Commit`, `ETag`, `X-Linked-Etag`,
  `X-Linked-Size`, `Content-Length`, byte ranges)
- `POST /api/validate-yaml` (model card metadata)

Errors carry the `X-Error-Code` header the client maps to its exceptions (`RepoNotFound`, `RevisionNotFound`,
`EntryNotFound`). The request body is always read, even when answering with an error, so keep-alive connections
stay in sync. Test hooks: `server.fail_commits` (answer the next N commits with a 500 and change nothing),
`server.request_log` (method and path of every request).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit


try:
    import yaml
except ImportError:  # pragma: no cover - huggingface_hub depends on pyyaml
    yaml = None

DEFAULT_USER = "test-user"
GITATTRIBUTES = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.onnx", "*.h5", "*.msgpack")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
REGEX_COMMIT = re.compile(r"^[0-9a-f]{40}$")
PIPELINE_TAGS = {
    "unconditional-image-generation",
    "text-to-image",
    "image-to-image",
    "image-classification",
    "text-generation",
    "feature-extraction",
    "image-to-video",
    "text-to-video",
}


class HubError(Exception):
    """An HTTP error answer: status, Hub error code (X-Error-Code) and message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubStorage:
    """Repos, commits (sha + full snapshot) and file objects in a folder; thread-safe."""

    def __init__(self, root: str):
        self.root = root
        self.lock = threading.RLock()
        os.makedirs(os.path.join(root, "objects"), exist_ok=True)
        os.makedirs(os.path.join(root, "lfs-staging"), exist_ok=True)
        os.makedirs(os.path.join(root, "repos"), exist_ok=True)
        self.tokens = {os.environ.get("HF_TOKEN", "hf_dummy_test_token")}
        self._counter = 0

    # ---------------------------------------------------------------- objects
    def _object_path(self, sha256: str) -> str:
        return os.path.join(self.root, "objects", sha256)

    def put_object(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._object_path(sha256)
        if not os.path.exists(path):
            tmp = path + f".tmp-{threading.get_ident()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha256

    def has_object(self, sha256: str) -> bool:
        return bool(re.fullmatch(r"[0-9a-f]{64}", sha256)) and os.path.exists(self._object_path(sha256))

    def read_object(self, sha256: str) -> bytes:
        with open(self._object_path(sha256), "rb") as f:
            return f.read()

    # ---------------------------------------------------------------- repos
    def _repo_dir(self, repo_id: str) -> str:
        return os.path.join(self.root, "repos", repo_id.replace("/", "--"))

    def repo_exists(self, repo_id: str) -> bool:
        return os.path.isfile(os.path.join(self._repo_dir(repo_id), "repo.json"))

    def load_repo(self, repo_id: str) -> dict:
        path = os.path.join(self._repo_dir(repo_id), "repo.json")
        if not os.path.isfile(path):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def save_repo(self, repo_id: str, repo: dict) -> None:
        path = os.path.join(self._repo_dir(repo_id), "repo.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(repo, f)
        os.replace(tmp, path)  # refs move atomically: a commit is visible whole or not at all

    def create_repo(self, repo_id: str, private: bool) -> None:
        with self.lock:
            if self.repo_exists(repo_id):
                raise HubError(409, "You already created this model repo", None)
            os.makedirs(os.path.join(self._repo_dir(repo_id), "commits"), exist_ok=True)
            repo = {"id": repo_id, "private": private, "branches": {}, "tags": {}, "prs": {}, "created": time.time()}
            files = {".gitattributes": self._file_entry(GITATTRIBUTES.encode(), lfs=False)}
            sha = self._write_commit(repo_id, None, "initial commit", "", files)
            repo["branches"]["main"] = sha
            self.save_repo(repo_id, repo)

    def delete_repo(self, repo_id: str) -> None:
        with self.lock:
            self.load_repo(repo_id)
            shutil.rmtree(self._repo_dir(repo_id))

    # ---------------------------------------------------------------- commits
    def _file_entry(self, data: bytes, lfs: bool) -> dict:
        sha256 = self.put_object(data)
        return self._entry_for(sha256, len(data), lfs, None if lfs else git_blob_sha1(data))

    @staticmethod
    def _entry_for(sha256: str, size: int, lfs: bool, blob_sha1: str | None = None) -> dict:
        if lfs:
            pointer = lfs_pointer(sha256, size)
            return {"sha256": sha256, "size": size, "oid": git_blob_sha1(pointer), "lfs": True, "ptr": len(pointer)}
        return {"sha256": sha256, "size": size, "oid": blob_sha1, "lfs": False}

    def _write_commit(self, repo_id: str, parent: str | None, title: str, description: str, files: dict) -> str:
        self._counter += 1
        payload = json.dumps(
            {"parent": parent, "title": title, "files": files, "n": self._counter, "t": time.time()}, sort_keys=True
        )
        sha = hashlib.sha1(payload.encode()).hexdigest()
        commit = {
            "id": sha,
            "parent": parent,
            "title": title,
            "message": description,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "files": files,
        }
        path = os.path.join(self._repo_dir(repo_id), "commits", f"{sha}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(commit, f)
        return sha

    def load_commit(self, repo_id: str, sha: str) -> dict:
        with open(os.path.join(self._repo_dir(repo_id), "commits", f"{sha}.json"), encoding="utf-8") as f:
            return json.load(f)

    def resolve(self, repo_id: str, revision: str | None) -> tuple[dict, str]:
        """(repo, commit sha) for a branch, tag, `refs/pr/N` or commit sha."""
        repo = self.load_repo(repo_id)
        revision = revision or "main"
        for table in ("branches", "tags", "prs"):
            name = revision
            if table == "branches" and revision.startswith("refs/heads/"):
                name = revision[len("refs/heads/") :]
            if name in repo[table]:
                return repo, repo[table][name]
        if REGEX_COMMIT.match(revision) and os.path.isfile(
            os.path.join(self._repo_dir(repo_id), "commits", f"{revision}.json")
        ):
            return repo, revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit(
        self,
        repo_id: str,
        revision: str,
        header: dict,
        operations: list[dict],
        create_pr: bool,
    ) -> tuple[str, str | None]:
        """Apply `operations` on top of `revision` as one new commit; move the branch (or open a PR ref)."""
        with self.lock:
            repo, head = self.resolve(repo_id, revision)
            if revision not in repo["branches"] and not revision.startswith("refs/pr/") and not create_pr:
                raise HubError(400, f"Cannot commit to {revision!r}: not a branch", None)
            parent_commit = header.get("parentCommit")
            if parent_commit is not None and parent_commit != head:
                raise HubError(412, f"A commit has happened since. Parent commit {parent_commit} is not {head}.")
            files = dict(self.load_commit(repo_id, head)["files"])
            for op in operations:
                key, value = op.get("key"), op.get("value") or {}
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path!r}")
                    files[path] = self._file_entry(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    oid = value.get("oid", "")
                    if value.get("algo") != "sha256" or not self.has_object(oid):
                        raise HubError(422, f"LFS object {oid} for {path!r} was not uploaded")
                    files[path] = self._entry_for(oid, int(value["size"]), lfs=True)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    matched = [p for p in files if p.startswith(prefix)]
                    if not matched:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in matched:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            sha = self._write_commit(repo_id, head, header.get("summary", ""), header.get("description", ""), files)
            pr_url = None
            if create_pr:
                number = len(repo["prs"]) + 1
                repo["prs"][f"refs/pr/{number}"] = sha
                pr_url = f"/{repo_id}/discussions/{number}"
            elif revision.startswith("refs/pr/"):
                repo["prs"][revision] = sha
            else:
                repo["branches"][revision] = sha
            self.save_repo(repo_id, repo)
            return sha, pr_url

    def history(self, repo_id: str, sha: str) -> list[dict]:
        commits = []
        while sha is not None:
            commit = self.load_commit(repo_id, sha)
            commits.append(commit)
            sha = commit["parent"]
        return commits


def _path_entry(path: str, entry: dict) -> dict:
    info = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": entry["ptr"]}
    return info


def _folder_entry(path: str, files: dict) -> dict:
    listing = sorted((p, e["oid"]) for p, e in files.items() if p.startswith(path + "/"))
    return {
        "type": "directory",
        "oid": hashlib.sha1(json.dumps(listing).encode()).hexdigest(),
        "size": 0,
        "path": path,
    }


def _front_matter(text: str) -> tuple[dict | None, str | None]:
    """(YAML metadata of a README, error message)."""
    match = re.match(r"^\s*---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.S)
    if not match:
        return None, None
    try:
        data = yaml.safe_load(match.group(1)) if yaml else {}
    except Exception as error:  # yaml.YAMLError
        return None, f"Invalid YAML in README.md front matter: {error}"
    if data is not None and not isinstance(data, dict):
        return None, "README.md front matter must be a YAML mapping"
    return data or {}, None


def validate_card_metadata(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a model card, checking the fields the Hub checks."""
    data, error = _front_matter(content)
    if error:
        return [error], []
    if data is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    errors = []
    for key in ("library_name", "pipeline_tag", "license"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "base_model"):
        value = data.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            errors.append(f'"{key}" must be a string or an array of strings')
    if isinstance(data.get("pipeline_tag"), str) and data["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" must be a valid task, got "{data["pipeline_tag"]}"')
    return errors, []


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubTestServer

    def log_message(self, format, *args):  # quiet
        pass

    # ---------------------------------------------------------------- plumbing
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
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[len("Bearer ") :] in self.server.storage.tokens

    def _require_write(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo_for_read(self, repo_id: str) -> dict:
        repo = self.server.storage.load_repo(repo_id)
        if repo["private"] and not self._authorized():
            raise HubError(401, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _dispatch(self, method: str) -> None:
        self.body = self._read_body()  # always consume the body first
        parts = urlsplit(self.path)
        self.query = parse_qs(parts.query)
        segments = [unquote(s) for s in parts.path.split("/")[1:]]
        self.server.request_log.append((method, parts.path))
        try:
            self._route(method, segments)
        except HubError as error:
            headers = {**error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            headers["X-Error-Message"] = error.message
            body = json.dumps({"error": error.message}).encode()
            self._send(error.status, body, headers, head=method == "HEAD")
        except Exception as error:  # a server bug: report it as a 500 with the message
            self._send(500, json.dumps({"error": f"{type(error).__name__}: {error}"}).encode(), head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    # ---------------------------------------------------------------- routing
    def _route(self, method: str, s: list[str]) -> None:
        storage = self.server.storage
        if s[:2] == ["api", "whoami-v2"]:
            self._require_write()
            return self._json(
                200, {"type": "user", "name": DEFAULT_USER, "orgs": [], "auth": {"type": "access_token"}}
            )
        if s[:2] == ["api", "validate-yaml"] and method == "POST":
            content = json.loads(self.body or b"{}").get("content", "")
            errors, warnings = validate_card_metadata(content)
            data = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
            return self._json(400 if errors else 200, data)
        if s[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if s[:3] == ["api", "repos", "delete"] and method == "DELETE":
            self._require_write()
            payload = json.loads(self.body or b"{}")
            storage.delete_repo(f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}")
            return self._send(200, b"{}")
        if len(s) >= 4 and s[0] == "api" and s[1] == "models":
            return self._route_api(method, f"{s[2]}/{s[3]}", s[4:])
        if len(s) >= 3 and s[0] == "api" and s[1] in ("datasets", "spaces"):
            raise HubError(404, f"{s[1]} are not served by this test Hub", "RepoNotFound")
        if len(s) >= 2 and s[0] == "_lfs":
            return self._lfs_object(method, s[1])
        if len(s) >= 6 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"]:
            return self._lfs_batch(f"{s[0]}/{s[1][: -len('.git')]}")
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(method, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        raise HubError(404, f"No route for {method} {self.path}")

    def _route_api(self, method: str, repo_id: str, rest: list[str]) -> None:
        storage = self.server.storage
        if not rest and method == "GET":
            return self._repo_info(repo_id, None)
        action = rest[0] if rest else ""
        if action == "revision" and method == "GET":
            return self._repo_info(repo_id, "/".join(rest[1:]))
        if action == "preupload" and method == "POST":
            return self._preupload(repo_id, "/".join(rest[1:]))
        if action == "commit" and method == "POST":
            return self._commit(repo_id, "/".join(rest[1:]))
        if action == "tree" and method == "GET":
            return self._tree(repo_id, rest[1], "/".join(rest[2:]))
        if action == "paths-info" and method == "POST":
            return self._paths_info(repo_id, "/".join(rest[1:]))
        if action == "refs" and method == "GET":
            repo = self._repo_for_read(repo_id)
            ref = lambda name, prefix, sha: {"name": name, "ref": f"{prefix}{name}", "targetCommit": sha}  # noqa: E731
            data = {
                "branches": [ref(n, "refs/heads/", sha) for n, sha in repo["branches"].items()],
                "tags": [ref(n, "refs/tags/", sha) for n, sha in repo["tags"].items()],
                "converts": [],
                "pullRequests": [{"name": n, "ref": n, "targetCommit": sha} for n, sha in repo["prs"].items()],
            }
            return self._json(200, data)
        if action == "commits" and method == "GET":
            self._repo_for_read(repo_id)
            _, sha = storage.resolve(repo_id, "/".join(rest[1:]))
            commits = [
                {"id": c["id"], "title": c["title"], "message": c["message"], "authors": [], "date": c["date"]}
                for c in storage.history(repo_id, sha)
            ]
            return self._json(200, commits)
        if action == "branch" and method in ("POST", "DELETE"):
            return self._branch(method, repo_id, "/".join(rest[1:]))
        if action == "tag" and method in ("POST", "DELETE"):
            return self._tag(method, repo_id, "/".join(rest[1:]))
        raise HubError(404, f"No route for {method} {self.path}")

    # ---------------------------------------------------------------- repos
    def _create_repo(self) -> None:
        self._require_write()
        payload = json.loads(self.body or b"{}")
        if payload.get("type", "model") != "model":
            raise HubError(400, f"Only model repos are served by this test Hub, got type {payload.get('type')!r}")
        name = payload.get("name", "")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HubError(400, f"Invalid repo name {name!r}")
        repo_id = f"{payload.get('organization') or DEFAULT_USER}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.server.endpoint}/{repo_id}"
        try:
            self.server.storage.create_repo(repo_id, private)
        except HubError as error:
            if error.status == 409:
                return self._json(409, {"error": error.message, "url": url})
            raise
        return self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _repo_info(self, repo_id: str, revision: str | None) -> None:
        storage = self.server.storage
        repo = self._repo_for_read(repo_id)
        _, sha = storage.resolve(repo_id, revision)
        commit = storage.load_commit(repo_id, sha)
        blobs = self.query.get("blobs", ["False"])[0].lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": entry["ptr"]}
            siblings.append(sibling)
        card_data = None
        if "README.md" in commit["files"]:
            card_data, _ = _front_matter(storage.read_object(commit["files"]["README.md"]["sha256"]).decode())
        card = card_data or {}
        tags = card.get("tags") or []
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo["created"])),
            "private": repo["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"),
            "tags": [tags] if isinstance(tags, str) else list(tags),
            "cardData": card_data,
            "siblings": siblings,
        }
        return self._json(200, info)

    def _branch(self, method: str, repo_id: str, branch: str) -> None:
        self._require_write()
        storage = self.server.storage
        with storage.lock:
            repo = storage.load_repo(repo_id)
            if method == "DELETE":
                if branch not in repo["branches"]:
                    raise HubError(404, f"Branch {branch} not found", "RevisionNotFound")
                del repo["branches"][branch]
            else:
                if branch in repo["branches"]:
                    raise HubError(409, f"Branch {branch} already exists")
                starting_point = (json.loads(self.body or b"{}") or {}).get("startingPoint")
                _, sha = storage.resolve(repo_id, starting_point)
                repo["branches"][branch] = sha
            storage.save_repo(repo_id, repo)
        return self._send(200, b"{}")

    def _tag(self, method: str, repo_id: str, revision: str) -> None:
        self._require_write()
        storage = self.server.storage
        with storage.lock:
            repo = storage.load_repo(repo_id)
            if method == "DELETE":
                if revision not in repo["tags"]:
                    raise HubError(404, f"Tag {revision} not found", "RevisionNotFound")
                del repo["tags"][revision]
            else:
                tag = (json.loads(self.body or b"{}") or {}).get("tag")
                if not tag:
                    raise HubError(400, "Missing `tag`")
                if tag in repo["tags"]:
                    raise HubError(409, f"Tag {tag} already exists")
                _, sha = storage.resolve(repo_id, revision)
                repo["tags"][tag] = sha
            storage.save_repo(repo_id, repo)
        return self._send(200, b"{}")

    # ---------------------------------------------------------------- upload
    def _preupload(self, repo_id: str, revision: str) -> None:
        self._require_write()
        storage = self.server.storage
        storage.load_repo(repo_id)
        create_pr = self.query.get("create_pr", ["0"])[0] == "1"
        try:
            _, sha = storage.resolve(repo_id, revision)
            files = storage.load_commit(repo_id, sha)["files"]
        except HubError:
            if not create_pr:
                raise
            files = {}
        result = []
        for file in json.loads(self.body or b"{}").get("files", []):
            path, size = file["path"], int(file["size"])
            lfs = size > LFS_SIZE_THRESHOLD or any(fnmatch.fnmatch(os.path.basename(path), p) for p in LFS_PATTERNS)
            existing = files.get(path)
            oid = None
            if existing is not None:
                oid = existing["sha256"] if existing["lfs"] else existing["oid"]
            result.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return self._json(200, {"files": result})

    def _lfs_batch(self, repo_id: str) -> None:
        self._require_write()
        storage = self.server.storage
        storage.load_repo(repo_id)
        payload = json.loads(self.body or b"{}")
        if payload.get("operation") != "upload":
            raise HubError(400, f"Only LFS uploads are supported, got {payload.get('operation')!r}")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not storage.has_object(oid):
                entry["actions"] = {
                    "upload": {"href": f"{self.server.endpoint}/_lfs/{oid}", "header": {}},
                    "verify": {"href": f"{self.server.endpoint}/_lfs/verify", "header": {}},
                }
            objects.append(entry)
        return self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_object(self, method: str, oid: str) -> None:
        storage = self.server.storage
        if oid == "verify" and method == "POST":
            payload = json.loads(self.body or b"{}")
            if not storage.has_object(payload.get("oid", "")):
                raise HubError(404, f"LFS object {payload.get('oid')} not found")
            return self._send(200, b"{}")
        if method != "PUT":
            raise HubError(405, f"{method} not allowed on LFS objects")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match sha256 {oid}")
        storage.put_object(self.body)
        return self._send(200, b"", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def _commit(self, repo_id: str, revision: str) -> None:
        self._require_write()
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        with self.server.hook_lock:
            if self.server.fail_commits > 0:
                self.server.fail_commits -= 1
                raise HubError(500, "Injected failure: the commit was not applied")
        create_pr = self.query.get("create_pr", ["0"])[0] == "1"
        sha, pr_path = self.server.storage.commit(repo_id, revision, lines[0]["value"], lines[1:], create_pr)
        return self._json(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{sha}",
                "pullRequestUrl": f"{self.server.endpoint}{pr_path}" if pr_path else None,
            },
        )

    # ---------------------------------------------------------------- listing
    def _tree(self, repo_id: str, revision: str, path: str) -> None:
        storage = self.server.storage
        self._repo_for_read(repo_id)
        _, sha = storage.resolve(repo_id, revision)
        files = storage.load_commit(repo_id, sha)["files"]
        recursive = self.query.get("recursive", ["False"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        entries, folders = [], set()
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :].split("/")
            for depth in range(1, len(rel)):
                folder = prefix + "/".join(rel[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append(_folder_entry(folder, files))
            if recursive or len(rel) == 1:
                entries.append(_path_entry(p, files[p]))
        return self._json(200, entries)

    def _paths_info(self, repo_id: str, revision: str) -> None:
        storage = self.server.storage
        self._repo_for_read(repo_id)
        _, sha = storage.resolve(repo_id, revision)
        files = storage.load_commit(repo_id, sha)["files"]
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(self.body or b"{}").get("paths", [])
        else:
            paths = parse_qs(self.body.decode()).get("paths", [])
        result = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                result.append(_path_entry(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                result.append(_folder_entry(path, files))
        return self._json(200, result)

    # ---------------------------------------------------------------- download
    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        storage = self.server.storage
        self._repo_for_read(repo_id)
        _, sha = storage.resolve(repo_id, revision)
        files = storage.load_commit(repo_id, sha)["files"]
        if path not in files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        entry = files[path]
        etag = entry["sha256"] if entry["lfs"] else entry["oid"]
        data = b"" if method == "HEAD" else storage.read_object(entry["sha256"])
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Length": str(entry["size"]),
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(os.path.basename(path))}",
        }
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry["size"])})
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else entry["size"] - 1
            if start >= entry["size"]:
                raise HubError(
                    416, "Requested range not satisfiable", None, {"Content-Range": f"bytes */{entry['size']}"}
                )
            end = min(end, entry["size"] - 1)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry['size']}"
            headers["Content-Length"] = str(end - start + 1)
            data = data[start : end + 1]
        self._send(status, data, headers, head=method == "HEAD")


class HubTestServer(ThreadingHTTPServer):
    """The loopback Hub: `with HubTestServer(port) as hub:` serves from a temporary folder until closed."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, root: str | None = None):
        super().__init__(("127.0.0.1", port), HubRequestHandler)
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="diffusers-experts-test-hub-")
        self.storage = HubStorage(self.root)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.fail_commits = 0
        self.hook_lock = threading.Lock()
        self.request_log: list[tuple[str, str]] = []
        self._thread: threading.Thread | None = None

    def start(self) -> HubTestServer:
        self._thread = threading.Thread(target=self.serve_forever, name="test-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubTestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # manual use: python tests/hub_server.py [port]
    import sys

    server = HubTestServer(int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("HUB_TEST_PORT", "0")))
    print(f"test Hub at {server.endpoint}, storage in {server.root}")
    try:
        server.serve_forever()
    finally:
        server.stop()
