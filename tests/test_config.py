"""Configuration: the bundled config.toml, environment overrides, .env, credentials, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import DEFAULT_CONFIG_PATH, Config, ConfigError, ModelConfig, Secret, load_config, parse_config

ROOT = Path(__file__).parents[1]
BUNDLED = ROOT / "config.toml"
KEY = "sk-test-9c1d7e3f5a2b4680"

# Two providers: the first one (the default) needs a key, the second one does not.
PROVIDERS = """
[[providers]]
name = "first"
base_url = "https://api.example.com/v1"
api_key_env = "FIRST_KEY"
  [[providers.models]]
  id = "m1"
  [[providers.models]]
  id = "m1-big"
  upstream_id = "m1-large"
  label = "M1 big"
  reasoning = true
  extra = { thinking = { type = "enabled" } }

[[providers]]
name = "second"
label = "Second"
base_url = "http://127.0.0.1:11434/v1/"
api_key_env = "SECOND_KEY"
requires_key = false
  [[providers.models]]
  id = "m2"
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, toml: str | None = None, **environ: str) -> Config:
    """load_config with only the given environment, a clean cwd, and optionally our own file."""
    if toml is not None:
        environ.setdefault("RILL_CONFIG", str(write(tmp_path / "rill.toml", toml)))
    return load_config(environ=environ, cwd=tmp_path)


def key_of(config: Config, index: int = 0) -> str | None:
    """The revealed API key of a provider (plain text, so a failing assert shows it)."""
    key = config.providers[index].api_key
    return None if key is None else key.reveal()


def model_ids(config: Config) -> list[str]:
    return [m.id for p in config.providers for m in p.models]


# --- the bundled config.toml ---------------------------------------------------------------


def test_default_config_path_is_the_bundled_file() -> None:
    assert DEFAULT_CONFIG_PATH == BUNDLED
    assert BUNDLED.is_file()


@pytest.mark.parametrize("explicit", [False, True], ids=["RILL_CONFIG-absent", "RILL_CONFIG-bundled"])
def test_bundled_config_parses(tmp_path: Path, explicit: bool) -> None:
    environ = {"RILL_CONFIG": str(BUNDLED)} if explicit else {}
    config = load_config(environ=environ, cwd=tmp_path)

    assert config.default_model == "deepseek-flash"
    assert config.default_model in model_ids(config)
    assert len(set(model_ids(config))) == len(model_ids(config))
    provider = config.providers[0]
    assert provider.name == "deepseek"
    assert provider.api_key_env == "DEEPSEEK_API_KEY"
    assert provider.api_key is None
    assert provider.requires_key is True
    assert provider.usable is False
    assert str(provider.base_url) == "https://api.deepseek.com"
    assert str(provider.completions_url) == "https://api.deepseek.com/chat/completions"
    assert config.secrets == ()
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.stream.retry_ms == 3000
    assert config.compat.get_stream is False


def test_minimal_config_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, PROVIDERS)
    assert config.default_model == "m1"  # the first model of the first provider
    first, second = config.providers
    assert first.label == "first"  # label defaults to the name
    assert first.models[0] == ModelConfig(id="m1", upstream_id="m1", label="m1", reasoning=False, extra={})
    assert first.models[1] == ModelConfig(
        id="m1-big", upstream_id="m1-large", label="M1 big", reasoning=True, extra={"thinking": {"type": "enabled"}}
    )
    assert str(second.base_url) == "http://127.0.0.1:11434/v1"  # trailing slash stripped
    assert str(second.completions_url) == "http://127.0.0.1:11434/v1/chat/completions"
    assert second.usable is True
    assert config.server.port == 8080
    assert config.timeouts.connect == 10.0


def test_integers_are_accepted_where_numbers_are_expected(tmp_path: Path) -> None:
    config = load(tmp_path, "[timeouts]\nconnect = 3\n" + PROVIDERS)
    assert config.timeouts.connect == 3.0
    assert isinstance(config.timeouts.connect, float)


# --- environment overrides -----------------------------------------------------------------


def test_rill_host_overrides_the_bundled_host(tmp_path: Path) -> None:
    # config.toml sets `host = "127.0.0.1"`; the variable must win over it.
    token = "a-token-0123456789"
    assert load(tmp_path, RILL_HOST="0.0.0.0", RILL_ACCESS_TOKENS=token).server.host == "0.0.0.0"


