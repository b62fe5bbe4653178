"""A fake ModelArts LLM online service (vLLM-style, OpenAI-compatible) behind APIG."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.testing.apig import (
    APIG_NO_TOKEN,
    APP_AUTH,
    IAM_AUTH,
    MAAS_BAD_KEY,
    MAAS_NO_KEY,
    SDK_AUTH,
    SIGNATURE_MAX_SKEW,
    apig_error,
    maas_error,
    openai_error,
    sdk_time,
    verify_view,
)
from gateway.testing.common import MODELARTS_MAX_BODY, SSE_CONTENT_TYPE, Json, abort, forever
from gateway.testing.script import RecordedRequest, Script


class FakeModelArts:
    """A ModelArts online service running an OpenAI-compatible LLM (vLLM-style) behind APIG.

    Routes live under ``base_path`` = ``/v1/infers/{service_id}``, the path of the API URL shown on
    a real-time service's "Usage Guides" tab; anything else is APIG's 404 APIG.0101.

    Authentication, chosen at deploy time on a real service, is whatever is configured here (any
    mix; none at all means an open service): ``token_checker`` (IAM token in X-Auth-Token),
    ``aksk`` (IAM AK -> SK, SDK-HMAC-SHA256 signatures; ``security_tokens`` AK -> the
    X-Security-Token a temporary AK must send), ``app_aksk`` (AppKey -> AppSecret, same
    signatures), ``app_codes`` (X-Apig-AppCode) and ``api_keys`` (``Authorization: Bearer``).
    Signatures are checked by this module's own code, against ``clock`` (15 minutes of skew).
    """

    def __init__(
        self,
        *,
        token_checker: Callable[[str], bool] | None = None,
        service_id: str = "2b7e5f0c3d4a4e8f9a1b6c7d8e9f0a1b",
        model: str = "qwen2-7b",
        api_keys: Iterable[str] = (),
        app_codes: Iterable[str] = (),
        aksk: Mapping[str, str] | None = None,
        app_aksk: Mapping[str, str] | None = None,
        security_tokens: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token_checker = token_checker
        self.api_keys: set[str] = set(api_keys)
        self.app_codes: set[str] = set(app_codes)
        self.aksk: dict[str, str] = dict(aksk or {})
        self.app_aksk: dict[str, str] = dict(app_aksk or {})
        self.security_tokens: dict[str, str] = dict(security_tokens or {})
        self.clock = clock
        self.authenticated: list[str] = []  # the mode that let each accepted request in
        self.service_id = service_id
        self.model = model
        self.base_path = f"/v1/infers/{service_id}"
        self.script = Script()
        self.requests: list[RecordedRequest] = []
        self.unauthorized = 0
        self.open_streams = 0
        self.disconnects = 0
        self.stream_closed = asyncio.Event()
        self.app = web.Application(
            client_max_size=MODELARTS_MAX_BODY, middlewares=[self._record_middleware()]
        )
        base = self.base_path
        self.app.router.add_post(f"{base}/v1/chat/completions", self._chat)
        self.app.router.add_post(f"{base}/v1/sse", self._sse)
        self.app.router.add_get(f"{base}/v1/models", self._models)
        self.app.router.add_route("*", "/{tail:.*}", self._not_found)

    def _record_middleware(self) -> Middleware:
        """Record every request, rejected ones included, before any other processing."""

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                self._append(request, b"")
                return apig_error(413)
            self._append(request, body)
            return await handler(request)

        return record

    def _append(self, request: web.Request, body: bytes) -> None:
        headers: dict[str, str] = {}
        for key in request.headers:
            if key not in headers:
                headers[key] = ", ".join(request.headers.getall(key))
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query_string=request.query_string,
                headers=headers,
                body=body,
            )
        )

    async def _reject(self, request: web.Request) -> web.Response | None:
        """APIG's answer if the request must not reach the model (credential, scripted status)."""
        refused = await self._authenticate(request)
        if refused is not None:
            self.unauthorized += 1
            return refused
        status = self.script.status
        if status is not None:
            if status == 401:
                self.unauthorized += 1
            return apig_error(status)
        return None

    async def _authenticate(self, request: web.Request) -> web.Response | None:
        """None if a configured mode accepts the request (recorded), else that mode's error."""
        iam = self.token_checker is not None or bool(self.aksk)
        app = bool(self.app_aksk or self.app_codes)
        if not (iam or app or self.api_keys):
            return None  # a service deployed without authentication
        headers = request.headers
        authorization = headers.get("Authorization", "")
        if authorization.startswith("SDK-HMAC-SHA256") and (self.aksk or self.app_aksk):
            return await self._check_signature(request, authorization)
        if authorization.startswith("Bearer ") and self.api_keys:
            if authorization[len("Bearer ") :] not in self.api_keys:
                return maas_error(*MAAS_BAD_KEY)
            self._accept("api_key")
            return None
        code = headers.get("X-Apig-AppCode")
        if code is not None and self.app_codes:
            if code not in self.app_codes:
                return apig_error(401, "APIG.0303", f"{APP_AUTH}.")
            self._accept("app_code")
            return None
        token = headers.get("X-Auth-Token")
        if token and self.token_checker is not None:
            if not self.token_checker(token):
                return apig_error(401)
            self._accept("token")
            return None
        if self.api_keys:
            return maas_error(*MAAS_NO_KEY)
        if iam:
            return apig_error(401, *APIG_NO_TOKEN)
        return apig_error(401, "APIG.0303", f"{APP_AUTH}.")

    def _accept(self, mode: str) -> None:
        self.authenticated.append(mode)

    async def _check_signature(
        self, request: web.Request, authorization: str
    ) -> web.Response | None:
        """Verify an SDK-HMAC-SHA256 signature independently of the gateway's signer."""
        m = SDK_AUTH.match(authorization)
        key = m.group(1) if m else ""
        if key in self.aksk:
            code, prefix, secret, mode = "APIG.0301", IAM_AUTH, self.aksk[key], "aksk"
        elif key in self.app_aksk:
            code, prefix, secret, mode = "APIG.0303", APP_AUTH, self.app_aksk[key], "app_aksk"
        elif self.aksk:
            return apig_error(
                401, "APIG.0301", f"{IAM_AUTH}: Get secretKey failed,ak:{key},err:ak not exist"
            )
        else:
            return apig_error(401, "APIG.0303", f"{APP_AUTH}: app not found, appkey {key}")
        if m is None:
            return apig_error(401, code, f"{prefix}.")
        signed_names = m.group(2).split(";")
        claimed = m.group(3).lower()
        sdk_date = request.headers.get("X-Sdk-Date", "")
        when = sdk_time(sdk_date)
        if "x-sdk-date" not in signed_names or when is None:
            return apig_error(401, code, f"{prefix}.")
        now = self.clock()
        if abs(now - when) > SIGNATURE_MAX_SKEW:
            if mode == "aksk":
                return apig_error(
                    401, code, f"{prefix}: calc ak sk signature fail:signature expired"
                )
            server_time = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
            return apig_error(
                401,
                code,
                f"{prefix}: signature expired, signature time:{sdk_date},server time:{server_time}",
            )
        raw_path, _, raw_query = request.raw_path.partition("?")  # as sent, not decoded
        lines = verify_view(request.method, raw_path, raw_query)
        header_lines = []
        for name in signed_names:
            values = request.headers.getall(name, [])
            header_lines.append(name.encode() + b":" + ",".join(v.strip() for v in values).encode())
        body_hash = hashlib.sha256(await request.read()).hexdigest()
        canonical = b"\n".join(
            [*lines, b"\n".join(header_lines) + b"\n", m.group(2).encode(), body_hash.encode()]
        )
        digest = hashlib.sha256(canonical).hexdigest()
        to_sign = f"SDK-HMAC-SHA256\n{sdk_date}\n{digest}".encode()
        expected = hmac.new(secret.encode(), to_sign, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, claimed):
            shown = canonical.decode("utf-8", "replace").replace("\n", "|")
            what = "verify aksk signature fail" if mode == "aksk" else "verify signature fail"
            return apig_error(401, code, f"{prefix}: {what}, canonicalRequest:{shown}")
        required = self.security_tokens.get(key) if mode == "aksk" else None
        if required is not None and (
            "x-security-token" not in signed_names
            or not hmac.compare_digest(request.headers.get("X-Security-Token", ""), required)
        ):
            return apig_error(401, code, f"{prefix}.")
        self._accept(mode)
        return None

    async def _not_found(self, request: web.Request) -> web.Response:
        return apig_error(404)

    async def _models(self, request: web.Request) -> web.Response:
        rejected = await self._reject(request)
        if rejected is not None:
            return rejected
        created = int(time.time())
        model = {"id": self.model, "object": "model", "created": created, "owned_by": "vllm"}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        rejected = await self._reject(request)
        if rejected is not None:
            return rejected
        try:
            body = json.loads(await request.read())
        except ValueError:
            return openai_error(400, "The request body is not valid JSON.")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return openai_error(400, "Field 'messages' is required and must be a list.")
        if body.get("stream") is True:
            return await self._stream(request, body)
        return await self._complete(request, body)

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        """ModelArts' SSE endpoint: always streams; the body is the custom image's business."""
        rejected = await self._reject(request)
        if rejected is not None:
            return rejected
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            body = {}
        return await self._stream(request, body if isinstance(body, dict) else {})

    # --- answers --------------------------------------------------------------------------------

    def _model_name(self, body: Json) -> str:
        """vLLM echoes the requested model name; the fake accepts any so aliases pass through."""
        requested = body.get("model")
        return requested if isinstance(requested, str) and requested else self.model

    def _content(self, index: int) -> str:
        text = f"token{index} "
        return text + "x" * max(0, self.script.payload_size - len(text))

    def _usage(self, body: Json) -> Json:
        prompt = 0
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                prompt += len(str(message.get("content", "")).split())
        completion = self.script.events
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def _complete(self, request: web.Request, body: Json) -> web.StreamResponse:
        """A non-streaming ``chat.completion``; stall/reset, when scripted, hit before headers."""
        script = self.script
        if script.header_delay > 0:
            await asyncio.sleep(script.header_delay)
        if script.reset_after is not None:
            abort(request)
            return web.Response()
        if script.stall_after is not None:
            await forever()
        content = "".join(self._content(i) for i in range(script.events))
        completion = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._model_name(body),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self._usage(body),
        }
        return web.json_response(completion)

    def _events(self, body: Json) -> Iterator[bytes]:
        """The SSE events of one answer, OpenAI ``chat.completion.chunk`` framing.

        Role chunk, ``events`` content chunks, a finish chunk, then (with
        ``stream_options.include_usage``) a usage chunk whose ``choices`` is empty, as the OpenAI
        API reference describes, and finally ``data: [DONE]``.
        """
        chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = self._model_name(body)

        def chunk(choices: list[Json], **extra: Any) -> bytes:
            payload = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        def choice(delta: Json, finish: str | None = None) -> list[Json]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        yield chunk(choice({"role": "assistant", "content": ""}))
        for i in range(self.script.events):
            yield chunk(choice({"content": self._content(i)}))
        yield chunk(choice({}, "stop"))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            yield chunk([], usage=self._usage(body))
        yield b"data: [DONE]\n\n"

    async def _stream(self, request: web.Request, body: Json) -> web.StreamResponse:
        """Write the answer as SSE, one ``write`` per event, following the script.

        The stream counts from here (header delay included) until the handler ends; a client that
        goes away shows up as ConnectionResetError on write or as cancellation of a pause or stall
        (``handler_cancellation``), and is counted in ``disconnects``.
        """
        script = self.script
        response = web.StreamResponse(status=200)
        response.headers["Content-Type"] = SSE_CONTENT_TYPE
        self.open_streams += 1
        try:
            if script.header_delay > 0:
                await asyncio.sleep(script.header_delay)
            await response.prepare(request)
            for written, event in enumerate(self._events(body)):
                if script.stall_after is not None and written >= script.stall_after:
                    await forever()
                if script.reset_after is not None and written >= script.reset_after:
                    abort(request)
                    return response
                if written > 0 and script.interval > 0:
                    await asyncio.sleep(script.interval)
                if script.split_events:
                    middle = len(event) // 2  # inside the data line's JSON
                    await response.write(event[:middle])
                    if script.split_pause > 0:
                        await asyncio.sleep(script.split_pause)
                    await response.write(event[middle:])
                else:
                    await response.write(event)
            await response.write_eof()
        except ConnectionResetError:
            self.disconnects += 1
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        finally:
            self.open_streams -= 1
            self.stream_closed.set()
        return response
