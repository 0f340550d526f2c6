from __future__ import annotations

import logging
from pathlib import Path

import pytest

from core.settings import (
    CT_IMAGE_STORAGE,
    SHIPPED_MODEL,
    Destination,
    SettingsError,
    load_settings,
    variable_names,
)

pytestmark = pytest.mark.unit


def test_defaults(env: dict[str, str], tmp_path: Path) -> None:
    s = load_settings(env)
    assert s.data_dir == (tmp_path / "var").resolve()
    assert s.database_url == f"sqlite:///{s.data_dir / 'covidct.sqlite3'}"
    assert s.broker_url == "filesystem://" and s.broker_is_embedded
    assert (s.ae_title, s.dicom_host, s.dicom_port) == ("COVIDCT", "127.0.0.1", 11112)
    assert s.allowed_aes == ("*",)
    assert s.destinations == ()
    assert s.stable_seconds == 10.0
    assert (s.web_host, s.web_port) == ("127.0.0.1", 8000)
    assert s.model_path == SHIPPED_MODEL
    assert CT_IMAGE_STORAGE in s.sop_classes
    assert len(s.secret_key) >= 32


def test_values_are_parsed(env: dict[str, str]) -> None:
    env |= {
        "COVIDCT_AE_TITLE": "TRIAGE",
        "COVIDCT_DICOM_HOST": "0.0.0.0",
        "COVIDCT_DICOM_PORT": "4242",
        "COVIDCT_ALLOWED_AES": "PACS1, CT_SCANNER",
        "COVIDCT_DESTINATIONS": "PACS@10.0.0.5:104,ARCHIVE@pacs.example.org:11112?objects=ko+sr",
        "COVIDCT_STABLE_SECONDS": "2.5",
        "COVIDCT_BROKER_URL": "redis://127.0.0.1:6379/3",
        "COVIDCT_DATABASE_URL": "postgresql+psycopg://u:pw@db/covidct",
        "COVIDCT_SECRET_KEY": "x" * 40,
        "COVIDCT_LISTENER_ADDRESS": "listener:11112",
        "COVIDCT_ALLOWED_HOSTS": "10.0.0.5,pacs.example.org",
        "COVIDCT_MODEL_RUNTIME": "LiteRT",
        "COVIDCT_SPOOL_DIRECT_IO": "yes",
    }
    s = load_settings(env)
    assert s.listener_address == "listener:11112"
    assert s.allowed_hosts == ("10.0.0.5", "pacs.example.org")
    assert s.model_runtime == "litert" and s.spool_direct_io is True
    assert s.ae_title == "TRIAGE" and s.dicom_port == 4242
    assert s.allowed_aes == ("PACS1", "CT_SCANNER")
    assert s.destinations == (
        Destination("PACS", "10.0.0.5", 104),
        Destination("ARCHIVE", "pacs.example.org", 11112, ("sr", "ko")),
    )
    assert str(s.destinations[0]) == "PACS@10.0.0.5:104"
    assert s.destinations[0].objects == ("sr", "sc", "ko")  # everything unless it says
    assert s.stable_seconds == 2.5
    assert not s.broker_is_embedded
    assert s.secret_key == "x" * 40


def test_a_dicomweb_destination_keeps_its_password_out_of_its_name(env: dict[str, str]) -> None:
    env["COVIDCT_DESTINATIONS"] = (
        "PACS@10.0.0.5:104,https://ai:p%40ss@pacs.example.org:8443/dicom-web/?objects=sr+ko"
    )
    env["COVIDCT_DICOMWEB_TOKEN"] = "tok-123456"
    s = load_settings(env)
    web = s.destinations[1]
    assert web.is_dicomweb and str(web) == "https://pacs.example.org:8443/dicom-web"
    assert (web.username, web.password, web.objects) == ("ai", "p@ss", ("sr", "ko"))
    logged = " ".join(f"{k}={v}" for k, v in s.masked().items())
    assert "p@ss" not in logged and "p%40ss" not in logged and "tok-123456" not in logged


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("COVIDCT_DICOM_PORT", "0"),
        ("COVIDCT_DICOM_PORT", "http"),
        ("COVIDCT_WEB_PORT", "70000"),
        ("COVIDCT_AE_TITLE", "A_TITLE_LONGER_THAN_16"),
        ("COVIDCT_AE_TITLE", "BAD\\AE"),
        ("COVIDCT_AE_TITLE", ""),
        ("COVIDCT_ALLOWED_AES", "*,PACS"),
        ("COVIDCT_ALLOWED_AES", " , "),
        ("COVIDCT_DESTINATIONS", "PACS@host"),
        ("COVIDCT_DESTINATIONS", "PACS@host:99999"),
        ("COVIDCT_DESTINATIONS", "PACS@host:104?objects="),
        ("COVIDCT_DESTINATIONS", "PACS@host:104?objects=sr+pdf"),
        ("COVIDCT_DESTINATIONS", "PACS@host:104?what=sr"),
        ("COVIDCT_DCIODVFY", "/nonexistent/dciodvfy"),
        ("COVIDCT_DCIODVFY", "sometimes"),
        ("COVIDCT_DESTINATIONS", "https://pacs.example.org/dicom-web?what=sr"),
        ("COVIDCT_DESTINATIONS", "http:///dicom-web"),
        ("COVIDCT_DICOMWEB_TOKEN", "two words"),
        ("COVIDCT_STABLE_SECONDS", "-1"),
        ("COVIDCT_STABLE_SECONDS", "soon"),
        ("COVIDCT_BROKER_URL", "amqp://guest@localhost//"),
        ("COVIDCT_DATABASE_URL", "mysql://root@localhost/x"),
        ("COVIDCT_SECRET_KEY", "short"),
        ("COVIDCT_SOP_CLASSES", "1.2.840.abc"),
        ("COVIDCT_MAX_PDU", "10"),
        ("COVIDCT_LOG_LEVEL", "LOUD"),
        ("COVIDCT_TLS_CERT", "/nonexistent/cert.pem"),
        ("COVIDCT_DICOM_HOST", "host name with spaces"),
        ("COVIDCT_LISTENER_ADDRESS", "listener"),
        ("COVIDCT_LISTENER_ADDRESS", "bad host:104"),
        ("COVIDCT_MODEL_RUNTIME", "onnx"),
        ("COVIDCT_SPOOL_DIRECT_IO", "maybe"),
    ],
)
def test_bad_value_names_the_variable(env: dict[str, str], name: str, value: str) -> None:
    env[name] = value
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    assert name in str(err.value)


