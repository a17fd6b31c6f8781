"""Tests for configuration parsing (``auxot_common.settings``), ``RouterConfig.from_env`` and the
JSON log format (``auxot_common.logs``)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import orjson
import pytest

from auxot_common.auth import NamedHash
from auxot_common.logs import JsonFormatter, redact_url
from auxot_common.settings import ConfigError, EnvReader, load_environment, parse_duration, read_dotenv
from auxot_router import DEFAULT_MODEL, RouterConfig, policy_from

# Syntactically valid Argon2id PHC strings: RouterConfig only parses them (verifying is auth's job).
API_HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"
ADMIN_HASH = "$argon2id$v=19$m=65536,t=3,p=4$YWRtaW5zYWx0YWRtaW5zYQ$YWRtaW5oYXNoYWRtaW5oYXNoYWRtaW5oYXNoYWRtaW4"
HASHES = {"AUXOT_API_KEY_HASH": API_HASH, "AUXOT_ADMIN_KEY_HASH": ADMIN_HASH}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".env"
    path.write_text(text, encoding="utf-8")
    return path


# --- read_dotenv --------------------------------------------------------------------------------------------


def test_read_dotenv(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# Auxot settings\n"
        "\n"
        "AUXOT_MODEL=Qwen3-Coder-30B-A3B\n"
        "export AUXOT_PORT=9090\n"
        "  AUXOT_HOST = 127.0.0.1  \n"
        'AUXOT_REDIS_URL="redis://:secret@redis:6379/0"\n'
        "AUXOT_LOG_LEVEL='debug'\n"
        "AUXOT_JOB_TIMEOUT=10m # ten minutes\n"
        "    # an indented comment\n"
        "EMPTY=\n"
        'QUOTED_HASH="a # b"\n'
        "NO_SPACE_HASH=a#b\n"
        "EQUALS=a=b=c\n",
    )
    assert read_dotenv(path) == {
        "AUXOT_MODEL": "Qwen3-Coder-30B-A3B",
        "AUXOT_PORT": "9090",
        "AUXOT_HOST": "127.0.0.1",
        "AUXOT_REDIS_URL": "redis://:secret@redis:6379/0",
        "AUXOT_LOG_LEVEL": "debug",
        "AUXOT_JOB_TIMEOUT": "10m",
        "EMPTY": "",
        "QUOTED_HASH": "a # b",
        "NO_SPACE_HASH": "a#b",
        "EQUALS": "a=b=c",
    }


def test_read_dotenv_keeps_argon2_hashes_intact(tmp_path: Path) -> None:
    """Hashes are full of ``$`` and ``=``; nothing may be expanded or cut."""
    path = write(tmp_path, f"AUXOT_API_KEY_HASH={API_HASH}\nAUXOT_ADMIN_KEY_HASH='main:{ADMIN_HASH}'\n")
    assert read_dotenv(path) == {"AUXOT_API_KEY_HASH": API_HASH, "AUXOT_ADMIN_KEY_HASH": f"main:{ADMIN_HASH}"}


def test_read_dotenv_quoted_value_with_an_inline_comment(tmp_path: Path) -> None:
    """``KEY="value" # comment`` is the value without quotes, as for every other .env reader."""
    path = write(
        tmp_path, "AUXOT_MODEL=\"Qwen3-Coder-30B-A3B\" # the default\nAUXOT_HOST='0.0.0.0'  # all interfaces\n"
    )
    assert read_dotenv(path) == {"AUXOT_MODEL": "Qwen3-Coder-30B-A3B", "AUXOT_HOST": "0.0.0.0"}


def test_read_dotenv_later_lines_win(tmp_path: Path) -> None:
    assert read_dotenv(write(tmp_path, "A=1\nA=2\n")) == {"A": "2"}


