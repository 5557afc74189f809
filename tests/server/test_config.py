from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from backchannel import Settings
from backchannel.cli import build_parser

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_environment_variables_are_read() -> None:
    settings = Settings.from_env(
        {
            "BACKCHANNEL_PORT": "9001",
            "BACKCHANNEL_MAX_WAIT": "2.5",
            "BACKCHANNEL_ACCESS_LOG": "yes",
            "BACKCHANNEL_STORE": "memory://",
            "UNRELATED": "x",
        }
    )
    assert (settings.port, settings.max_wait, settings.access_log) == (9001, 2.5, True)
    assert settings.store_url == "memory://"


def test_overrides_win_over_environment() -> None:
    assert Settings.from_env({"BACKCHANNEL_PORT": "9001"}, port=9002).port == 9002


def test_default_store_is_sqlite_in_the_data_dir() -> None:
    assert Settings(data_dir="/var/x").store_url == "sqlite:////var/x/backchannel.db"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BACKCHANNEL_PORT": "eighty"}, "BACKCHANNEL_PORT"),
        ({"BACKCHANNEL_ACCESS_LOG": "maybe"}, "BACKCHANNEL_ACCESS_LOG"),
        ({"BACKCHANNEL_LOG_LEVEL": "loud"}, "log_level"),
        ({"BACKCHANNEL_MAX_LIMIT": "0"}, "max_limit"),
        ({"BACKCHANNEL_RETENTION_AGE": "nan"}, "retention_age"),
        ({"BACKCHANNEL_PORT": "70000"}, "port"),
        ({"BACKCHANNEL_SLOW_CONSUMER_GRACE": "-1"}, "slow_consumer_grace"),
        ({"BACKCHANNEL_SLOW_CONSUMER_GRACE": "86400"}, "slow_consumer_grace"),
        ({"BACKCHANNEL_LISTEN_BACKLOG": "0"}, "listen_backlog"),
        ({"BACKCHANNEL_LISTEN_BACKLOG": "65536"}, "listen_backlog"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_every_setting_is_a_flag_with_its_variable_in_the_help() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help()
    for f in fields(Settings):
        assert "--" + f.name.replace("_", "-") in text
        assert Settings.env_name(f.name) in text


def test_every_setting_is_documented() -> None:
    text = DOCS.read_text()
    missing = [
        Settings.env_name(f.name)
        for f in fields(Settings)
        if Settings.env_name(f.name) not in text or "--" + f.name.replace("_", "-") not in text
    ]
    assert not missing, f"docs/configuration.md does not mention {missing}"


@pytest.mark.parametrize(
    "env", [{"BACKCHANNEL_RETENTION_COUNT": "2000000000"}, {"BACKCHANNEL_RETENTION_AGE": "4e8"}]
)
def test_retention_settings_beyond_their_bounds_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="retention"):
        Settings.from_env(env)
