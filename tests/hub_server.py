"""A small Hugging Face Hub stand-in on 127.0.0.1, for pushing and pulling through the real client.

It answers the requests ``huggingface_hub`` (2.x) sends for ``create_repo``, ``upload_folder``
(preupload + ndjson commit; every file is declared "regular", so no LFS/Xet transfer is asked),
``hf_hub_download`` / ``from_pretrained`` (HEAD and GET on ``/{repo}/resolve/{revision}/{path}``),
``model_info``, ``list_repo_tree``, ``paths-info``, ``whoami`` and ``ModelCard.validate``
(``/api/validate-yaml``). Repositories live in memory, one full snapshot per commit.

Tokens are checked as the Hub does: a request carrying an unknown token gets 401, writes need a
known token, private repositories are invisible without their owner's token. ``fail(...)`` makes
the next matching requests answer an error status, to test failure handling.

Use it from tests with ``HubServer()`` (a context manager; ``.url`` is the endpoint to put in
``HF_ENDPOINT``), or run ``python tests/hub_server.py --port 8765`` to poke at it by hand.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_TOKENS = {"hf_test_write_token": "tester"}
# pipeline tags the validator accepts (the ones hf_flop writes, and a few neighbours)
PIPELINE_TAGS = {
    "text-classification",
    "text-generation",
    "fill-mask",
    "token-classification",
    "question-answering",
    "feature-extraction",
    "sentence-similarity",
    "zero-shot-classification",
    "summarization",
    "translation",
}


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    owner: str
    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, files), oldest first

    def snapshot(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == revision), None)


@dataclass
class Failure:
    method: str
    pattern: re.Pattern
    status: int
    remaining: int


class HubState:
    """Repositories, tokens, injected failures and a log of the requests seen."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)
        self.repos: dict[str, Repo] = {}
        self.failures: list[Failure] = []
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()

    def new_commit(self, repo: Repo, files: dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(f"{len(repo.commits)}:{message}:{time.time_ns()}".encode()).hexdigest()
        repo.commits.append((sha, files))
        return sha


class _Reply(Exception):
    """Raised by a route to answer with an error status (and the Hub's error headers)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    # --- plumbing ----------------------------------------------------------------------------------
    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.server.state.log.append((self.command, self.path, status))

    def _json(self, status: int, data, head: bool = False) -> None:
        self._send(status, json.dumps(data).encode(), head=head)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        user = self.server.state.tokens.get(auth[len("Bearer ") :])
        if user is None:
            raise _Reply(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        user = self._user()
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise _Reply(404 if user else 401, "Repository not found", "RepoNotFound")
        if write and user != repo.owner:
            raise _Reply(403 if user else 401, "You don't have the rights to write to this repository")
        return repo

    def _dispatch(self, head: bool = False) -> None:
        path = unquote(urlsplit(self.path).path)
        state = self.server.state
        # read the whole body first: an error answer must not leave it on a kept-alive connection
        self.body = self._read_body() if self.command == "POST" else b""
        try:
            with state.lock:
                for failure in state.failures:
                    if failure.remaining and failure.method == self.command and failure.pattern.search(path):
                        failure.remaining -= 1
                        raise _Reply(failure.status, "injected failure")
                for method, pattern, route in ROUTES:
                    match = re.fullmatch(pattern, path)
                    if match and method == ("GET" if head else self.command):
                        return route(self, head, **match.groupdict())
                raise _Reply(404, f"no route for {self.command} {path}")
        except _Reply as reply:
            headers = {"X-Error-Message": reply.message}
            if reply.code:
                headers["X-Error-Code"] = reply.code
            self._send(reply.status, json.dumps({"error": reply.message}).encode(), headers, head=head)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_POST(self) -> None:
        self._dispatch()

    # --- routes ------------------------------------------------------------------------------------
    def whoami(self, head: bool) -> None:
        user = self._user()
        if user is None:
            raise _Reply(401, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "name": user, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def create_repo(self, head: bool) -> None:
        payload = json.loads(self.body or b"{}")
        user = self._user()
        if user is None:
            raise _Reply(401, "You must be authenticated to create a repository")
        if payload.get("type", "model") != "model":
            raise _Reply(400, "this test Hub only hosts models")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise _Reply(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        state = self.server.state
        if repo_id in state.repos:
            self._send(409, json.dumps({"error": "You already created this model repo", "url": url}).encode())
            return
        repo = Repo(owner=user, private=payload.get("visibility") == "private")
        state.new_commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "init")
        state.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def preupload(self, head: bool, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        files = repo.snapshot(revision)
        if files is None:
            raise _Reply(404, "Revision not found", "RevisionNotFound")
        payload = json.loads(self.body)
        answer = []
        for item in payload["files"]:
            current = files[1].get(item["path"])
            answer.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha(current) if current is not None else None,
                }
            )
        self._json(200, {"files": answer, "commitOid": files[0]})

    def commit(self, head: bool, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        parent = repo.snapshot(revision)
        if parent is None or revision != "main":
            raise _Reply(404, "this test Hub commits to main only", "RevisionNotFound")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, "the commit payload must start with a header line")
        files = dict(parent[1])
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _Reply(400, "file content must be base64")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
                raise _Reply(400, f"unsupported commit operation {key!r} (this Hub grants only regular uploads)")
        sha = self.server.state.new_commit(repo, files, lines[0]["value"].get("summary", ""))
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}"})

    def model_info(self, head: bool, repo_id: str, revision: str | None = None) -> None:
        repo = self._repo(repo_id)
        snap = repo.snapshot(revision or "main")
        if snap is None:
            raise _Reply(404, "Revision not found", "RevisionNotFound")
        sha, files = snap
        card = _front_matter(files.get("README.md", b"").decode("utf-8", "replace")) or {}
        self._json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "author": repo.owner,
                "sha": sha,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": card.get("tags", []),
                "pipeline_tag": card.get("pipeline_tag"),
                "library_name": card.get("library_name"),
                "cardData": card,
                "siblings": [{"rfilename": p} for p in sorted(files)],
                "lastModified": "2026-01-01T00:00:00.000Z",
            },
        )

    def resolve(self, head: bool, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        snap = repo.snapshot(revision)
        if snap is None:
            raise _Reply(404, "Revision not found", "RevisionNotFound")
        sha, files = snap
        if path not in files:
            raise _Reply(404, "Entry not found", "EntryNotFound")
        data = files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha(data)}"',
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
        }
        byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if byte_range and not head:
            start = int(byte_range.group(1))
            end = int(byte_range.group(2)) if byte_range.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start : end + 1], headers)
            return
        headers["Content-Length"] = str(len(data))
        self._send(200, data, headers, head=head)

    def tree(self, head: bool, repo_id: str, revision: str, path: str | None = None) -> None:
        path = path or ""
        repo = self._repo(repo_id)
        snap = repo.snapshot(revision)
        if snap is None:
            raise _Reply(404, "Revision not found", "RevisionNotFound")
        recursive = parse_qs(urlsplit(self.path).query).get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for name, data in sorted(snap[1].items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "path": folder, "oid": "0" * 40, "size": 0})
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": name, "oid": git_blob_sha(data), "size": len(data)})
        if prefix and not entries:
            raise _Reply(404, "Entry not found", "EntryNotFound")
        self._json(200, entries)

    def paths_info(self, head: bool, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        snap = repo.snapshot(revision)
        if snap is None:
            raise _Reply(404, "Revision not found", "RevisionNotFound")
        body = self.body
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        found = [
            {"type": "file", "path": p, "oid": git_blob_sha(snap[1][p]), "size": len(snap[1][p])}
            for p in paths
            if p in snap[1]
        ]
        self._json(200, found)

    def validate_yaml(self, head: bool) -> None:
        payload = json.loads(self.body or b"{}")
        errors = validate_card(payload.get("content", ""))
        if errors:
            self._send(400, "\n".join(errors).encode(), {"Content-Type": "text/plain"})
            return
        self._json(200, {"errors": [], "warnings": []})


_REPO = r"(?P<repo_id>[\w.-]+/[\w.-]+)"
ROUTES = [
    ("GET", r"/api/whoami-v2", Handler.whoami),
    ("POST", r"/api/repos/create", Handler.create_repo),
    ("POST", r"/api/validate-yaml", Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", Handler.commit),
    ("POST", rf"/api/models/{_REPO}/paths-info/(?P<revision>[^/]+)", Handler.paths_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)(/(?P<path>.*))?", Handler.tree),
    ("GET", rf"/api/models/{_REPO}(/revision/(?P<revision>[^/]+))?", Handler.model_info),
    ("GET", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", Handler.resolve),
]


def _front_matter(text: str) -> dict | None:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return None
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


def validate_card(text: str) -> list[str]:
    """What the Hub would reject in a model card's metadata (a subset of its rules, checked for real)."""
    try:
        meta = _front_matter(text)
    except yaml.YAMLError as err:
        return [f"metadata is not valid YAML: {err}"]
    if meta is None:
        return ["the card has no YAML metadata block (--- ... ---) at the top"]
    errors = []
    for key in ("library_name", "pipeline_tag", "license"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    if "pipeline_tag" in meta and meta["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" {meta["pipeline_tag"]!r} is not a known task')
    for key in ("tags", "datasets"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(t, str) for t in meta[key])):
            errors.append(f'"{key}" must be a list of strings')
    base = meta.get("base_model")
    if base is not None and not (
        isinstance(base, str) or (isinstance(base, list) and all(isinstance(b, str) for b in base))
    ):
        errors.append('"base_model" must be a string or a list of strings')
    for entry in meta.get("model-index", []) or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append('"model-index" entries need a "name"')
            continue
        for result in entry.get("results", []):
            task, dataset, metrics = result.get("task"), result.get("dataset"), result.get("metrics")
            if not (isinstance(task, dict) and isinstance(task.get("type"), str)):
                errors.append('"model-index" results need task.type')
            if not (isinstance(dataset, dict) and isinstance(dataset.get("type"), str) and dataset.get("name")):
                errors.append('"model-index" results need dataset.type and dataset.name')
            if not (isinstance(metrics, list) and metrics and all("type" in m and "value" in m for m in metrics)):
                errors.append('"model-index" results need metrics with type and value')
    return errors


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    url: str


class HubServer:
    """The test Hub in a background thread. ``with HubServer() as hub: ... hub.url ...``."""

    def __init__(self, port: int = 0, tokens: dict[str, str] | None = None) -> None:
        self.state = HubState(tokens)
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> HubServer:
        self._server = _Server(("127.0.0.1", self._port), Handler)
        self._server.state = self.state
        self._server.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()

    def fail(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` requests matching ``method`` and ``path_regex`` with ``status``."""
        with self.state.lock:
            self.state.failures.append(Failure(method, re.compile(path_regex), status, times))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.state.repos[repo_id].snapshot(revision)[1])

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    hub = HubServer(args.port).start()
    print(f"test Hub at {hub.url}; token {next(iter(DEFAULT_TOKENS))}; Ctrl-C to stop", flush=True)
    try:
        hub._thread.join()
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
