"""The admin API (`/admin/*` on the HTTP port): placement, load, policy, manual migration.

Operators' and the CLI's way into a running server (`moeray placement show`, `moeray policy
apply`, `moeray placement migrate`, `moeray top`). Every route needs `Authorization: Bearer
<token>` (the server's admin token, compared in constant time); errors are
`{"error": {"message", "type"}}` with 401, 400 (a rejected policy or move: the message lists every
problem) or 409 (the autoscaler is off).

    GET  /admin/placement            the live plan and the router's counters
    GET  /admin/stats?window_s=10    the router's counters and throughput over the window
    GET  /admin/load?window_s=60     LoadSnapshot.to_dict()
    GET  /admin/clients              per client: routed pairs, concentration score, hot experts, flagged
    GET  /admin/policy               the policy in force, its source and reload counts
    PUT  /admin/policy               body: policy YAML (header X-Policy-Source names it in errors)
    POST /admin/scale                body: {"expert_groups": N} — resize the pool (it runs in the background)
    POST /admin/migrate              body: {"layer", "expert", "to_group"?, "from_group"?} (replicate/move/drop)
    GET  /admin/autoscaler?limit=50  phase, migrations, reloads and the recent decisions
"""

import hmac
import json

import ray
from fastapi.responses import JSONResponse

from moeray.cluster.remote_errors import unwrap


class AdminError(Exception):
    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status_code, self.message, self.type = status_code, message, type

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type}}, status_code=self.status_code)


def authorize(header: str | None, token: str | None) -> None:
    if not token:
        raise AdminError(403, "the admin API is disabled on this server", "permission_error")
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise AdminError(401, "the admin API needs 'Authorization: Bearer <admin token>' "
                              "(moeray serve prints where it keeps it)", "authentication_error")


def need_controller(controller) -> None:
    if controller is None:
        raise AdminError(409, "the placement autoscaler is off on this server (serve with autoscaler: true)",
                         "conflict_error")


async def call(ref) -> object:
    """Await an actor call; the actor's own ValueError (a rejected policy or move) becomes a 400."""
    try:
        return await ref
    except ray.exceptions.RayTaskError as err:
        cause = unwrap(err)
        if isinstance(cause, ValueError):
            raise AdminError(400, str(cause)) from None
        raise


def parse_migrate(body: bytes) -> dict:
    """{"layer", "expert", "to_group", "from_group"?} as ints; 400 naming the field otherwise."""
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdminError(400, f"body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise AdminError(400, "body must be a JSON object {layer, expert, to_group?, from_group?}")
    unknown = set(data) - {"layer", "expert", "to_group", "from_group"}
    if unknown:
        raise AdminError(400, f"unknown field {sorted(unknown)[0]!r} (expected layer, expert, to_group, from_group)")
    for name in ("layer", "expert", "to_group", "from_group"):
        if name in ("to_group", "from_group") and data.get(name) is None:
            continue
        if type(data.get(name)) is not int:
            raise AdminError(400, f"{name} must be an integer, got {data.get(name)!r}")
    return {"layer": data["layer"], "expert": data["expert"], "to_group": data.get("to_group"),
            "from_group": data.get("from_group")}


def parse_scale(body: bytes) -> int:
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdminError(400, f"body is not valid JSON: {err}") from None
    if not isinstance(data, dict) or set(data) != {"expert_groups"} or type(data["expert_groups"]) is not int:
        raise AdminError(400, f"body must be {{\"expert_groups\": N}} with N an integer, got {data!r}")
    return data["expert_groups"]


def parse_window(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise AdminError(400, f"window_s={text!r} must be a number of seconds") from None
    if not value > 0:
        raise AdminError(400, f"window_s={text!r} must be > 0")
    return value


def parse_limit(text: str | None, default: int = 50) -> int:
    if text is None:
        return default
    if not text.isdigit() or int(text) < 1:
        raise AdminError(400, f"limit={text!r} must be an integer >= 1")
    return int(text)


def throughput(steps: list, window_s: float) -> dict:
    """Steps (end time, seconds, tokens, staging) of the last `window_s` -> rates and step latency."""
    seconds = sorted(s[1] for s in steps)
    return {"window_s": window_s, "steps_per_s": len(steps) / window_s,
            "tokens_per_s": sum(s[2] for s in steps) / window_s,
            "step_ms_p50": 1000 * seconds[len(seconds) // 2] if seconds else None,
            "step_ms_p99": 1000 * seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))] if seconds else None}
