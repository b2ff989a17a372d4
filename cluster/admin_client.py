"""The CLI's side of the admin API: a few JSON calls over HTTP with the admin token (stdlib only).

The token comes from `--token`, else `$MOERAY_ADMIN_TOKEN`, else the file a local `moeray serve`
writes (`~/.moeray/admin-token`). A refusal from the server (a rejected policy, a bad move)
raises ValueError with the server's message, so the CLI prints it and exits 2.
"""

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
TOKEN_FILE = Path.home() / ".moeray" / "admin-token"


def resolve_token(token: str | None) -> str:
    if token:
        return token
    if os.environ.get("MOERAY_ADMIN_TOKEN"):
        return os.environ["MOERAY_ADMIN_TOKEN"]
    if TOKEN_FILE.is_file():
        return TOKEN_FILE.read_text().strip()
    raise ValueError(f"no admin token: pass --token, set MOERAY_ADMIN_TOKEN, or run on the server's machine "
                     f"(moeray serve writes {TOKEN_FILE})")


class AdminClient:
    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout_s: float = 60.0):
        self.url, self.token, self.timeout_s = url.rstrip("/"), resolve_token(token), timeout_s

    def get(self, path: str) -> dict:
        return self._call("GET", path)

    def put_text(self, path: str, text: str, headers: dict | None = None) -> dict:
        return self._call("PUT", path, text.encode(), {"Content-Type": "application/yaml", **(headers or {})})

    def post_json(self, path: str, body: dict) -> dict:
        return self._call("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _call(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None) -> dict:
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {self.token}", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {err.code} {err.reason}"
            if err.code in (400, 401, 403, 404, 409):
                raise ValueError(message) from None
            raise RuntimeError(message) from None
        except urllib.error.URLError as err:
            raise RuntimeError(f"cannot reach the moeray server at {self.url}: {err.reason}") from None


def server_flags(parser) -> None:
    """`--url` and `--token`, the same on every command that talks to a running server."""
    parser.add_argument("--url", default=DEFAULT_URL, help="the server's HTTP address (default %(default)s)")
    parser.add_argument("--token", default=None, help="admin token (default: $MOERAY_ADMIN_TOKEN, "
                                                      "else the local server's ~/.moeray/admin-token)")
