"""Settings from the environment: the defaults API.md promises, overrides, and one clear line for a bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, Settings, load_settings
from tests.unit.fakes import clear_settings_environment

SECRET_KEY = "sk-test-0123456789abcdef-secret"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings_environment(monkeypatch)


def test_defaults_without_a_key() -> None:
    settings = load_settings()

    assert settings.provider == "mock"
    assert settings.openai_api_key is None
    assert settings.llm_model == "gpt-4o"
    assert settings.base_url is None
    assert settings.max_iterations == 20
    assert settings.port == 8080
    assert settings.host == "127.0.0.1"
    assert settings.data_dir == Path(".alex")
    assert settings.redis_url is None
    assert settings.sse_heartbeat_seconds == 15
    assert settings.sse_buffer_size == 100
    assert settings.rate_limit_tasks == "10/minute"
    assert settings.rate_limit_default == "120/minute"
    assert settings.max_streams_per_client == 20
    assert settings.max_tasks_per_client == 4
    assert settings.cors_origins == ["http://localhost:3000", "http://localhost:3001"]
    assert settings.log_level == "info"
    assert settings.auth_enabled


def test_a_key_makes_openai_the_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_KEY)
    settings = load_settings()
    assert settings.provider == "openai"
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == SECRET_KEY
    assert SECRET_KEY not in repr(settings)
    assert SECRET_KEY not in str(settings.model_dump())


def test_the_provider_can_be_forced_to_mock_with_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_KEY)
    monkeypatch.setenv("ALEX_LLM_PROVIDER", "MOCK")
    assert load_settings().provider == "mock"


def test_openai_without_a_key_needs_a_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALEX_LLM_PROVIDER", "openai")
    with pytest.raises(ConfigError, match=r"^ALEX_LLM_PROVIDER: .*OPENAI_API_KEY"):
        load_settings()
    monkeypatch.setenv("ALEX_BASE_URL", "http://127.0.0.1:11434/v1")
    settings = load_settings()
    assert settings.provider == "openai"
    assert settings.base_url == "http://127.0.0.1:11434/v1"


def test_values_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {
        "PORT": "9000",
        "ALEX_HOST": "192.0.2.10",
        "ALEX_LLM_MODEL": "llama3",
        "ALEX_MAX_ITERATIONS": "5",
        "ALEX_DATA_DIR": str(tmp_path),
        "ALEX_SSE_HEARTBEAT_SECONDS": "2.5",
        "ALEX_SSE_BUFFER_SIZE": "7",
        "ALEX_RATE_LIMIT_TASKS": "100 per hour",
        "ALEX_MAX_TASKS_PER_CLIENT": "1",
        "ALEX_LOG_LEVEL": "DEBUG",
    }.items():
        monkeypatch.setenv(name, value)

    settings = load_settings()

    assert (settings.port, settings.host, settings.llm_model) == (9000, "192.0.2.10", "llama3")
    assert settings.max_iterations == 5
    assert settings.data_dir == tmp_path
    assert settings.database_path == tmp_path / "alex.db"
    assert settings.sse_heartbeat_seconds == 2.5
    assert settings.sse_buffer_size == 7
    assert settings.rate_limit_tasks == "100 per hour"
    assert settings.max_tasks_per_client == 1
    assert settings.log_level == "debug"


def test_cors_origins_are_split_on_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALEX_CORS_ORIGINS", " https://a.example ,https://b.example,, ")
    assert load_settings().cors_origins == ["https://a.example", "https://b.example"]


def test_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALEX_SSE_BUFFER_SIZE", "7")
    assert load_settings(sse_buffer_size=3).sse_buffer_size == 3


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ALEX_SSE_BUFFER_SIZE", "abc"),
        ("ALEX_SSE_BUFFER_SIZE", "0"),
        ("PORT", "70000"),
        ("PORT", "http"),
        ("ALEX_RATE_LIMIT_TASKS", "lots"),
        ("ALEX_RATE_LIMIT_DEFAULT", "10/fortnight"),
        ("ALEX_LLM_PROVIDER", "banana"),
        ("ALEX_SSE_HEARTBEAT_SECONDS", "0"),
        ("ALEX_MAX_ITERATIONS", "0"),
        ("ALEX_MAX_TASKS_PER_CLIENT", "-1"),
        ("ALEX_LOG_LEVEL", "loud"),
        ("ALEX_AUTH", "maybe"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ConfigError) as caught:
        load_settings()

    message = str(caught.value)
    assert message.startswith(f"{name}: ")
    assert "\n" not in message
    assert value in message
    assert "pydantic" not in message
    assert "validation error" not in message.lower()
    assert caught.value.__suppress_context__


def test_the_first_of_several_bad_values_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "70000")
    monkeypatch.setenv("ALEX_SSE_BUFFER_SIZE", "abc")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).split(":")[0] in {"PORT", "ALEX_SSE_BUFFER_SIZE"}
    assert "\n" not in str(caught.value)


def test_a_bad_value_does_not_echo_the_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_KEY)
    monkeypatch.setenv("ALEX_JWT_SECRET", "jwt-" + SECRET_KEY)
    monkeypatch.setenv("ALEX_SSE_BUFFER_SIZE", "abc")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert SECRET_KEY not in str(caught.value)


@pytest.mark.parametrize("field", ["openai_api_key", "jwt_secret"])
def test_a_bad_secret_is_named_but_not_shown(field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(**{field: 987654321})
    assert "987654321" not in str(caught.value)
    assert str(caught.value).startswith(("OPENAI_API_KEY: ", "ALEX_JWT_SECRET: "))


def test_a_bad_secret_given_by_its_variable_name_is_not_shown() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(OPENAI_API_KEY=987654321)
    assert str(caught.value).startswith("OPENAI_API_KEY: ")
    assert "987654321" not in str(caught.value)


def test_settings_itself_raises_the_full_error_for_code_that_wants_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "70000")
    with pytest.raises(ValueError, match=r"(?i)port"):
        Settings()
