"""API Gateway as the fakes answer through it: its error bodies, AK/SK and app signature checks."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from urllib.parse import unquote

from aiohttp import web

# APIG error codes (API Gateway "Error Codes" table; ModelArts services sit behind APIG).
# The body shape {"error_code", "error_msg", "request_id"} is APIG's, e.g. the APIG.0301
# examples in "Common Errors Related to IAM Authentication Information".
_APIG_ERRORS: dict[int, tuple[str, str]] = {
    400: ("APIG.0201", "API request error."),
    401: ("APIG.0307", "The token must be updated."),
    403: ("APIG.0306", "API access denied."),
    404: ("APIG.0101", "The API does not exist or has not been published in the environment."),
    413: ("APIG.0201", "Request entity too large."),
    429: ("APIG.0308", "The throttling threshold has been reached."),
    500: ("APIG.0601", "Internal server error."),
    502: ("APIG.0201", "Backend unavailable."),
    503: ("APIG.0613", "The IAM service is currently unavailable."),
    504: ("APIG.0201", "Backend timeout."),
}
# A request without X-Auth-Token: APIG.0301 with this message (Huawei OCR FAQ "How Do I Handle
# the Error APIG.0301?"). Expired or revoked tokens get APIG.0307 "The token must be updated."
# (APIG error codes; IAM iam_30_0001: "If 'The token must be updated' is returned ... the token
# has expired or is invalid").
APIG_NO_TOKEN = ("APIG.0301", "Incorrect IAM authentication information: x-auth-token not found")

# --- AK/SK and app authentication, as APIG answers it --------------------------------------------
# IAM AK/SK failures are APIG.0301 (API Gateway FAQ "Incorrect IAM authentication information",
# apig-faq-0003): "Get secretKey failed,ak:...,err:ak not exist" for an unknown AK, "verify aksk
# signature fail,canonicalRequest:..." (the gateway's canonical request, lines joined with "|")
# for a wrong signature; a stale X-Sdk-Date: "calc ak sk signature fail:signature expired"
# (SIS FAQ). App failures are APIG.0303 (apig-faq-0009 "Incorrect app authentication
# information"): "app not found, appkey ...", "verify signature fail, canonicalRequest:...",
# "signature expired, signature time:...,server time:...". APIG rejects an X-Sdk-Date more than
# 15 minutes away from its own clock ("API Request Signing Guide", Constructing a Standard
# Request). Where the docs give no exact text, the code's generic message from APIG's error-code
# table is used ("Incorrect IAM/app authentication information.").
SIGNATURE_MAX_SKEW = 15 * 60
IAM_AUTH = "Incorrect IAM authentication information"
APP_AUTH = "Incorrect app authentication information"
# ModelArts MaaS / API-key services (MaaS "Error Codes"): 400 ModelArts.81002 when Authorization
# is missing or not "Bearer ...", 401 ModelArts.81003 when the key does not parse or is unknown.
MAAS_NO_KEY = (400, "ModelArts.81002", "Failed to get the authorization header.")
MAAS_BAD_KEY = (401, "ModelArts.81003", "Invalid authorization header.")

SDK_AUTH = re.compile(
    r"^SDK-HMAC-SHA256\s+Access=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*Signature=([0-9a-fA-F]+)$"
)
_SDK_DATE = re.compile(r"^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z$")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")


def _percent(text: str) -> bytes:
    """RFC 3986 percent-encoding of everything but unreserved bytes (the fake's own encoder)."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        out += bytes((byte,)) if byte in _UNRESERVED else b"%%%02X" % byte
    return bytes(out)


def verify_view(method: str, raw_path: str, raw_query: str) -> list[bytes]:
    """Method, URI and query lines of the canonical request, built the way APIG checks them."""
    uri = b"/".join(_percent(part) for part in unquote(raw_path).split("/"))
    if not uri.endswith(b"/"):
        uri += b"/"
    pairs: list[tuple[str, str]] = []
    for item in raw_query.split("&") if raw_query else []:
        if "=" in item:
            k, v = item.split("=", 1)
        else:
            k, v = item, ""
        if k:
            pairs.append((unquote(k), unquote(v)))
    query = b"&".join(_percent(k) + b"=" + _percent(v) for k, v in sorted(pairs))
    return [method.upper().encode(), uri, query]


def sdk_time(value: str) -> float | None:
    """Epoch seconds of an X-Sdk-Date (``YYYYMMDDTHHMMSSZ``, UTC), None if malformed."""
    if not _SDK_DATE.match(value):
        return None
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def apig_error(status: int, code: str | None = None, message: str | None = None) -> web.Response:
    """An APIG-shaped error with a fresh 32-hex request id (also sent as X-Request-Id)."""
    default_code, default_message = _APIG_ERRORS.get(status, ("APIG.0201", "API request error."))
    request_id = uuid.uuid4().hex
    body = {
        "error_code": code or default_code,
        "error_msg": message or default_message,
        "request_id": request_id,
    }
    return web.json_response(body, status=status, headers={"X-Request-Id": request_id})


def maas_error(status: int, code: str, message: str) -> web.Response:
    """MaaS' own error shape: ``{"error_code", "error_msg"}`` (MaaS "Error Codes")."""
    return web.json_response({"error_code": code, "error_msg": message}, status=status)


def openai_error(status: int, message: str, type_: str = "BadRequestError") -> web.Response:
    """vLLM's OpenAI-compatible error body (``object: error``, message, type, param, code)."""
    body = {"object": "error", "message": message, "type": type_, "param": None, "code": status}
    return web.json_response(body, status=status)
