"""The tests run on the event loop GATEWAY_TEST_LOOP names (conftest.py): asyncio by default."""

from __future__ import annotations

import asyncio

from conftest import TEST_LOOP


async def test_the_tests_run_on_the_loop_asked_for() -> None:
    module = type(asyncio.get_running_loop()).__module__
    assert module.split(".")[0] == TEST_LOOP, module
