"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for push tests (HF_ENDPOINT).

It answers the calls huggingface_hub makes to create a repo and a branch and to commit files
(every file is declared a regular upload, inlined in the commit), keeps what was committed per
branch, records the Authorization headers it saw, and can be told to fail the next N commits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}          # repo -> {"private": bool}
        self.commits: list[dict] = []             # {"repo", "revision", "message", "files"}
        self.branches: dict[str, set] = {}
        self.auth_headers: list[str] = []
        self.fail_commits = 0
        self.failed = 0
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, code, body=None):
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                with hub.lock:
                    hub.auth_headers.append(self.headers.get("Authorization", ""))
                path = self.path.split("?")[0]
                parts = path.strip("/").split("/")
                if path == "/api/validate-yaml":  # model card metadata check before a commit
                    return self._reply(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    body = json.loads(raw)
                    repo = f"{body.get('organization') or 'user'}/{body['name']}" \
                        if "/" not in body["name"] else body["name"]
                    if repo in hub.repos:
                        return self._reply(409, {"error": "exists", "url": hub.url(repo)})
                    hub.repos[repo] = {"private": body.get("private")}
                    hub.branches[repo] = {"main"}
                    return self._reply(200, {"url": hub.url(repo), "name": repo})
                if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models":
                    repo, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                    if action == "branch":
                        if revision in hub.branches.setdefault(repo, {"main"}):
                            return self._reply(409, {"error": "branch exists"})
                        hub.branches[repo].add(revision)
                        return self._reply(200, {})
                    if action == "preupload":
                        files = json.loads(raw)["files"]
                        return self._reply(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                            for f in files]})
                    if action == "commit":
                        with hub.lock:
                            if hub.fail_commits > 0:
                                hub.fail_commits -= 1
                                hub.failed += 1
                                return self._reply(503, {"error": "injected failure"})
                        lines = [json.loads(x) for x in raw.decode().splitlines() if x.strip()]
                        header = next(x["value"] for x in lines if x["key"] == "header")
                        files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                                 for x in lines if x["key"] == "file"}
                        oid = hashlib.sha1(raw).hexdigest()
                        with hub.lock:
                            hub.commits.append({"repo": repo, "revision": revision,
                                                "message": header["summary"], "files": files})
                        return self._reply(200, {"commitUrl": f"{hub.url(repo)}/commit/{oid}",
                                                 "commitOid": oid, "pullRequestUrl": None})
                return self._reply(404, {"error": f"not faked: POST {self.path}"})

            def do_GET(self):
                with hub.lock:
                    hub.auth_headers.append(self.headers.get("Authorization", ""))
                return self._reply(404, {"error": f"not faked: GET {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, repo: str) -> str:
        return f"{self.endpoint}/{repo}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
