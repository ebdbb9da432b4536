import pytest

from kvstore.client.config import ClientConfig, RetryPolicy, parse_endpoints
from kvstore.errors import ConfigError, InvalidArgumentError
from kvstore.server.config import ServerConfig
from kvstore.server.main import load_config
from kvstore.units import format_size, parse_address, parse_size


def test_sizes():
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("64k") == 64 << 10
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("1GB") == 10**9
    assert parse_size(4096) == 4096
    for bad in ("", "lots", "1XB", "-1", True):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert format_size(1536) == "1.5 KiB"


def test_addresses():
    assert parse_address("127.0.0.1:7600") == ("127.0.0.1", 7600)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("nohost", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_server_defaults():
    config = ServerConfig.load({}, environ={})
    assert config.listen == "127.0.0.1:7600"
    assert config.data_dir == "./kvstore-data"
    assert config.memory == 1 << 30
    assert config.max_value_size == 256 << 20
    assert config.metrics_port is None
    assert config.default_durability == "disk"


def test_precedence_flags_over_env_over_file(tmp_path):
    file = tmp_path / "kv.yaml"
    file.write_text("memory: 2GiB\nlisten: 0.0.0.0:7000\ndata_dir: /from/file\nmetrics-port: 9100\n")
    env = {"KVSTORE_MEMORY": "3GiB", "KVSTORE_LISTEN": "127.0.0.1:7001"}
    config = ServerConfig.load({"memory": "4GiB"}, environ=env, config_file=file)
    assert config.memory == 4 << 30  # flag
    assert config.listen == "127.0.0.1:7001"  # env
    assert config.data_dir == "/from/file"  # file
    assert config.metrics_port == 9100


def test_env_names_the_config_file(tmp_path):
    file = tmp_path / "kv.yaml"
    file.write_text("memory: 2MiB\n")
    assert ServerConfig.load({}, environ={"KVSTORE_CONFIG": str(file)}).memory == 2 << 20


def test_cli_flags(monkeypatch):
    monkeypatch.setenv("KVSTORE_IO_THREADS", "2")
    config = load_config(["--listen", "127.0.0.1:0", "--data-dir", "/tmp/x", "--memory", "64MiB", "--metrics-port", "0"])
    assert (config.memory, config.metrics_port, config.io_threads) == (64 << 20, 0, 2)


@pytest.mark.parametrize(
    "args, field",
    [
        ({"memory": "lots"}, "memory"),
        ({"memory": "10"}, "memory"),
        ({"listen": "nowhere"}, "listen"),
        ({"max_value_size": "0"}, "max_value_size"),
        ({"default_durability": "fast"}, "default_durability"),
        ({"metrics_port": 70000}, "metrics_port"),
        ({"io_threads": "many"}, "io_threads"),
        ({"log_level": "LOUD"}, "log_level"),
    ],
)
def test_bad_values_name_the_field(args, field):
    with pytest.raises(ConfigError) as err:
        ServerConfig.load(args, environ={})
    assert str(err.value).startswith(field)
    assert isinstance(err.value, InvalidArgumentError)


def test_bad_files(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="missing.yaml"):
        ServerConfig.load({}, environ={}, config_file=missing)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("memroy: 1GiB\n")
    with pytest.raises(ConfigError, match="memroy"):
        ServerConfig.load({}, environ={}, config_file=unknown)
    broken = tmp_path / "broken.yaml"
    broken.write_text("memory: [1\n")
    with pytest.raises(ConfigError, match="YAML"):
        ServerConfig.load({}, environ={}, config_file=broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(ConfigError, match="mapping"):
        ServerConfig.load({}, environ={}, config_file=scalar)


def test_client_config():
    assert parse_endpoints("a:1, b:2") == ("a:1", "b:2")
    assert parse_endpoints(["a:1", "b:2,c:3"]) == ("a:1", "b:2", "c:3")
    with pytest.raises(ConfigError):
        parse_endpoints("")
    with pytest.raises(ConfigError):
        parse_endpoints("nohost")
    config = ClientConfig.load({"endpoints": "h:1"}, environ={"KVSTORE_TENANT": "acme", "KVSTORE_TIMEOUT": "2.5"})
    assert (config.endpoints, config.tenant, config.subtenant, config.timeout) == (("h:1",), "acme", "default", 2.5)
    with pytest.raises(InvalidArgumentError):
        ClientConfig(tenant="bad/name")
    with pytest.raises(ConfigError):
        ClientConfig(default_durability="fast")


def test_retry_policy():
    policy = RetryPolicy(attempts=4, backoff=0.01, multiplier=2, max_backoff=0.015)
    assert [policy.delay(i) for i in (1, 2, 3, 4)] == [0, 0.01, 0.015, 0.015]
    with pytest.raises(ConfigError):
        RetryPolicy(attempts=0)