def test_rill_host_when_the_file_sets_no_host(tmp_path: Path) -> None:
    assert load(tmp_path, PROVIDERS, RILL_HOST="::1").server.host == "::1"


def test_rill_port_overrides_the_bundled_port(tmp_path: Path) -> None:
    assert load(tmp_path, RILL_PORT="9001").server.port == 9001


def test_rill_port_zero_is_allowed(tmp_path: Path) -> None:
    assert load(tmp_path, RILL_PORT="0").server.port == 0


@pytest.mark.parametrize(
    ("url", "base", "completions"),
    [
        ("http://127.0.0.1:11434/v1/", "http://127.0.0.1:11434/v1", "http://127.0.0.1:11434/v1/chat/completions"),
        ("http://127.0.0.1:11434/v1", "http://127.0.0.1:11434/v1", "http://127.0.0.1:11434/v1/chat/completions"),
        ("https://llm.example.org/", "https://llm.example.org", "https://llm.example.org/chat/completions"),
        ("http://localhost:8000", "http://localhost:8000", "http://localhost:8000/chat/completions"),
    ],
)
def test_rill_upstream_url_retargets_the_first_provider(tmp_path: Path, url: str, base: str, completions: str) -> None:
    config = load(tmp_path, RILL_UPSTREAM_URL=url)
    provider = config.providers[0]
    assert str(provider.base_url) == base
    assert str(provider.completions_url) == completions
    assert provider.requires_key is False
    assert provider.api_key is None
    assert provider.usable is True
    assert config.default_model == "deepseek-flash"  # the models stay


def test_rill_upstream_url_leaves_other_providers_alone(tmp_path: Path) -> None:
    plain = load(tmp_path, PROVIDERS)
    config = load(tmp_path, PROVIDERS, RILL_UPSTREAM_URL="http://10.0.0.2:8080/v1/")
    assert str(config.providers[0].base_url) == "http://10.0.0.2:8080/v1"
    assert config.providers[1] == plain.providers[1]


def test_rill_upstream_url_keeps_a_key_if_there_is_one(tmp_path: Path) -> None:
    config = load(tmp_path, RILL_UPSTREAM_URL="http://127.0.0.1:9/v1", DEEPSEEK_API_KEY=KEY)
    assert key_of(config) == KEY


def test_rill_model_replaces_the_first_providers_models(tmp_path: Path) -> None:
    config = load(tmp_path, RILL_MODEL="qwen3:8b")
    assert config.providers[0].models == (
        ModelConfig(id="qwen3:8b", upstream_id="qwen3:8b", label="qwen3:8b", reasoning=False),
    )
    assert config.default_model == "qwen3:8b"
    assert "deepseek-flash" not in model_ids(config)


def test_rill_model_leaves_other_providers_alone(tmp_path: Path) -> None:
    config = load(tmp_path, PROVIDERS, RILL_MODEL="llama3")
    assert model_ids(config) == ["llama3", "m2"]
    assert config.default_model == "llama3"


def test_rill_model_clashing_with_another_provider_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'m2'"):
        load(tmp_path, PROVIDERS, RILL_MODEL="m2")


@pytest.mark.parametrize("name", ["RILL_HOST", "RILL_UPSTREAM_URL", "RILL_MODEL"])
def test_empty_override_means_unset(tmp_path: Path, name: str) -> None:
    # An empty variable (`RILL_MODEL=` in a .env template, `Environment=RILL_MODEL=`) changes nothing.
    plain = load(tmp_path)
    config = load(tmp_path, **{name: ""})
    assert config.server.host == plain.server.host
    assert config.providers == plain.providers
    assert config.default_model == plain.default_model == "deepseek-flash"


def test_api_key_from_the_environment_is_a_secret(tmp_path: Path) -> None:
    config = load(tmp_path, DEEPSEEK_API_KEY=KEY)
    provider = config.providers[0]
    assert isinstance(provider.api_key, Secret)
    assert provider.api_key.reveal() == KEY
    assert provider.usable is True
    assert config.secrets == (KEY,)


def test_api_key_is_per_provider(tmp_path: Path) -> None:
    config = load(tmp_path, PROVIDERS, SECOND_KEY=KEY)
    assert config.providers[0].api_key is None
    assert key_of(config, 1) == KEY


