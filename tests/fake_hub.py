"""A small loopback HTTP server that answers the Hugging Face Hub's file endpoints, so that the
real `huggingface_hub` client can pull from it (point `HF_ENDPOINT` at `FakeHub.url`).

It answers what a pull asks, shaped as the Hub answers it:

- `GET /api/models/OWNER/REPO[/revision/REV]?blobs=true`: the repository, its commit (`sha`) and
  `siblings` with `rfilename`, `size`, `blobId` and, for .gguf files, `lfs` {sha256, size,
  pointerSize};
- `HEAD /OWNER/REPO/resolve/REV/FILE`: `X-Repo-Commit`, `ETag` and `X-Linked-Etag` (the sha256,
  quoted), `X-Linked-Size`, `Content-Length`, `Accept-Ranges`;
- `GET` of the same path, honouring `Range: bytes=N-` with a 206.

Faults for tests: `cut_after` sends that many bytes of the next download and drops the connection;
`refuse_downloads` answers every later download 503 (a Hub gone away), and `refuse_after_cut` turns
it on when the cut happens; `advertise_sha256`
describes a file by another hash than its bytes have (a bad mirror). `log` records each request.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    advertise_sha256: dict[str, str] = field(default_factory=dict)

    def sha256(self, name: str) -> str:
        return self.advertise_sha256.get(name) or hashlib.sha256(self.files[name]).hexdigest()


class FakeHub:
    """Start with `with FakeHub({...}) as hub:`; `hub.url` is the endpoint."""

    def __init__(self, repos: dict[str, FakeRepo]) -> None:
        self.repos = repos
        self.log: list[Request] = []
        self.cut_after: int | None = None
        self.refuse_downloads = False
        self.refuse_after_cut = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def downloads(self) -> list[Request]:
        return [r for r in self.log if r.method == "GET" and "/resolve/" in r.path]

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def _answer(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.log.append(Request(self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    return self._info("/".join(parts[2:4]))
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._file("/".join(parts[:2]), "/".join(parts[4:]), body)
                self._json(404, {"error": f"no route {path}"})

            def _json(self, status: int, payload: object, headers: dict[str, str] | None = None
                      ) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _info(self, repo_id: str) -> None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._json(404, {"error": "Repository not found"},
                                      {"X-Error-Code": "RepoNotFound"})
                siblings = []
                for name, data in repo.files.items():
                    sib: dict[str, object] = {"rfilename": name, "size": len(data),
                                              "blobId": hashlib.sha1(data).hexdigest()}
                    if name.endswith(".gguf"):
                        sib["lfs"] = {"sha256": repo.sha256(name), "size": len(data),
                                      "pointerSize": 135}
                    siblings.append(sib)
                self._json(200, {"id": repo_id, "modelId": repo_id, "sha": repo.commit,
                                 "private": False, "tags": ["gguf"], "siblings": siblings})

            def _file(self, repo_id: str, name: str, body: bool) -> None:
                repo = hub.repos.get(repo_id)
                if repo is None or name not in repo.files:
                    return self._json(404, {"error": "Entry not found"},
                                      {"X-Error-Code": "EntryNotFound"})
                data = repo.files[name]
                if body and hub.refuse_downloads:
                    return self._json(503, {"error": "Service Unavailable"})
                start = 0
                if body and (rng := self.headers.get("Range")):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                etag = f'"{repo.sha256(name)}"'
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("ETag", etag)
                self.send_header("X-Linked-Etag", etag)
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                cut = hub.cut_after
                if cut is not None:
                    hub.cut_after = None
                    hub.refuse_downloads = hub.refuse_after_cut
                    self.wfile.write(data[start:start + cut])
                    self.wfile.flush()
                    self.close_connection = True  # the rest never comes
                    return
                self.wfile.write(data[start:])

        return Handler