def test_read_dotenv_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_dotenv(tmp_path / "absent.env") == {}
    assert read_dotenv(tmp_path) == {}  # a directory is not a file


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("A=1\nthis is not a setting\n", 2),
        ("A=1\n\n# c\n=value\n", 4),
        ("1ABC=x\n", 1),
        ("MY-VAR=x\n", 1),
        ("export\n", 1),
        ("A=1\nB\n", 2),
    ],
)
def test_read_dotenv_bad_line_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_dotenv(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:")
    assert "KEY=value" in message
    assert "\n" not in message


# --- load_environment -----------------------------------------------------------------------------------------


def test_load_environment_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "AUXOT_TEST_PORT=1111\nAUXOT_TEST_ONLY_FILE=from-file\n")
    monkeypatch.setenv("AUXOT_TEST_PORT", "2222")
    monkeypatch.setenv("AUXOT_TEST_ONLY_ENV", "from-env")
    merged = load_environment(path)
    assert merged["AUXOT_TEST_PORT"] == "2222"
    assert merged["AUXOT_TEST_ONLY_FILE"] == "from-file"
    assert merged["AUXOT_TEST_ONLY_ENV"] == "from-env"


def test_load_environment_reads_dotenv_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "AUXOT_TEST_CWD=yes\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUXOT_TEST_CWD", raising=False)
    assert load_environment()["AUXOT_TEST_CWD"] == "yes"


def test_load_environment_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUXOT_TEST_X", "1")
    merged = load_environment(tmp_path / "none.env")
    assert merged["AUXOT_TEST_X"] == "1"