def test_blank_api_key_counts_as_none(tmp_path: Path) -> None:
    assert load(tmp_path, DEEPSEEK_API_KEY="  \n").providers[0].api_key is None


# --- .env and credentials ------------------------------------------------------------------

DOTENV = """\
# Rill settings for this machine
export DEEPSEEK_API_KEY="sk-from-dotenv"
RILL_UPSTREAM_URL='http://127.0.0.1:11434/v1'
RILL_PORT=9090 # the port
   # an indented comment
RILL_MODEL = "my-model"
not a setting
"""


def test_dotenv_in_cwd_is_read(tmp_path: Path) -> None:
    write(tmp_path / ".env", DOTENV)
    config = load(tmp_path)
    assert key_of(config) == "sk-from-dotenv"
    assert str(config.providers[0].base_url) == "http://127.0.0.1:11434/v1"
    assert config.server.port == 9090
    assert config.default_model == "my-model"


def test_dotenv_only_from_cwd(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(tmp_path / ".env", DOTENV)
    config = load_config(environ={}, cwd=elsewhere)
    assert config.providers[0].api_key is None
    assert config.server.port == 8080


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("DEEPSEEK_API_KEY=plain", "plain"),
        ("DEEPSEEK_API_KEY = spaced ", "spaced"),
        ("export DEEPSEEK_API_KEY=exported", "exported"),
        ('DEEPSEEK_API_KEY="double"', "double"),
        ("DEEPSEEK_API_KEY='single'", "single"),
        ('DEEPSEEK_API_KEY="with # hash"', "with # hash"),
        ("DEEPSEEK_API_KEY=value # comment", "value"),
        ("DEEPSEEK_API_KEY=a#b", "a#b"),
        ("DEEPSEEK_API_KEY=a=b", "a=b"),
        ('DEEPSEEK_API_KEY="quoted" # comment', "quoted"),
        ("DEEPSEEK_API_KEY='quoted'  # comment", "quoted"),
    ],
)
def test_dotenv_syntax(tmp_path: Path, line: str, value: str) -> None:
    write(tmp_path / ".env", f"# comment\n{line}\n")
    assert key_of(load(tmp_path)) == value


def test_dotenv_commented_out_setting_is_ignored(tmp_path: Path) -> None:
    write(tmp_path / ".env", "# DEEPSEEK_API_KEY=sk-old\n#RILL_PORT=1\n")
    config = load(tmp_path)
    assert config.providers[0].api_key is None
    assert config.server.port == 8080


def test_environment_wins_over_dotenv(tmp_path: Path) -> None:
    write(tmp_path / ".env", DOTENV)
    config = load(tmp_path, DEEPSEEK_API_KEY="sk-from-env", RILL_PORT="7000")
    assert key_of(config) == "sk-from-env"
    assert config.server.port == 7000
    assert str(config.providers[0].base_url) == "http://127.0.0.1:11434/v1"  # still from .env


def test_dotenv_can_name_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path / "other.toml", PROVIDERS)
    write(tmp_path / ".env", f"RILL_CONFIG={path}\n")
    assert load(tmp_path).default_model == "m1"


def credentials(tmp_path: Path, **files: str) -> str:
    folder = tmp_path / "credentials"
    folder.mkdir()
    for name, content in files.items():
        write(folder / name, content)
    return str(folder)


def test_credentials_directory_is_read(tmp_path: Path) -> None:
    folder = credentials(tmp_path, DEEPSEEK_API_KEY="sk-from-credential\n")
    config = load(tmp_path, CREDENTIALS_DIRECTORY=folder)
    assert key_of(config) == "sk-from-credential"  # trailing newline stripped
    assert config.secrets == ("sk-from-credential",)


def test_credential_files_strip_the_trailing_newline_for_any_variable(tmp_path: Path) -> None:
    folder = credentials(tmp_path, RILL_PORT="9091\n", RILL_MODEL="cred-model\n")
    config = load(tmp_path, CREDENTIALS_DIRECTORY=folder)
    assert config.server.port == 9091
    assert config.default_model == "cred-model"
    assert model_ids(config)[0] == "cred-model"


