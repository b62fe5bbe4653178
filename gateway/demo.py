"""``modelarts-gateway demo``: the real gateway in front of the fake IAM and model service.

A newcomer sees tokens stream without a cloud account: the fakes are the ones the tests use,
speaking the real APIs' shapes (IAM password tokens, APIG errors, OpenAI-style SSE).
"""

from __future__ import annotations

import sys
from typing import Any

from gateway.config.load import parse_settings
from gateway.config.model import Settings
from gateway.server.run import serve
from gateway.testing import FakeCloud, start_fake_cloud

DEMO_MODEL = "qwen2-7b"


def demo_config(cloud: FakeCloud, host: str, port: int) -> dict[str, Any]:
    """A gateway config (as parsed YAML) in front of ``cloud``."""
    return {
        # the fakes hold no real credential, so the demo may listen beyond loopback (containers)
        "listen": {"host": host, "port": port, "allow_unauthenticated_remote": True},
        "credentials": {"demo": cloud.iam_password_config()},
        "routes": [
            {
                "name": "demo",
                "path": "/v1",
                "upstream": cloud.service_url,
                "credential": "demo",
                "models": [DEMO_MODEL],
            }
        ],
    }


def demo_settings(cloud: FakeCloud, host: str, port: int) -> Settings:
    """Gateway settings pointing at the fakes, built through the same validation as a file."""
    return parse_settings(demo_config(cloud, host, port), {})


def instructions(base: str, python: str = "python3") -> str:
    return f"""
modelarts-gateway demo: the gateway is serving {base}/v1 in front of a fake IAM and a fake
ModelArts LLM service on loopback. Try (Ctrl-C to stop):

  curl -N {base}/v1/chat/completions \\
    -H 'Content-Type: application/json' \\
    -d '{{"model": "{DEMO_MODEL}", "stream": true,
         "messages": [{{"role": "user", "content": "Hi"}}]}}'

  {python} -m pip install -q openai   # once, for the snippet below
  {python} - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="unused")
for chunk in client.chat.completions.create(
        model="{DEMO_MODEL}", stream=True, messages=[{{"role": "user", "content": "Hi"}}]):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY
"""


async def run_demo(host: str, port: int) -> None:
    cloud = await start_fake_cloud()
    cloud.modelarts.script.events = 24
    cloud.modelarts.script.interval = 0.08  # paced like an LLM, so the stream is visible
    try:
        settings = demo_settings(cloud, host, port)

        def started(addresses: list[str]) -> None:
            shown = "localhost" if host in ("0.0.0.0", "::") else host
            base = f"http://{shown}:{port}" if port else addresses[0]
            print(instructions(base, sys.executable), file=sys.stdout, flush=True)

        await serve(settings, started=started)
    finally:
        await cloud.close()
