"""A Hugging Face Hub stand-in on 127.0.0.1 for tests without the internet: only the routes huggingface_hub calls to
list a repo and download its files (HF_ENDPOINT=server.url), with what a real link does to a download: a shared
bandwidth limit, a connection dropped in the middle of a file, a file served damaged.

    GET  /api/models/{org}/{repo}[/revision/{rev}]   model_info (?blobs=true: sizes, LFS sha256)
    HEAD /{org}/{repo}/resolve/{rev}/{path}          X-Repo-Commit, ETag (the LFS sha256), Content-Length
    GET  /{org}/{repo}/resolve/{rev}/{path}          the bytes, Range requests answered with 206

Standard library only (http.server). `python tests/hub_server.py DIR org/repo [--rate MB/s]` serves a folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "cafe0123456789abcdef0123456789abcdef0123"
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")
CHUNK = 16 << 10


class Bandwidth:
    """One link shared by every connection: at most `rate` bytes per second, in CHUNK-sized grants."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.lock = threading.Lock()
        self.next = time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + n / self.rate
        wait = start - time.monotonic()
        if wait > 0:
            time.sleep(wait)


class FakeHub:
    """Serves repos {repo_id: folder} at one commit. `drop_once` (file names): the first full download of each is
    cut off half way, the connection closed; `corrupt` ({file name: times}): that many downloads of the file carry
    one damaged byte. `log` records (method, path, range) of every request; `served` the bytes sent per file."""

    def __init__(self, repos: dict[str, str | os.PathLike], rate: float | None = None, commit: str = COMMIT):
        self.repos = {}
        for repo, folder in repos.items():
            folder = Path(folder)
            files = {}
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    data_sha = _sha256(p)
                    files[p.relative_to(folder).as_posix()] = (p, p.stat().st_size, data_sha, _git_oid(p))
            self.repos[repo] = files
        self.commit = commit
        self.bandwidth = Bandwidth(rate)
        self.drop_once: set[str] = set()
        self.corrupt: dict[str, int] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self.served: dict[str, int] = {}
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def info(self, repo: str) -> dict:
        siblings = []
        for name, (_, size, sha, oid) in self.repos[repo].items():
            entry = {"rfilename": name, "size": size, "blobId": oid}
            if self.is_lfs(name):
                entry["lfs"] = {"sha256": sha, "size": size, "pointerSize": 134}
            siblings.append(entry)
        return {"_id": "0" * 24, "id": repo, "modelId": repo, "sha": self.commit, "private": False,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_oid(path: Path) -> str:
    data = path.read_bytes() if path.stat().st_size < (1 << 20) else b""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client that went away (killed) is no news
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: FakeHub

    def log_message(self, *args) -> None:
        pass

    def _error(self, status: int, code: str, message: str, commit: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", self.server_hub.commit)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _route(self):
        hub = self.server_hub
        path = unquote(urlsplit(self.path).path)
        with hub.lock:
            hub.log.append((self.command, path, self.headers.get("Range")))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            repo, rev = m.group(1), m.group(2)
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", "Repository not found")
            if rev not in (None, "main", hub.commit):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            body = json.dumps(hub.info(repo)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)
            return
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m:
            return self._error(404, "EntryNotFound", f"no route {path}")
        repo, rev, name = m.groups()
        if repo not in hub.repos:
            return self._error(404, "RepoNotFound", "Repository not found")
        if rev not in ("main", hub.commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if name not in hub.repos[repo]:
            return self._error(404, "EntryNotFound", f"{name} does not exist", commit=True)
        return self._file(name, *hub.repos[repo][name])

    do_GET = do_HEAD = _route

    def _file(self, name: str, path: Path, size: int, sha: str, oid: str) -> None:
        hub = self.server_hub
        start, end = 0, size - 1
        ranged = self.headers.get("Range")
        if ranged:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", ranged.strip())
            if not m or int(m.group(1)) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = int(m.group(1)), min(size - 1, int(m.group(2)) if m.group(2) else size - 1)
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", hub.commit)
        self.send_header("ETag", f'"{sha if hub.is_lfs(name) else oid}"')
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = None
        bad = None
        with hub.lock:
            if name in hub.drop_once and start == 0 and end == size - 1:
                hub.drop_once.discard(name)
                cut = size // 2
            bad_at = size - 100
            if hub.corrupt.get(name) and start <= bad_at <= (end if cut is None else cut - 1):
                hub.corrupt[name] -= 1
                bad = bad_at
        with open(path, "rb") as fh:
            fh.seek(start)
            pos = start
            while pos <= end:
                n = min(CHUNK, end + 1 - pos)
                if cut is not None and pos + n > cut:
                    n = cut - pos
                data = bytearray(fh.read(n))
                if bad is not None and pos <= bad < pos + n:
                    data[bad - pos] ^= 0xFF
                hub.bandwidth.take(n)
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    return
                with hub.lock:
                    hub.served[name] = hub.served.get(name, 0) + n
                pos += n
                if cut is not None and pos >= cut:  # the link goes down in the middle of the file
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("repo")
    ap.add_argument("--rate", type=float, default=None, help="MB/s for all connections together")
    args = ap.parse_args(argv)
    with FakeHub({args.repo: args.folder}, rate=args.rate * 1e6 if args.rate else None) as hub:
        print(f"HF_ENDPOINT={hub.url}", flush=True)
        try:
            hub.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