def test_environment_wins_over_credentials(tmp_path: Path) -> None:
    folder = credentials(tmp_path, DEEPSEEK_API_KEY="sk-from-credential\n")
    config = load(tmp_path, CREDENTIALS_DIRECTORY=folder, DEEPSEEK_API_KEY="sk-from-env")
    assert key_of(config) == "sk-from-env"


def test_credentials_win_over_dotenv(tmp_path: Path) -> None:
    write(tmp_path / ".env", "DEEPSEEK_API_KEY=sk-from-dotenv\nRILL_PORT=9090\n")
    folder = credentials(tmp_path, DEEPSEEK_API_KEY="sk-from-credential\n")
    config = load(tmp_path, CREDENTIALS_DIRECTORY=folder)
    assert key_of(config) == "sk-from-credential"
    assert config.server.port == 9090  # what the credentials do not set still comes from .env


def test_missing_credentials_directory_is_ignored(tmp_path: Path) -> None:
    config = load(tmp_path, CREDENTIALS_DIRECTORY=str(tmp_path / "nope"))
    assert config.providers[0].api_key is None


# --- secrets stay secret -------------------------------------------------------------------


def test_secret_hides_its_value() -> None:
    secret = Secret(KEY)
    assert secret.reveal() == KEY
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", "%s" % (secret,), format(secret)):  # noqa: UP031
        assert KEY not in shown
        assert "sk-" not in shown
    assert secret == Secret(KEY)
    assert secret != Secret("other")
    assert secret != KEY
    assert bool(secret) is True
    assert bool(Secret("")) is False


def test_config_repr_and_str_never_show_the_key(tmp_path: Path) -> None:
    folder = credentials(tmp_path, SECOND_KEY=KEY + "-2\n")
    config = load(tmp_path, PROVIDERS, FIRST_KEY=KEY, CREDENTIALS_DIRECTORY=folder)
    assert config.secrets == (KEY, KEY + "-2")
    shown = [repr(config), str(config), f"{config}", repr(config.providers), str(config.providers)]
    shown += [repr(p) for p in config.providers] + [str(p) for p in config.providers]
    shown += [repr(p.api_key) for p in config.providers]
    for text in shown:
        assert KEY not in text
    assert "Secret('***')" in repr(config.providers[0])


def test_answer_and_event_limits(tmp_path: Path) -> None:
    config = load(tmp_path, "[upstream]\nmax_line_chars = 1000\n" + PROVIDERS)
    assert (config.limits.max_answer_bytes, config.upstream.max_event_chars) == (0, 2000)  # 0: derived
    toml = "[limits]\nmax_answer_bytes = 5000\n[upstream]\nmax_event_chars = 300\n" + PROVIDERS
    config = load(tmp_path, toml)
    assert (config.limits.max_answer_bytes, config.upstream.max_event_chars) == (5000, 300)


