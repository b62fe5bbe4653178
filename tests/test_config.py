"""Config loading (units, ${VAR}, every problem with its dotted key) and the real CLI."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    ROOT,
    free_port,
    run_gateway_cli,
    start_gateway_process,
    stop_process,
    wait_healthy,
)

from gateway.config.load import (
    CREDENTIAL_TYPES,
    ENVIRON_CREDENTIAL_TYPES,
    ConfigError,
    load_config,
    parse_settings,
)
from gateway.config.model import IamPasswordCredential, StaticTokenCredential
from gateway.config.units import parse_duration

EXAMPLE = ROOT / "config.example.yaml"
EXAMPLE_ENV = {"HWC_PASSWORD": "example-password", "MODELARTS_TOKEN": "example-token"}
# Variables the example reads with a default: unset them so the test sees the defaults.
EXAMPLE_OPTIONAL = ("GATEWAY_HOST", "GATEWAY_PORT", "HWC_DOMAIN", "HWC_USER")


def minimal(**route: Any) -> dict[str, Any]:
    """A valid config as parsed YAML, one route on /v1 with a static token."""
    return {
        "credentials": {"tok": {"type": "token", "token": "t"}},
        "routes": [
            {
                "name": "chat",
                "path": "/v1",
                "upstream": "https://example.com/v1/infers/abc",
                "credential": "tok",
                **route,
            }
        ],
    }


def problems_of(raw: object, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, environ or {})
    return info.value.problems


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in EXAMPLE_ENV}
    for name in EXAMPLE_OPTIONAL:
        env.pop(name, None)
    env.update(extra)
    return env


# --- units --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(30, 30.0), (0.5, 0.5), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0)],
)
def test_durations_accept_numbers_and_unit_strings(given: object, seconds: float) -> None:
    assert parse_duration(given) == seconds
    settings = parse_settings(minimal(timeouts={"idle": given}), {})
    assert settings.routes[0].timeouts.idle == seconds


@pytest.mark.parametrize(
    ("given", "size"),
    [(1024, 1024), ("8MiB", 8 * 1024 * 1024), ("512KiB", 512 * 1024), ("1MB", 1_000_000)],
)
def test_sizes_accept_numbers_and_unit_strings(given: object, size: int) -> None:
    assert parse_settings(minimal(max_body=given), {}).routes[0].max_body == size


@pytest.mark.parametrize("bad", ["soon", "5 parsecs", True, -1, [1]])
def test_bad_duration_is_reported_with_its_key(bad: object) -> None:
    problems = problems_of(minimal(timeouts={"idle": bad}))
    assert len(problems) == 1
    assert problems[0].startswith("routes[0].timeouts.idle: ")


@pytest.mark.parametrize("bad", ["8 furlongs", True, -5, 1.5])
def test_bad_size_is_reported_with_its_key(bad: object) -> None:
    problems = problems_of(minimal(max_body=bad))
    assert len(problems) == 1
    assert problems[0].startswith("routes[0].max_body: ")


# --- ${VAR} ---------------------------------------------------------------------------------


def test_variables_are_expanded_from_the_environment() -> None:
    raw = minimal(upstream="${BASE}/v1/infers/${SERVICE}")
    raw["credentials"]["tok"]["token"] = "${TOKEN}"
    raw["listen"] = {"port": "${PORT}"}
    env = {"BASE": "https://apig.example.com", "SERVICE": "s1", "TOKEN": "tk", "PORT": "9000"}
    settings = parse_settings(raw, env)
    assert str(settings.routes[0].upstream) == "https://apig.example.com/v1/infers/s1"
    assert settings.listen.port == 9000
    token = settings.credentials["tok"]
    assert isinstance(token, StaticTokenCredential)
    assert token.token.reveal() == "tk"


def test_variable_default_is_used_only_when_unset() -> None:
    raw = minimal(name="${NAME:-fallback}")
    assert parse_settings(raw, {}).routes[0].name == "fallback"
    assert parse_settings(raw, {"NAME": "given"}).routes[0].name == "given"
    assert parse_settings(minimal(name="a${EMPTY:-}b"), {}).routes[0].name == "ab"


def test_double_dollar_is_a_literal_dollar() -> None:
    raw = minimal()
    raw["credentials"]["tok"]["token"] = "pa$$word-$${NOT_A_VAR}"
    token = parse_settings(raw, {}).credentials["tok"]
    assert isinstance(token, StaticTokenCredential)
    assert token.token.reveal() == "pa$word-${NOT_A_VAR}"


def test_missing_variable_is_named_with_its_key() -> None:
    raw = minimal()
    raw["credentials"]["tok"]["token"] = "${MY_SECRET_TOKEN}"
    problems = problems_of(raw)
    assert "credentials.tok.token: environment variable MY_SECRET_TOKEN is not set" in problems


# --- shape and types ----------------------------------------------------------------------------


def test_unknown_keys_are_reported_at_every_level() -> None:
    raw = minimal(timeouts={"idel": 5}, retries=3)
    raw["listn"] = {}
    raw["credentials"]["tok"]["extra"] = 1
    problems = problems_of(raw)
    assert "listn: unknown key" in problems
    assert "routes[0].retries: unknown key" in problems
    assert "routes[0].timeouts.idel: unknown key" in problems
    assert "credentials.tok.extra: unknown key" in problems


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda c: c.update(listen={"port": "eighty"}), "listen.port: "),
        (lambda c: c.update(listen={"port": 70000}), "listen.port: "),
        (lambda c: c.update(listen=["127.0.0.1"]), "listen: "),
        (lambda c: c["routes"][0].update(max_concurrency=0), "routes[0].max_concurrency: "),
        (lambda c: c["routes"][0].update(max_concurrency="many"), "routes[0].max_concurrency: "),
        (lambda c: c["routes"][0].update(models="qwen2-7b"), "routes[0].models: "),
        (lambda c: c["routes"][0].update(upstream="ftp://example.com"), "routes[0].upstream: "),
        (lambda c: c["routes"][0].update(upstream="https://x/?a=1"), "routes[0].upstream: "),
        (lambda c: c["routes"][0].update(path="v1"), "routes[0].path: "),
        (lambda c: c["routes"][0].update(timeouts={"connect": 0}), "routes[0].timeouts.connect: "),
        (lambda c: c["credentials"]["tok"].update(type="magic"), "credentials.tok.type: "),
        (lambda c: c.update(routes={"name": "x"}), "routes: "),
        (lambda c: c.update(routes=[]), "routes: "),
    ],
)
def test_wrong_types_and_values_name_their_key(edit: Any, key: str) -> None:
    raw = minimal()
    edit(raw)
    problems = problems_of(raw)
    assert any(p.startswith(key) for p in problems), problems


def test_every_problem_is_reported_at_once_with_dotted_keys() -> None:
    raw = {
        "listen": {"port": -1},
        "credentials": {
            "main": {"type": "iam_password", "iam_url": "not a url", "password": "${NOPE}"}
        },
        "routes": [
            {"name": "a", "path": "/v1", "upstream": "", "credential": "main"},
            {
                "name": "b",
                "path": "/v2",
                "upstream": "https://example.com",
                "credential": "ghost",
                "timeouts": {"idle": "forever"},
            },
        ],
    }
    problems = problems_of(raw)
    for key in (
        "listen.port: ",
        "credentials.main.iam_url: ",
        "credentials.main.domain: ",
        "credentials.main.user: ",
        "credentials.main.project: ",
        "credentials.main.password: environment variable NOPE is not set",
        "routes[0].upstream: ",
        "routes[1].credential: ",
        "routes[1].timeouts.idle: ",
    ):
        assert any(p.startswith(key) for p in problems), (key, problems)
    assert str(ConfigError(problems)).count("\n") == len(problems) - 1


def test_route_must_name_a_defined_credential() -> None:
    problems = problems_of(minimal(credential="missing"))
    assert problems == ["routes[0].credential: no credential named 'missing' (known: tok)"]


def test_project_and_project_id_are_exclusive_and_one_is_required() -> None:
    raw = minimal(credential="main")
    iam = {"type": "iam_password", "iam_url": "https://iam.example.com", "domain": "d"}
    raw["credentials"]["main"] = {**iam, "user": "u", "password": "p"}
    assert any(p.startswith("credentials.main.project: ") for p in problems_of(raw))
    raw["credentials"]["main"].update(project="cn-southwest-2", project_id="abc")
    assert any(p.startswith("credentials.main.project: ") for p in problems_of(raw))
    del raw["credentials"]["main"]["project"]
    cred = parse_settings(raw, {}).credentials["main"]
    assert isinstance(cred, IamPasswordCredential)
    assert (cred.project, cred.project_id) == (None, "abc")


def test_duplicate_model_on_one_path_is_an_error() -> None:
    raw = minimal(models=["qwen2-7b", "glm-4"])
    raw["routes"].append(
        {
            "name": "other",
            "path": "/v1",
            "upstream": "https://example.com/v1/infers/def",
            "credential": "tok",
            "models": ["glm-4"],
        }
    )
    problems = problems_of(raw)
    assert any(p.startswith("routes[1].models: ") and "'glm-4'" in p for p in problems), problems
    raw["routes"][1]["path"] = "/v2"  # the same model on another path is fine
    assert len(parse_settings(raw, {}).routes) == 2


def test_two_routes_without_models_on_one_path_is_an_error() -> None:
    raw = minimal()
    raw["routes"].append({**raw["routes"][0], "name": "twin"})
    problems = problems_of(raw)
    assert any(p.startswith("routes[1].models: ") for p in problems), problems


def test_duplicate_route_names_are_an_error() -> None:
    raw = minimal(models=["a"])
    raw["routes"].append({**raw["routes"][0], "models": ["b"]})
    assert any(p.startswith("routes[1].name: ") for p in problems_of(raw))


def test_load_config_reports_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml", {})
    assert "cannot read" in info.value.problems[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [\n  - name: a\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(bad, {})
    assert "not valid YAML" in info.value.problems[0]


# --- the example file and the CLI ---------------------------------------------------------------


def test_example_config_loads_with_its_variables_set() -> None:
    settings = load_config(EXAMPLE, EXAMPLE_ENV)
    assert [r.name for r in settings.routes] == ["qwen", "deepseek", "local"]
    assert set(settings.credentials) == {"main", "fixed", "open"}
    assert "example-password" not in repr(settings)


def test_example_config_mentions_every_documented_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for key in (
        "host:",
        "port:",
        "type: iam_password",
        "iam_url:",
        "domain:",
        "user:",
        "password: ${HWC_PASSWORD}",
        "project:",
        "project_id:",
        "refresh_margin:",
        "type: token",
        "type: none",
        "name:",
        "path:",
        "upstream:",
        "credential:",
        "models:",
        "max_body:",
        "max_concurrency:",
        "heartbeat:",
        "connect:",
        "first_byte:",
        "idle:",
        "total:",
        "${VAR:-default}",
        '"500ms"',
        '"8MiB"',
    ):
        assert key in text, key
    for kind in [*CREDENTIAL_TYPES, *ENVIRON_CREDENTIAL_TYPES]:  # every type, with an example
        assert f"type: {kind}" in text, kind
    assert isinstance(yaml.safe_load(text), dict)


def test_check_passes_on_the_example_config_with_its_variables_set() -> None:
    result = run_gateway_cli("check", "--config", str(EXAMPLE), env=cli_env(**EXAMPLE_ENV))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_fails_with_exit_2_naming_a_missing_variable() -> None:
    env = cli_env(MODELARTS_TOKEN="example-token")  # HWC_PASSWORD left unset
    result = run_gateway_cli("check", "--config", str(EXAMPLE), env=env)
    assert result.returncode == 2
    assert "HWC_PASSWORD" in result.stderr
    assert "credentials.main.password" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    raw = minimal(upstream="not-a-url")
    raw["routes"].append({**raw["routes"][0], "name": "b", "path": "/v2", "timeouts": {"idle": -1}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    for args in (("--config", str(path)), ("serve", "--config", str(path))):
        result = run_gateway_cli(*args, env=cli_env())
        assert result.returncode == 2, result.stderr
        assert "routes[0].upstream:" in result.stderr
        assert "routes[1].timeouts.idle:" in result.stderr
        assert "Traceback" not in result.stderr


def test_console_script_entry_point_is_declared() -> None:
    scripts = importlib.metadata.entry_points(group="console_scripts", name="modelarts-gateway")
    assert [ep.value for ep in scripts] == ["gateway.cli:main"]
    assert callable(next(iter(scripts)).load())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_python_m_gateway_serves_and_exits_0_on_signal(
    tmp_path: Path, sig: signal.Signals
) -> None:
    raw = minimal()
    raw["listen"] = {"host": "127.0.0.1", "port": 1}  # overridden by --port
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    port = free_port()
    proc = await start_gateway_process(
        "--config",
        str(path),
        "--port",
        str(port),
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", proc)
        proc.send_signal(sig)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        await stop_process(proc)
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