# --- parse_duration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15s", 15.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("2m30s", 150.0),
        ("1h1m1s", 3661.0),
        ("250ms", 0.25),
        ("1s500ms", 1.5),
        ("1.5s", 1.5),
        ("0.5h", 1800.0),
        ("30", 30.0),
        ("0.1", 0.1),
        (" 45s ", 45.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "   ", "abc", "5x", "m5", "5 m", "1h 30m", "s", "5mm", "1.2.3s", "ten seconds", "5m!", "-5s"]
)
def test_parse_duration_errors(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


# --- EnvReader -------------------------------------------------------------------------------------------


def test_env_reader_defaults_for_missing_or_empty() -> None:
    read = EnvReader({"EMPTY": ""})
    assert read.raw("EMPTY") is None
    assert read.raw("MISSING") is None
    assert read.text("EMPTY", "dflt") == "dflt"
    assert read.integer("EMPTY", 7) == 7
    assert read.duration("MISSING", 2.5) == 2.5
    assert read.choice("MISSING", "info", ("info", "debug")) == "info"


def test_env_reader_values() -> None:
    read = EnvReader({"S": "text", "I": "42", "D": "1m", "C": "DEBUG"})
    assert read.text("S", "x") == "text"
    assert read.integer("I", 0, minimum=1, maximum=100) == 42
    assert read.duration("D", 0) == 60.0
    assert read.choice("C", "info", ("debug", "info")) == "debug"  # case-insensitive


@pytest.mark.parametrize(
    ("env", "call", "fragments"),
    [
        ({"AUXOT_X": "abc"}, lambda r: r.integer("AUXOT_X", 1), ["AUXOT_X", "'abc'", "integer"]),
        ({"AUXOT_X": "1.5"}, lambda r: r.integer("AUXOT_X", 1), ["AUXOT_X", "integer"]),
        ({"AUXOT_X": "0"}, lambda r: r.integer("AUXOT_X", 1, minimum=1), ["AUXOT_X", "at least 1"]),
        ({"AUXOT_X": "99"}, lambda r: r.integer("AUXOT_X", 1, maximum=10), ["AUXOT_X", "at most 10"]),
        ({"AUXOT_X": "soon"}, lambda r: r.duration("AUXOT_X", 1), ["AUXOT_X", "'soon'", "duration", "30s"]),
        ({"AUXOT_X": "10ms"}, lambda r: r.duration("AUXOT_X", 1, minimum=1), ["AUXOT_X", "at least 1s"]),
        ({"AUXOT_X": "-3"}, lambda r: r.duration("AUXOT_X", 1), ["AUXOT_X", "at least"]),
        ({"AUXOT_X": "loud"}, lambda r: r.choice("AUXOT_X", "a", ("a", "b")), ["AUXOT_X", "loud", "a, b"]),
    ],
)
def test_env_reader_errors_name_the_variable(env: dict[str, str], call, fragments: list[str]) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        call(EnvReader(env))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# --- RouterConfig.from_env -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [{}, {"AUXOT_API_KEY_HASH": API_HASH}, {"AUXOT_ADMIN_KEY_HASH": ADMIN_HASH}, {**HASHES, "AUXOT_API_KEY_HASH": ""}],
)
def test_missing_hashes_tell_the_operator_to_run_setup(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        RouterConfig.from_env(env)
    message = str(info.value)
    assert "python auxot_router.py setup" in message
    assert "AUXOT_API_KEY_HASH" in message
    assert "AUXOT_ADMIN_KEY_HASH" in message
    assert "\n" not in message


def test_a_malformed_hash_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        RouterConfig.from_env({**HASHES, "AUXOT_ADMIN_KEY_HASH": "rtr_plaintextkeyinsteadofahash"})
    assert "AUXOT_ADMIN_KEY_HASH" in str(info.value)
    assert "Argon2id" in str(info.value)
    assert "\n" not in str(info.value)


def test_defaults() -> None:
    config = RouterConfig.from_env(dict(HASHES))
    assert config.api_key_hashes == [NamedHash("key1", API_HASH)]
    assert config.admin_key_hashes == [NamedHash("key1", ADMIN_HASH)]
    assert config.model == DEFAULT_MODEL == "Qwen3-Coder-30B-A3B"
    assert config.host == "0.0.0.0"
    assert config.port == 8080
    assert config.log_level == "info"
    assert config.job_timeout == 300.0
    assert config.heartbeat_interval == 10.0
    assert config.dead_worker_timeout == 45.0
    assert config.auth_cache_ttl == 300.0
    assert config.redis_url == ""  # embedded
    assert config.redis_prefix == "auxot:"
    assert config.ctx_size == 131072
    assert config.max_parallel == 2
    assert config.max_queue >= 1
    policy = policy_from(config.resolve())
    assert policy.model_name == DEFAULT_MODEL
    assert policy.context_size == 131072
    assert policy.max_parallelism == 2
    # The policy carries the full resolution, so a worker needs no registry of its own.
    assert policy.huggingface_id.startswith("unsloth/") and policy.files and policy.quantization


def test_values_from_the_environment() -> None:
    config = RouterConfig.from_env(
        {
            **HASHES,
            "AUXOT_API_KEY_HASH": f"alice:{API_HASH};bob:{API_HASH}",
            "AUXOT_PORT": "9000",
            "AUXOT_HOST": "127.0.0.1",
            "AUXOT_JOB_TIMEOUT": "1h30m",
            "AUXOT_LOG_LEVEL": "WARN",
            "AUXOT_MAX_PARALLEL": "8",
            "AUXOT_CTX_SIZE": "32768",
            "AUXOT_REDIS_URL": "redis://redis:6379/0",
            "AUXOT_AUTH_CACHE_TTL": "30s",
        }
    )
    assert [h.name for h in config.api_key_hashes] == ["alice", "bob"]
    assert config.port == 9000
    assert config.host == "127.0.0.1"
    assert config.job_timeout == 5400.0
    assert config.log_level == "warn"
    assert config.max_parallel == 8
    assert config.ctx_size == 32768
    assert config.redis_url == "redis://redis:6379/0"
    assert config.auth_cache_ttl == 30.0


def test_dead_worker_timeout_follows_a_slow_heartbeat() -> None:
    config = RouterConfig.from_env({**HASHES, "AUXOT_HEARTBEAT_INTERVAL": "20s"})
    assert config.heartbeat_interval == 20.0
    assert config.dead_worker_timeout == 60.0  # never shorter than three heartbeats
    explicit = RouterConfig.from_env({**HASHES, "AUXOT_HEARTBEAT_INTERVAL": "20s", "AUXOT_DEAD_WORKER_TIMEOUT": "90s"})
    assert explicit.dead_worker_timeout == 90.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AUXOT_PORT", "http"),
        ("AUXOT_PORT", "80.5"),
        ("AUXOT_PORT", "70000"),
        ("AUXOT_PORT", "-1"),
        ("AUXOT_JOB_TIMEOUT", "5 minutes"),
        ("AUXOT_JOB_TIMEOUT", "0.5s"),
        ("AUXOT_JOB_TIMEOUT", "5y"),
        ("AUXOT_MAX_PARALLEL", "0"),
        ("AUXOT_CTX_SIZE", "lots"),
        ("AUXOT_HEARTBEAT_INTERVAL", "often"),
        ("AUXOT_LOG_LEVEL", "verbose"),
    ],
)
def test_invalid_values_give_a_one_line_error_naming_the_variable(name: str, value: str) -> None:
    """The Go router silently fell back to the default; a typo must stop the router instead."""
    with pytest.raises(ConfigError) as info:
        RouterConfig.from_env({**HASHES, name: value})
    message = str(info.value)
    assert message.startswith(f"{name}=")
    assert "\n" not in message