# --- invalid configurations ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        pytest.param("[server]\nprot = 8080\n" + PROVIDERS, "server.prot", id="unknown-server-key"),
        pytest.param('surprise = "x"\n' + PROVIDERS, "surprise", id="unknown-top-level-key"),
        pytest.param("[timeout]\nconnect = 1.0\n" + PROVIDERS, "timeout", id="unknown-section"),
        pytest.param('[server]\nport = "x"\n' + PROVIDERS, "server.port", id="port-string"),
        pytest.param("[server]\nport = 80.5\n" + PROVIDERS, "server.port", id="port-float"),
        pytest.param("[server]\nport = 70000\n" + PROVIDERS, "server.port", id="port-out-of-range"),
        pytest.param("[server]\nhost = 1\n" + PROVIDERS, "server.host", id="host-int"),
        pytest.param("[compat]\nget_stream = 1\n" + PROVIDERS, "compat.get_stream", id="bool-int"),
        pytest.param("[limits]\nmax_messages = true\n" + PROVIDERS, "limits.max_messages", id="int-bool"),
        pytest.param('[timeouts]\nconnect = "10"\n' + PROVIDERS, "timeouts.connect", id="timeout-string"),
        pytest.param("[timeouts]\nconnect = 0\n" + PROVIDERS, "timeouts.connect", id="timeout-zero"),
        pytest.param("[timeouts]\nidle_read = -1.0\n" + PROVIDERS, "timeouts.idle_read", id="timeout-negative"),
        pytest.param("[timeouts]\nfirst_token = 0.0\n" + PROVIDERS, "timeouts.first_token", id="first-token-zero"),
        pytest.param("[timeouts]\nmax_generation = -5\n" + PROVIDERS, "timeouts.max_generation", id="max-gen-neg"),
        pytest.param("[server]\nshutdown_timeout = 0\n" + PROVIDERS, "server.shutdown_timeout", id="shutdown-zero"),
        pytest.param("[stream]\nretry_ms = 0\n" + PROVIDERS, "stream.retry_ms", id="retry-zero"),
        pytest.param("[upstream]\nretries = -1\n" + PROVIDERS, "upstream.retries", id="retries-negative"),
        pytest.param(
            "[limits]\nmax_answer_bytes = -1\n" + PROVIDERS, "limits.max_answer_bytes", id="answer-bytes-negative"
        ),
        pytest.param(
            "[upstream]\nmax_event_chars = -1\n" + PROVIDERS, "upstream.max_event_chars", id="event-chars-negative"
        ),
        pytest.param(
            '[limits]\ntrusted_proxies = ["nginx"]\n' + PROVIDERS, "limits.trusted_proxies[0]", id="proxy-name"
        ),
        pytest.param("[limits]\ntrusted_proxies = [10]\n" + PROVIDERS, "limits.trusted_proxies[0]", id="proxy-int"),
        pytest.param(
            "[limits]\ngenerations_per_minute = 0\n" + PROVIDERS, "limits.generations_per_minute", id="rate-0"
        ),
        pytest.param('default_model = "m1"\n', "providers", id="no-providers"),
        pytest.param(
            '[[providers]]\nname = "p"\nbase_url = "https://x.example"\n', "providers[0].models", id="no-models"
        ),
        pytest.param(
            '[[providers]]\nbase_url = "https://x.example"\n[[providers.models]]\nid = "a"\n',
            "providers[0].name",
            id="provider-without-name",
        ),
        pytest.param(
            '[[providers]]\nname = "p"\nbase_url = "https://x.example"\n[[providers.models]]\nlabel = "a"\n',
            "providers[0].models[0].id",
            id="model-without-id",
        ),
        pytest.param(
            '[[providers]]\nname = "p"\nbase_url = "https://x.example"\nkey = "k"\n[[providers.models]]\nid = "a"\n',
            "providers[0].key",
            id="unknown-provider-key",
        ),
        pytest.param(
            PROVIDERS.replace("https://api.example.com/v1", "ftp://api.example.com/v1"),
            "providers[0].base_url",
            id="base-url-ftp",
        ),
        pytest.param(
            PROVIDERS.replace("https://api.example.com/v1", "api.example.com/v1"),
            "providers[0].base_url",
            id="base-url-no-scheme",
        ),
        pytest.param(
            PROVIDERS.replace("http://127.0.0.1:11434/v1/", "https://"), "providers[1].base_url", id="base-url-no-host"
        ),
        pytest.param(
            PROVIDERS.replace("https://api.example.com/v1", "http://localhost:80a/v1"),
            "providers[0].base_url",
            id="base-url-bad-port",
        ),
        pytest.param(PROVIDERS.replace('id = "m2"', 'id = "m1"'), "providers.models", id="duplicate-model-id"),
        pytest.param('default_model = "nope"\n' + PROVIDERS, "default_model", id="unknown-default-model"),
        pytest.param("providers = 3\n", "providers", id="providers-not-a-list"),
        pytest.param("server = 3\n" + PROVIDERS, "server", id="server-not-a-table"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, toml)
    assert str(caught.value).startswith(f"{key}:"), str(caught.value)


def test_duplicate_model_id_names_the_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'m1'"):
        load(tmp_path, PROVIDERS.replace('id = "m2"', 'id = "m1"'))


@pytest.mark.parametrize("port", ["abc", "-1", "65536", "80 80", "8080.0", "0x50", "²"])
def test_invalid_rill_port(tmp_path: Path, port: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, RILL_PORT=port)
    assert str(caught.value).startswith("RILL_PORT:"), str(caught.value)


@pytest.mark.parametrize("url", ["localhost:11434", "ftp://host/v1", "http://", "http://localhost:port/v1"])
def test_invalid_rill_upstream_url(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, RILL_UPSTREAM_URL=url)
    assert str(caught.value).startswith("RILL_UPSTREAM_URL:"), str(caught.value)


