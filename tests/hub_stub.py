"""A local stand-in for the Hugging Face Hub (HF_ENDPOINT), for downloads and uploads.

Downloads: the repos added with `add_repo` answer the calls huggingface_hub makes to list a repo
(`/api/models/<id>[/revision/<rev>]`, `/tree/`) and to fetch a file (`HEAD`/`GET .../resolve/`),
with sizes, git blob ids and, for large files, LFS sha256 as the Hub gives them. Uploads: the calls
`create_repo` + `upload_folder` make, keeping the uploaded files. Every request is logged with
its method, path, Authorization header and answer code.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".pth", ".bin", ".model")


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, files: dict[str, bytes]):
        self.files = dict(sorted(files.items()))
        self.sha = hashlib.sha1(json.dumps({k: _git_oid(v) for k, v in self.files.items()}).encode()).hexdigest()

    def lfs(self, name: str) -> dict | None:
        data = self.files[name]
        if not name.endswith(LFS_SUFFIXES):
            return None
        return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}

    def entry(self, name: str) -> dict:
        """A file as the tree listing gives it."""
        lfs = self.lfs(name)
        out = {"type": "file", "path": name, "size": len(self.files[name]), "oid": _git_oid(self.files[name])}
        if lfs:
            out["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
        return out

    def info(self, repo_id: str, blobs: bool) -> dict:
        siblings = []
        for name, data in self.files.items():
            s = {"rfilename": name}
            if blobs:
                s.update(size=len(data), blobId=_git_oid(data))
                if self.lfs(name):
                    s["lfs"] = self.lfs(name)
            siblings.append(s)
        return {"id": repo_id, "modelId": repo_id, "sha": self.sha, "private": False, "siblings": siblings}


def repo_from_folder(folder: Path, skip=(), extra: dict[str, bytes] | None = None) -> Repo:
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(p.relative_to(folder).as_posix().startswith(s) for s in skip)}
    return Repo({**files, **(extra or {})})


class Handler(BaseHTTPRequestHandler):
    stub: "HubStub"

    def log_message(self, *args):  # keep test output quiet
        pass

    def _log(self) -> dict:
        entry = {"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"),
                 "files": {}, "code": None}
        self.stub.log.append(entry)
        self._entry = entry  # requests run on several threads: each answers its own entry
        return entry

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        """Answer; a HEAD answer has the headers of the GET one (its Content-Length too)."""
        self._entry["code"] = code
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, code: int, body) -> None:
        self._send(code, json.dumps(body).encode())

    # -- downloads ---------------------------------------------------------------------------
    def _repo(self, owner: str, name: str) -> tuple[str, Repo | None]:
        repo_id = f"{owner}/{name}"
        return repo_id, self.stub.repos.get(repo_id)

    def _file(self, parts: list[str], head: bool) -> None:
        # /<owner>/<name>/resolve/<rev>/<path...>
        repo_id, repo = self._repo(parts[0], parts[1])
        name = "/".join(parts[4:])
        if repo is None or name not in repo.files:
            return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound" if repo else "RepoNotFound"},
                              head=head)
        data = repo.files[name]
        if not head and name in self.stub.tamper:
            return self._send(200, self.stub.tamper[name], {"Content-Type": "application/octet-stream"})
        if not head and name in self.stub.fail_once:
            self.stub.fail_once.discard(name)
            return self._json(500, {"error": "stand-in failure"})
        lfs = repo.lfs(name)
        etag = lfs["sha256"] if lfs else _git_oid(data)
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": repo.sha,
                   "ETag": f'"{etag}"', "Content-Length": str(len(data)), "Accept-Ranges": "bytes"}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start = int(rng[6:].split("-")[0] or 0)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            headers["Content-Length"] = str(len(data) - start)
            return self._send(206, data[start:], headers)
        return self._send(200, data, headers, head=head)

    def do_HEAD(self):
        self._log()
        parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(parts, head=True)
        return self._send(404, b"", head=True)

    def do_GET(self):
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if url.path == "/api/agent-harnesses":  # an optional registry the client fetches; not logged
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._log()
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(parts, head=False)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, repo = self._repo(parts[2], parts[3])
            if repo is None:
                return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                return self._json(200, repo.info(repo_id, blobs="blobs=" in (url.query or "")))
            if rest[0] == "tree":
                prefix = "/".join(rest[2:])
                return self._json(200, [repo.entry(n) for n in repo.files if n.startswith(prefix)])
        return self._json(404, {"error": f"unexpected call {self.path}"})

    # -- uploads -----------------------------------------------------------------------------
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        entry = self._log()
        base = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            req = json.loads(body)
            if "denied" in req["name"]:
                return self._json(401, {"error": "Invalid credentials in Authorization header"})
            return self._json(200, {"url": f"{base}/{req.get('organization') or 'me'}/{req['name']}"})
        if self.path == "/api/validate-yaml":  # the card's front matter must parse
            try:
                import yaml

                text = json.loads(body)["content"]
                assert text.startswith("---\n")
                yaml.safe_load(text.split("---\n", 2)[1])
            except Exception as e:
                return self._json(400, {"errors": [{"message": str(e)}]})
            return self._json(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                               "shouldIgnore": False} for f in files]})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item.get("key") == "file":
                    v = item["value"]
                    entry["files"][v["path"]] = base64.b64decode(v["content"])
            return self._json(200, {"commitUrl": f"{base}/me/repo/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._json(404, {"error": f"unexpected call {self.path}"})


class HubStub:
    """The server and what it serves; `log` lists every request."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        self.fail_once: set[str] = set()  # file names whose next GET answers 500
        self.tamper: dict[str, bytes] = {}  # file name -> other bytes served than the listing describes
        handler = type("BoundHandler", (Handler,), {"stub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()

    def downloads(self) -> list[str]:
        """Files fetched with GET (answered 200 or 206), in order."""
        return [unquote(e["path"]).split("/resolve/", 1)[1].split("/", 1)[1] for e in self.log
                if e["method"] == "GET" and "/resolve/" in e["path"] and e["code"] in (200, 206)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
