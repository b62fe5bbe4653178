"""listen.backlog: the listen queue, 1024 by default (issue 9, item 5)."""

from __future__ import annotations

import copy

import pytest
from conftest import base_config

from gateway.config.load import ConfigError, parse_settings
from gateway.testing import FakeCloud


def test_backlog_defaults_to_1024_and_is_configurable(cloud: FakeCloud) -> None:
    config = copy.deepcopy(base_config(cloud))
    assert parse_settings(config, {}).listen.backlog == 1024
    config["listen"]["backlog"] = 4096
    assert parse_settings(config, {}).listen.backlog == 4096


@pytest.mark.parametrize("value", [0, -1, "many", True])
def test_a_bad_backlog_names_its_key(cloud: FakeCloud, value: object) -> None:
    config = copy.deepcopy(base_config(cloud))
    config["listen"]["backlog"] = value
    with pytest.raises(ConfigError, match=r"listen\.backlog"):
        parse_settings(config, {})