def test_any_ae_refused_off_loopback(env: dict[str, str]) -> None:
    env["COVIDCT_DICOM_HOST"] = "0.0.0.0"
    with pytest.raises(SettingsError, match="COVIDCT_ALLOWED_AES"):
        load_settings(env)
    env["COVIDCT_ALLOWED_AES"] = "PACS"
    assert load_settings(env).allowed_aes == ("PACS",)


def test_tls_cert_needs_key(env: dict[str, str], tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    env["COVIDCT_TLS_CERT"] = str(cert)
    with pytest.raises(SettingsError, match="COVIDCT_TLS_KEY"):
        load_settings(env)


def test_dimse_timeout_below_network_timeout(env: dict[str, str]) -> None:
    env |= {"COVIDCT_DIMSE_TIMEOUT": "90", "COVIDCT_NETWORK_TIMEOUT": "60"}
    with pytest.raises(SettingsError, match="COVIDCT_DIMSE_TIMEOUT"):
        load_settings(env)


def test_config_file_and_env_priority(env: dict[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "covidct.toml"
    cfg.write_text('ae_title = "FROMFILE"\ndicom_port = 5000\nallowed_aes = ["A", "B"]\n')
    env |= {"COVIDCT_CONFIG": str(cfg), "COVIDCT_DICOM_PORT": "6000"}
    s = load_settings(env)
    assert s.ae_title == "FROMFILE"
    assert s.dicom_port == 6000  # the environment wins
    assert s.allowed_aes == ("A", "B")


def test_config_file_unknown_key(env: dict[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "covidct.toml"
    cfg.write_text('ae_titel = "TYPO"\n')
    env["COVIDCT_CONFIG"] = str(cfg)
    with pytest.raises(SettingsError, match="COVIDCT_CONFIG.*ae_titel"):
        load_settings(env)


def test_secret_key_generated_once_and_kept(env: dict[str, str]) -> None:
    first = load_settings(env)
    second = load_settings(env)
    assert first.secret_key == second.secret_key
    key_file = first.data_dir / "secret_key"
    assert key_file.stat().st_mode & 0o077 == 0


def test_effective_settings_logged_with_secrets_masked(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    env |= {
        "COVIDCT_SECRET_KEY": "s3cr3t-s3cr3t-s3cr3t",
        "COVIDCT_DATABASE_URL": "postgresql+psycopg://covid:hunter2@db:5432/covidct",
    }
    s = load_settings(env)
    with caplog.at_level(logging.INFO):
        s.log_effective()
    text = caplog.text
    assert "s3cr3t" not in text and "hunter2" not in text
    assert "postgresql+psycopg://covid:***@db:5432/covidct" in text
    assert "ae_title=COVIDCT" in text


def test_variable_names_cover_the_interface() -> None:
    names = variable_names()
    for required in (
        "COVIDCT_DATA_DIR",
        "COVIDCT_DATABASE_URL",
        "COVIDCT_BROKER_URL",
        "COVIDCT_AE_TITLE",
        "COVIDCT_DICOM_HOST",
        "COVIDCT_DICOM_PORT",
        "COVIDCT_ALLOWED_AES",
        "COVIDCT_DESTINATIONS",
        "COVIDCT_STABLE_SECONDS",
        "COVIDCT_WEB_HOST",
        "COVIDCT_WEB_PORT",
        "COVIDCT_SECRET_KEY",
        "COVIDCT_MODEL_PATH",
    ):
        assert required in names