# --- logs ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def log_capture() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("auxot.test.settings")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream


def test_json_formatter_one_object_per_line(log_capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = log_capture
    logger.info("job accepted", extra={"job_id": "chatcmpl-1", "stream": True, "tokens": 12})
    logger.warning("worker rejected: %s", "invalid GPU key", extra={"remote": "10.0.0.1"})
    logger.debug("multi\nline message")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    entries = [orjson.loads(line) for line in lines]
    first, second, third = entries
    assert first["msg"] == "job accepted"
    assert first["level"] == "INFO"
    assert first["job_id"] == "chatcmpl-1"
    assert first["stream"] is True
    assert first["tokens"] == 12
    assert first["logger"] == "auxot.test.settings"
    assert list(first)[:3] == ["time", "level", "msg"]
    assert first["time"].endswith("+00:00")  # ISO 8601 in UTC
    assert second["level"] == "WARNING"
    assert second["msg"] == "worker rejected: invalid GPU key"
    assert second["remote"] == "10.0.0.1"
    assert third["msg"] == "multi\nline message"
    for entry in entries:  # no LogRecord internals leak into the line
        for internal in ("args", "levelno", "pathname", "lineno", "exc_info", "taskName", "msecs", "process"):
            assert internal not in entry


def test_json_formatter_handles_exceptions_and_unserialisable_values(
    log_capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = log_capture
    try:
        raise RuntimeError("kaboom")
    except RuntimeError:
        logger.exception("it failed", extra={"path": Path("/tmp/x"), "error": ValueError("bad")})
    [line] = stream.getvalue().splitlines()
    entry = orjson.loads(line)
    assert entry["level"] == "ERROR"
    assert entry["msg"] == "it failed"
    assert "RuntimeError: kaboom" in entry["exception"]
    assert entry["path"] == "/tmp/x"
    assert entry["error"] == "bad"


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://:s3cret@redis.internal:6379/0", "redis://:***@redis.internal:6379/0"),
        ("redis://default:s3cret@redis.internal:6379", "redis://default:***@redis.internal:6379"),
        (
            "rediss://user:p%40ss@cache.example.com/2?ssl_cert_reqs=none",
            "rediss://user:***@cache.example.com/2?ssl_cert_reqs=none",
        ),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://user@redis:6379", "redis://user@redis:6379"),
        ("", ""),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_redact_url_never_leaks_the_password() -> None:
    for url in ("redis://:hunter2@h", "redis://u:hunter2@h:1/0", "redis://:hunter2@[::1]:6379/0"):
        assert "hunter2" not in redact_url(url)


def test_redact_url_keeps_an_ipv6_host_readable() -> None:
    """The redacted URL is what the operator reads to see where the router connects."""
    assert redact_url("redis://:s3cret@[::1]:6379/0") == "redis://:***@[::1]:6379/0"


@pytest.mark.parametrize("value", ["inf", "nan", "infinity", "1e999"])
def test_non_finite_job_timeout_is_a_config_error(value: str) -> None:
    """``AUXOT_JOB_TIMEOUT=inf`` (someone wanting "no timeout") must be refused at startup.

    Accepted, it makes every job's ``deadline`` infinite; orjson writes that as ``null``, the
    dispatcher cannot decode the job back, drops it as unreadable, and the caller waits forever.
    """
    with pytest.raises(ConfigError) as info:
        RouterConfig.from_env({**HASHES, "AUXOT_JOB_TIMEOUT": value})
    assert str(info.value).startswith("AUXOT_JOB_TIMEOUT=")
