"""Who sent a request: the client identity that expert load is attributed to (and rate-limited by).

From the HTTP headers or gRPC metadata, first match wins:
  `x-moeray-client: NAME`        a name the client or a gateway in front sets
  `authorization: Bearer KEY`    an API key, kept only as `key:` + the first 12 hex digits of its SHA-256
otherwise "anonymous". Names are cut to 64 characters so a client cannot blow up label sets.
"""

import hashlib

from moeray.actors.router import ANONYMOUS

CLIENT_HEADER = "x-moeray-client"
MAX_LENGTH = 64


def client_identity(carrier: dict[str, str]) -> str:
    lowered = {k.lower(): v for k, v in carrier.items() if isinstance(v, str)}
    name = lowered.get(CLIENT_HEADER, "").strip()
    if name:
        return name[:MAX_LENGTH]
    scheme, _, key = lowered.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return "key:" + hashlib.sha256(key.strip().encode()).hexdigest()[:12]
    return ANONYMOUS
