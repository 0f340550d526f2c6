"""docker-compose.yml and the settings agree: commands, environment, volumes, health checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from core.settings import load_settings, variable_names
from covidct.cli import build_parser

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = {"migrate", "listener", "sweeper", "worker", "web"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def substitute(value: str) -> str:
    """Fill ${VAR:?msg} and ${VAR:-default} the way compose would, with sample values."""
    samples = {
        "POSTGRES_PASSWORD": "pw",
        "COVIDCT_SECRET_KEY": "k" * 32,
        "COVIDCT_ALLOWED_AES": "PACS1,CT1",
    }

    def fill(m: re.Match) -> str:
        name, op, rest = m.group(1), m.group(2), m.group(3) or ""
        if name in samples:
            return samples[name]
        return rest if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", fill, str(value))


def test_services_exist(compose: dict) -> None:
    assert {"redis", "postgres", "listener", "sweeper", "worker", "web", "migrate"} <= set(
        compose["services"]
    )


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_command_parses_with_the_cli(compose: dict, name: str) -> None:
    svc = compose["services"][name]
    args = build_parser().parse_args(svc["command"])
    assert callable(args.func)


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_environment_is_known_and_valid(compose: dict, name: str, tmp_path: Path) -> None:
    env = {k: substitute(v) for k, v in compose["services"][name]["environment"].items()}
    unknown = {k for k in env if k.startswith("COVIDCT_")} - set(variable_names())
    assert not unknown, f"{name} sets unknown variables {unknown}"
    env["COVIDCT_DATA_DIR"] = str(tmp_path)  # /data does not exist here
    settings = load_settings({k: v for k, v in env.items() if v != ""})
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.database_url.startswith("postgresql+psycopg://covidct:pw@postgres")


def test_spool_volume_shared_and_health_checked(compose: dict) -> None:
    svcs = compose["services"]
    for name in ("listener", "worker", "web"):
        assert "data:/data" in svcs[name]["volumes"], f"{name} needs the shared data volume"
        assert svcs[name]["restart"] == "unless-stopped"
        assert "healthcheck" in svcs[name]
    for name in ("redis", "postgres"):
        assert "healthcheck" in svcs[name]
    assert svcs["listener"]["environment"]["COVIDCT_DICOM_HOST"] == "0.0.0.0"
    # the sweep is its own service: the listener leaves it to it (one sweeper, by lease)
    assert "data:/data" in svcs["sweeper"]["volumes"]
    assert svcs["listener"]["environment"]["COVIDCT_LISTENER_SWEEPER"] == "false"
    assert svcs["listener"]["healthcheck"]["test"][1:3] == ["covidct", "echo"]
    assert "ports" not in svcs["worker"]  # workers scale: no fixed host port


def test_dockerfile_installs_the_package_and_model() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install ." in text and "COPY models" in text
    assert 'ENTRYPOINT ["covidct"]' in text and "USER covidct" in text


def test_the_web_is_reached_only_through_the_tls_proxy(compose: dict) -> None:
    """docker-compose published the web server's port directly; now only the proxy (Caddy:
    TLS, a body limit, HTTP redirected to HTTPS) is published, and it forwards to web:8000."""
    web, proxy = compose["services"]["web"], compose["services"]["proxy"]
    assert "ports" not in web and web["expose"] == ["8000"]
    assert {p.split(":")[-1] for p in proxy["ports"]} == {"443", "80"}
    assert "./deploy/Caddyfile:/etc/caddy/Caddyfile:ro" in proxy["volumes"]
    caddyfile = (ROOT / "deploy" / "Caddyfile").read_text()
    assert "reverse_proxy web:8000" in caddyfile and "redir https://" in caddyfile
    assert web["environment"]["COVIDCT_WEB_SECURE_COOKIES"].endswith(":-true}")  # HSTS on
