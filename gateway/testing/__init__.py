"""Faithful fakes of Huawei Cloud IAM and a ModelArts LLM online service, as aiohttp apps.

The tests and the ``demo`` command run the gateway against these over real loopback sockets, so
the fakes copy the wire shapes a real deployment produces (status codes, error bodies, headers,
SSE framing) and let a test script the upstream's misbehaviour: slow headers, pauses, stalls,
resets, split events, scripted failures, revoked tokens. Every shape cites what it is based on.

All state lives on the fake instances (never at module level), so two clouds in one process do
not interfere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.testing.common import SSE_CONTENT_TYPE, serve_on_loopback
from gateway.testing.iam import FakeIAM
from gateway.testing.modelarts import FakeModelArts
from gateway.testing.oidc import OidcProvider
from gateway.testing.script import RecordedRequest, Script

__all__ = [
    "SSE_CONTENT_TYPE",
    "FakeCloud",
    "FakeIAM",
    "FakeModelArts",
    "OidcProvider",
    "RecordedRequest",
    "Script",
    "serve_on_loopback",
    "start_fake_cloud",
]


@dataclass
class FakeCloud:
    """Both fakes wired together (ModelArts checks tokens with the IAM) and serving on loopback."""

    iam: FakeIAM
    modelarts: FakeModelArts
    iam_url: str
    service_url: str
    runners: list[web.AppRunner] = field(default_factory=list)

    def iam_password_config(self) -> dict[str, Any]:
        """A gateway ``iam_password`` credential (as parsed YAML) for this cloud's user."""
        return {
            "type": "iam_password",
            "iam_url": self.iam_url,
            "domain": self.iam.domain,
            "user": self.iam.user,
            "password": self.iam.password,
            "project": next(iter(self.iam.projects)),
        }

    def workload_identity_config(self, token_file: str) -> dict[str, Any]:
        """A gateway ``workload_identity`` credential (as parsed YAML) for this cloud's cluster."""
        return {
            "type": "workload_identity",
            "iam_url": self.iam_url,
            "idp_id": self.iam.provider.idp_id,
            "token_file": token_file,
            "project": next(iter(self.iam.projects)),
        }

    async def close(self) -> None:
        """Stop both servers, newest first."""
        while self.runners:
            await self.runners.pop().cleanup()


async def start_fake_cloud(**iam_kwargs: Any) -> FakeCloud:
    """Start a FakeIAM and a FakeModelArts that accepts only that IAM's tokens."""
    iam = FakeIAM(**iam_kwargs)
    modelarts = FakeModelArts(token_checker=iam.is_valid)
    iam_runner, iam_url = await serve_on_loopback(iam.app)
    try:
        ma_runner, ma_url = await serve_on_loopback(modelarts.app)
    except BaseException:
        await iam_runner.cleanup()
        raise
    return FakeCloud(
        iam=iam,
        modelarts=modelarts,
        iam_url=iam_url,
        service_url=f"{ma_url}{modelarts.base_path}",
        runners=[iam_runner, ma_runner],
    )