def test_rill_port_still_type_checks_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^server\.port:"):
        load(tmp_path, '[server]\nport = "x"\n' + PROVIDERS, RILL_PORT="8080")


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.toml", "[server\nport = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"RILL_CONFIG": str(path)}, cwd=tmp_path)
    assert str(path) in str(caught.value)
    assert "TOML" in str(caught.value)


def test_rill_config_pointing_to_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"RILL_CONFIG": str(path)}, cwd=tmp_path)
    assert str(caught.value).startswith("RILL_CONFIG:")
    assert str(path) in str(caught.value)


def test_rill_config_pointing_to_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"RILL_CONFIG": str(tmp_path)}, cwd=tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(PROVIDERS.encode() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"RILL_CONFIG": str(path)}, cwd=tmp_path)
    assert str(path) in str(caught.value)


# --- `python -m server` with a bad config ------------------------------------------------------


def test_server_exits_2_with_one_line_naming_the_key(tmp_path: Path) -> None:
    text = BUNDLED.read_text(encoding="utf-8")
    assert "\nport = 8080" in text
    path = write(tmp_path / "typo.toml", text.replace("\nport = 8080", "\nprot = 8080", 1))
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DEEPSEEK_API_KEY", "CREDENTIALS_DIRECTORY"} and not name.startswith("RILL_")
    }
    env["RILL_CONFIG"] = str(path)

    result = subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "server.prot" in lines[0]
    assert lines[0].startswith("rill: invalid configuration: server.prot:")
    assert result.stdout == ""


def test_trusted_proxies_take_networks(tmp_path: Path) -> None:
    config = load(tmp_path, '[limits]\ntrusted_proxies = ["10.0.0.0/8", "192.168.1.7", "fd00::/8"]\n' + PROVIDERS)
    assert [str(n) for n in config.limits.trusted_proxies] == ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("drain_delay = -1", "server.drain_delay"),
        ("header_timeout = 0", "server.header_timeout"),
        ("body_timeout = -5.0", "server.body_timeout"),
        ("keepalive_timeout = 0", "server.keepalive_timeout"),
        ("max_connections = 0", "server.max_connections"),
        ("max_connections_per_address = 1.5", "server.max_connections_per_address"),
    ],
)
def test_connection_settings_are_checked(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f"[server]\n{line}\n" + PROVIDERS)
    assert str(caught.value).startswith(f"{key}:"), str(caught.value)


def test_connection_settings_are_read(tmp_path: Path) -> None:
    text = "[server]\ndrain_delay = 5\nheader_timeout = 3\nmax_connections_per_address = 8\n"
    server = load(tmp_path, text + PROVIDERS).server
    assert (server.drain_delay, server.header_timeout, server.max_connections_per_address) == (5.0, 3.0, 8)
    assert server.body_timeout == 30.0  # the defaults for the rest


# --- [storage] ---------------------------------------------------------------------------


def test_storage_defaults_to_sqlite_in_the_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = load(tmp_path, PROVIDERS, RILL_STATE_DIR=str(state))
    storage = config.storage
    assert storage.enabled
    assert storage.url == f"sqlite:///{state}/rill.db"
    assert storage.backend == "sqlite"
    assert (storage.save_interval, storage.auto_titles, storage.keep_unread) == (2.0, True, True)
    assert (storage.max_conversations, storage.max_messages, storage.max_bytes) == (10_000, 250_000, 1_073_741_824)
    assert storage.max_message_chars == config.limits.max_message_chars == 100_000
    assert state.is_dir()  # made for the database, though nothing else is kept there
    assert state.stat().st_mode & 0o777 == 0o700


def test_storage_is_off_without_a_place_for_its_file(tmp_path: Path) -> None:
    config = load(tmp_path, PROVIDERS)  # no RILL_STATE_DIR, no HOME
    assert not config.storage.enabled
    assert config.storage.url == ""


def test_bundled_storage_section_matches_the_defaults(tmp_path: Path) -> None:
    config = load_config(environ={"RILL_STATE_DIR": str(tmp_path)}, cwd=tmp_path)
    assert config.storage.enabled
    assert config.storage.url == f"sqlite:///{tmp_path}/rill.db"
    assert config.storage.max_message_chars == config.limits.max_message_chars


