"""deploy/install.sh, run as an unprivileged test would (--root DIR --no-apt --no-venv
--no-start): the code, /etc/rill with its secrets, the systemd unit and the nginx site
land where they should, and a second run upgrades without touching secrets or edits."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "install.sh"
CODE = ["server", "web", "deploy", "requirements.txt", "config.toml"]
OFFLINE = ["--no-apt", "--no-venv", "--no-start"]
TOKEN_LINE = re.compile(r"^admin:([A-Za-z0-9_-]{43})$")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of this checkout's code (the script installs the checkout it is in), plus
    the byte-code and npm files a working checkout has and an install must leave out."""
    copy = tmp_path_factory.mktemp("checkout")
    for name in CODE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
        else:
            shutil.copy2(ROOT / name, copy / name)
    (copy / "server/__pycache__").mkdir()
    (copy / "server/__pycache__/app.cpython-311.pyc").write_bytes(b"\0")
    (copy / "web/vendor/node_modules/marked").mkdir(parents=True)
    (copy / "web/vendor/node_modules/marked/package.json").write_text("{}")
    return copy


def install(checkout: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(checkout / "deploy/install.sh"), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def install_ok(checkout: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = install(checkout, root, *OFFLINE, "--domain", "chat.test", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def token_of(root: Path) -> str:
    lines = (root / "etc/rill/access-tokens").read_text().splitlines()
    assert len(lines) == 1, lines
    match = TOKEN_LINE.match(lines[0])
    assert match, lines[0]
    return match.group(1)


def test_the_code_lands_in_the_prefix_read_only_and_without_caches(checkout: Path, tmp_path: Path) -> None:
    install_ok(checkout, tmp_path)
    prefix = tmp_path / "opt/rill"
    expected = {
        path.relative_to(checkout)
        for path in checkout.rglob("*")
        if path.is_file() and not {"__pycache__", "node_modules"} & set(path.parts)
    }
    installed = {path.relative_to(prefix) for path in prefix.rglob("*") if path.is_file()}
    assert installed == expected
    assert Path("server/__main__.py") in installed
    assert Path("web/templates/index.html") in installed
    assert Path("deploy/nginx/rill.conf") in installed
    for name in installed:
        assert (prefix / name).read_bytes() == (checkout / name).read_bytes(), name
    writable = [p for p in prefix.rglob("*") if not p.is_symlink() and mode(p) & (stat.S_IWGRP | stat.S_IWOTH)]
    assert writable == [], "the service must not be able to change its code"


def test_etc_rill_gets_the_config_an_empty_key_and_one_generated_token(checkout: Path, tmp_path: Path) -> None:
    result = install_ok(checkout, tmp_path)
    etc = tmp_path / "etc/rill"
    # The dynamic service user reads config.toml itself; the secrets reach it as credentials.
    assert mode(etc) == 0o755
    assert mode(etc / "config.toml") == 0o644
    assert (etc / "config.toml").read_text() == (ROOT / "config.toml").read_text()
    assert mode(etc / "deepseek.key") == 0o600
    assert (etc / "deepseek.key").read_bytes() == b""  # empty: the offline demo
    assert mode(etc / "access-tokens") == 0o600
    token = token_of(tmp_path)
    assert token in result.stdout  # shown once, at the end
    assert token not in result.stderr
    assert "/etc/rill/deepseek.key" in result.stdout  # how to add the key
    # What the unit hands Rill (LoadCredential= copies, RILL_CONFIG) is a valid setup.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    shutil.copy(etc / "deepseek.key", credentials / "DEEPSEEK_API_KEY")
    shutil.copy(etc / "access-tokens", credentials / "RILL_ACCESS_TOKENS")
    environ = {"CREDENTIALS_DIRECTORY": str(credentials), "RILL_CONFIG": str(etc / "config.toml")}
    config = load_config(environ=environ | {"RILL_HOST": "0.0.0.0"}, cwd=tmp_path)
    assert [(t.name, t.secret.reveal()) for t in config.access.tokens] == [("admin", token)]
    assert config.providers[0].api_key is None  # the empty key: the offline demo


def test_a_second_run_upgrades_the_code_and_keeps_token_key_and_edited_config(checkout: Path, tmp_path: Path) -> None:
    install_ok(checkout, tmp_path)
    etc = tmp_path / "etc/rill"
    token = token_of(tmp_path)
    edited = (etc / "config.toml").read_text().replace("port = 8080", "port = 8181")
    assert edited != (ROOT / "config.toml").read_text()
    (etc / "config.toml").write_text(edited)
    (etc / "deepseek.key").write_text("sk-test-key\n")
    (etc / "deepseek.key").chmod(0o644)  # loosened by hand: the next run tightens it
    stale = tmp_path / "opt/rill/server/removed_module.py"
    stale.write_text("# a file a newer version no longer has\n")

    second = install_ok(checkout, tmp_path)

    assert token_of(tmp_path) == token
    assert token not in second.stdout + second.stderr, "an existing token must never be printed again"
    assert (etc / "config.toml").read_text() == edited
    assert (etc / "deepseek.key").read_text() == "sk-test-key\n"
    assert mode(etc / "deepseek.key") == 0o600
    assert mode(etc / "access-tokens") == 0o600
    assert not stale.exists(), "the upgrade must replace the code, not merge into it"
    assert "server 127.0.0.1:8181 max_fails=0;" in (tmp_path / "etc/nginx/sites-available/rill").read_text()


def test_the_installed_unit_points_at_the_prefix_and_passes_systemd_analyze_verify(
    checkout: Path, tmp_path: Path
) -> None:
    install_ok(checkout, tmp_path, "--prefix", "/srv/rill")
    text = (tmp_path / "etc/systemd/system/rill.service").read_text()
    assert "/opt/rill" not in text
    assert "ExecStart=/srv/rill/.venv/bin/python -m server" in text
    assert "WorkingDirectory=/srv/rill\n" in text
    for line in [
        "LoadCredential=DEEPSEEK_API_KEY:/etc/rill/deepseek.key",
        "LoadCredential=RILL_ACCESS_TOKENS:/etc/rill/access-tokens",
        "Environment=RILL_CONFIG=/etc/rill/config.toml",
        "StateDirectory=rill",
    ]:
        assert line in text.splitlines(), line

    socket_unit = (tmp_path / "etc/systemd/system/rill.socket").read_text()
    assert "ListenStream=127.0.0.1:8080" in socket_unit.splitlines()  # the config's port
    verify_unit(text, tmp_path, "rill.service", {"rill.socket": socket_unit})


def verify_unit(text: str, tmp_path: Path, name: str, beside: dict[str, str] | None = None) -> None:
    """systemd-analyze verify passes the unit (and the units `beside` it), without a
    warning. As in test_deploy.py, its paths point at what was installed here (--no-venv
    made no .venv: a Python stands in)."""
    prefix = tmp_path / "srv/rill"
    (prefix / ".venv/bin").mkdir(parents=True, exist_ok=True)
    if not (prefix / ".venv/bin/python").exists():
        (prefix / ".venv/bin/python").symlink_to(sys.executable)
    unit = tmp_path / name
    unit.write_text(text.replace("/srv/rill", str(prefix)))
    others = []
    for other_name, other_text in (beside or {}).items():
        (tmp_path / other_name).write_text(other_text)
        others.append(str(tmp_path / other_name))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit), *others], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_the_nginx_site_serves_the_domain_and_is_valid_for_nginx(checkout: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    install_ok(checkout, root)
    site = root / "etc/nginx/sites-available/rill"
    text = site.read_text()
    assert re.search(r"^\s*server_name chat\.test;$", text, re.MULTILINE), text
    assert "example.com" not in text
    assert "proxy_set_header Host $http_host;" in text
    assert "server 127.0.0.1:8080 max_fails=0;" in text  # the bundled config's port
    link = root / "etc/nginx/sites-enabled/rill"
    assert link.is_symlink()
    assert link.resolve() == site.resolve()

    nginx_accepts(link, tmp_path / "nginx")


def nginx_accepts(site: Path, work: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work.mkdir()
    (work / "nginx.conf").write_text(
        f"pid {work}/nginx.pid;\nerror_log {work}/error.log;\nevents {{}}\n"
        f"http {{ access_log off; client_body_temp_path {work}/body; proxy_temp_path {work}/proxy; "
        f"include {site}; }}\n"
    )
    result = subprocess.run(
        [nginx, "-t", "-q", "-p", str(work), "-e", str(work / "error.log"), "-c", str(work / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr + (work / "error.log").read_text()


def test_workers_install_a_template_unit_per_port_and_an_upstream_of_them_all(checkout: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = install_ok(checkout, root, "--workers", "3", "--prefix", "/srv/rill")
    assert not (root / "etc/systemd/system/rill.service").exists()
    assert not (root / "etc/systemd/system/rill.socket").exists()  # each process listens itself
    template = (root / "etc/systemd/system/rill@.service").read_text()
    assert "rill.socket" not in template
    lines = template.splitlines()
    for line in [
        "Description=Rill streaming chat relay (port %i)",
        "Environment=RILL_PORT=%i",
        "Environment=RILL_REDIS_URL=redis://127.0.0.1:6379/0",
        "Environment=RILL_DRAIN_TIMEOUT=120",
        "TimeoutStopSec=180",  # above the drain plus twice shutdown_timeout
        "User=rill",  # one dynamic user for all: they share the state directory
        "DynamicUser=yes",
        "ExecStart=/srv/rill/.venv/bin/python -m server",
        "StateDirectory=rill",
    ]:
        assert line in lines, line
    site = (root / "etc/nginx/sites-available/rill").read_text()
    servers = re.findall(r"^\s*server 127\.0\.0\.1:(\d+) max_fails=0;$", site, re.MULTILINE)
    assert servers == ["8080", "8081", "8082"]
    assert "proxy_next_upstream error http_503 non_idempotent;" in site
    assert "for p in 8080 8081 8082; do systemctl restart rill@$p; done" in result.stdout
    nginx_accepts(root / "etc/nginx/sites-enabled/rill", tmp_path / "nginx")

    verify_unit(template, tmp_path, "rill@8081.service")  # an instance, as systemd makes it
    environment = [line.removeprefix("Environment=") for line in lines if line.startswith("Environment=")]
    environ = dict(item.replace("%i", "8081").split("=", 1) for item in environment)
    environ |= {"RILL_CONFIG": str(root / "etc/rill/config.toml"), "RILL_ACCESS_TOKENS": "a:" + "x1y2z3w4" * 4}
    config = load_config(environ)
    assert (config.server.port, config.server.drain_timeout) == (8081, 120.0)
    assert config.cluster.redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*OFFLINE, "--domain", "chat.test", "--frobnicate"], "unknown option: --frobnicate"),
        (OFFLINE, "--domain is required"),
        ([*OFFLINE, "--domain"], "--domain needs a value"),
        ([*OFFLINE, "--domain", "chat.test/evil"], "not a host name"),
        (["--no-apt", "--domain", "chat.test"], "--root needs --no-apt and --no-start"),
        ([*OFFLINE, "--domain", "chat.test", "--workers", "0"], "--workers: a number of processes from 1 to 32"),
        ([*OFFLINE, "--domain", "chat.test", "--workers", "33"], "--workers: a number of processes from 1 to 32"),
        ([*OFFLINE, "--domain", "chat.test", "--workers", "two"], "--workers: a number of processes from 1 to 32"),
        ([*OFFLINE, "--domain", "chat.test", "--redis-url", "redis://h:1/0"], "--redis-url is for --workers 2 or more"),
        (
            [*OFFLINE, "--domain", "chat.test", "--workers", "2", "--redis-url", "redis://:pw@h:1/0"],
            "--redis-url: must be redis://host:port/db without a password",
        ),
    ],
)
def test_bad_arguments_exit_2_with_a_message_and_write_nothing(
    checkout: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    result = install(checkout, tmp_path, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_help_prints_usage() -> None:
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: sudo deploy/install.sh --domain NAME")
    for option in ["--email", "--prefix", "--no-apt", "--no-venv", "--no-start", "--root"]:
        assert option in result.stdout


def test_without_root_it_refuses_unless_given_a_root_directory() -> None:
    # Run as nobody (dropping root when the tests run as root), the script on stdin so
    # that nobody need not be able to read this checkout.
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    result = subprocess.run(
        [*user, "bash", "-s", "--", *OFFLINE, "--domain", "chat.test"],
        input=SCRIPT.read_text(),
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "run it as root" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("prefix", "hidden_by"),
    [
        ("/home/admin/rill", "ProtectHome=yes"),
        ("/home", "ProtectHome=yes"),
        ("/root/rill", "ProtectHome=yes"),
        ("/run/user/1000/rill", "ProtectHome=yes"),
        ("/tmp/rill", "PrivateTmp=yes"),
        ("/var/tmp/rill", "PrivateTmp=yes"),
    ],
)
def test_a_prefix_the_units_sandbox_hides_is_refused(
    checkout: Path, tmp_path: Path, prefix: str, hidden_by: str
) -> None:
    # The unit would point at a directory the service cannot see: it could never start.
    result = install(checkout, tmp_path, *OFFLINE, "--domain", "chat.test", "--prefix", prefix)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--prefix: {prefix} is hidden from the service by {hidden_by}" in result.stderr
    assert "/opt/rill" in result.stderr  # what to use instead
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_a_prefix_is_judged_by_where_its_symlinks_lead(checkout: Path, tmp_path: Path) -> None:
    # Inside --root DIR, as on the machine it becomes: /opt -> home/admin.
    (tmp_path / "home/admin").mkdir(parents=True)
    (tmp_path / "opt").symlink_to("home/admin")
    result = install(checkout, tmp_path, *OFFLINE, "--domain", "chat.test", "--prefix", "/opt/rill")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--prefix: /opt/rill (which resolves to /home/admin/rill) is hidden from the service" in result.stderr
    assert not (tmp_path / "home/admin/rill").exists()
    assert not (tmp_path / "etc").exists()


def test_a_prefix_below_a_directory_others_cannot_enter_is_refused(checkout: Path, tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir(mode=0o750)
    (tmp_path / "srv").chmod(0o750)
    result = install(checkout, tmp_path, *OFFLINE, "--domain", "chat.test", "--prefix", "/srv/rill")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--prefix: the service could not reach /srv/rill: /srv is mode 750 (others need x" in result.stderr
    (tmp_path / "srv").chmod(0o755)
    install_ok(checkout, tmp_path, "--prefix", "/srv/rill")