def test_storage_settings_are_read(tmp_path: Path) -> None:
    toml = (
        '[storage]\nenabled = false\nurl = "postgresql://rill:pw-5e1f@db.internal:5433/rill"\nsave_interval = 0.5\n'
        "auto_titles = false\nkeep_unread = false\nmax_conversations = 3\nmax_messages = 4\nmax_bytes = 5\n"
        "max_message_chars = 6\n" + PROVIDERS
    )
    storage = load(tmp_path, toml).storage
    assert not storage.enabled
    assert storage.backend == "postgresql"
    assert (storage.save_interval, storage.auto_titles, storage.keep_unread) == (0.5, False, False)
    assert (storage.max_conversations, storage.max_messages, storage.max_bytes, storage.max_message_chars) == (
        3,
        4,
        5,
        6,
    )
    assert storage.shown_url == "postgresql://rill:***@db.internal:5433/rill"
    config = load(tmp_path, toml)
    assert "pw-5e1f" not in repr(config)
    assert "pw-5e1f" in config.secrets  # scrubbed from text that comes from outside


def test_storage_max_message_chars_follows_the_limit(tmp_path: Path) -> None:
    config = load(tmp_path, "[limits]\nmax_message_chars = 777\n" + PROVIDERS, RILL_STATE_DIR=str(tmp_path))
    assert config.storage.max_message_chars == 777


def test_rill_database_url_overrides_the_file(tmp_path: Path) -> None:
    toml = '[storage]\nurl = "sqlite:////tmp/elsewhere.db"\n' + PROVIDERS
    config = load(tmp_path, toml, RILL_DATABASE_URL="postgresql://u@127.0.0.1/rill", RILL_STATE_DIR=str(tmp_path))
    assert config.storage.url == "postgresql://u@127.0.0.1/rill"
    assert config.storage.url_from == "RILL_DATABASE_URL"
    assert load(tmp_path, toml, RILL_DATABASE_URL="").storage.url == "sqlite:////tmp/elsewhere.db"  # empty: unset
    state = tmp_path / "unused-state"
    load(tmp_path, PROVIDERS, RILL_DATABASE_URL="sqlite:////tmp/x.db", RILL_STATE_DIR=str(state))
    assert not state.exists()  # the database is elsewhere, and nothing else is kept


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("enabled = 1", "storage.enabled"),
        ('url = "mysql://x@y/z"', "storage.url"),
        ('url = "/var/lib/rill/rill.db"', "storage.url"),
        ('url = "sqlite://"', "storage.url"),
        ('url = "sqlite:///:memory:"', "storage.url"),
        ("url = 5", "storage.url"),
        ("save_interval = 0", "storage.save_interval"),
        ("auto_titles = 1", "storage.auto_titles"),
        ('keep_unread = "yes"', "storage.keep_unread"),
        ("max_conversations = 0", "storage.max_conversations"),
        ("max_messages = -1", "storage.max_messages"),
        ("max_bytes = 1.5", "storage.max_bytes"),
        ("max_message_chars = 0", "storage.max_message_chars"),
        ('databse = "x"', "storage.databse"),
    ],
)
def test_storage_settings_are_checked(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f"[storage]\n{line}\n" + PROVIDERS)
    assert str(caught.value).startswith(f"{key}:"), str(caught.value)


def test_a_bad_rill_database_url_never_shows_its_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, PROVIDERS, RILL_DATABASE_URL="mysql://u:hunter2-secret@db/rill")
    assert str(caught.value).startswith("RILL_DATABASE_URL:")
    assert "hunter2-secret" not in str(caught.value)


def test_rill_drain_timeout_overrides_the_file_and_is_checked() -> None:
    provider = {"name": "p", "base_url": "http://127.0.0.1:9/v1", "models": [{"id": "m"}]}
    document = {"server": {"drain_timeout": 5.0}, "providers": [provider]}
    assert parse_config(document, {}).server.drain_timeout == 5.0
    assert parse_config(document, {"RILL_DRAIN_TIMEOUT": "120"}).server.drain_timeout == 120.0
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(ConfigError, match="RILL_DRAIN_TIMEOUT: must be a number of seconds"):
            parse_config(document, {"RILL_DRAIN_TIMEOUT": bad})
