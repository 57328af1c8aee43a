"""Tests of the site YAML: paths, validation messages, the --node-config string, the examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedimg.deploy.site import (
    ReconnectPolicy,
    SiteLimits,
    federation_classes,
    load_site_config,
    node_config,
)
from fedimg.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "clients" / "sites").glob("*.yaml"))
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def _site_folder(tmp_path: Path) -> Path:
    """A site folder with a CA file and a node key, as a site would have them."""
    folder = tmp_path / "etc"
    (folder / "keys").mkdir(parents=True)
    (folder / "ca.crt").write_text("CA")
    (folder / "keys" / "hospital_a.key").write_text("KEY")
    return folder


def _write(folder: Path, body: str) -> Path:
    path = folder / "hospital_a.yaml"
    path.write_text(body)
    return path


VALID = """\
name: hospital_a
superlink: fl.example.org:9092
ca_certificate: ca.crt
private_key: keys/hospital_a.key
data: data/xray
device: cpu
port: 9095
limits: {num_threads: 2, min_samples: 16}
reconnect: {backoff_s: 5}
"""


def test_valid_site_resolves_relative_paths_against_its_folder(tmp_path: Path) -> None:
    # Arrange
    folder = _site_folder(tmp_path)
    path = _write(folder, VALID)
    # Act
    site = load_site_config(path)
    # Assert
    assert site.name == "hospital_a" and site.superlink == "fl.example.org:9092"
    assert site.ca_certificate == folder / "ca.crt"
    assert site.private_key == folder / "keys" / "hospital_a.key"
    assert site.public_key == folder / "keys" / "hospital_a.pub"
    assert site.data == folder / "data" / "xray"
    assert (site.device, site.port, site.scenario, site.classes) == ("cpu", 9095, "medical", ())
    assert site.limits == SiteLimits(num_threads=2, max_samples=None, min_samples=16)
    assert site.reconnect == ReconnectPolicy(max_wait_s=None, backoff_s=5.0)
    assert site.source == path


def test_unknown_key_is_named_with_the_close_valid_one(tmp_path: Path) -> None:
    # Arrange
    path = _write(_site_folder(tmp_path), VALID + "devcie: cuda\n")
    # Act
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    # Assert
    message = str(err.value)
    assert str(path) in message and "devcie: unknown key" in message
    assert "did you mean 'device'?" in message


def test_unknown_nested_key_is_named_with_its_section(tmp_path: Path) -> None:
    # Arrange
    path = _write(_site_folder(tmp_path), VALID.replace("min_samples: 16", "min_sample: 16"))
    # Act
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    # Assert
    assert "limits.min_sample: unknown key (did you mean 'limits.min_samples'?)" in str(err.value)


def test_missing_ca_file_is_named(tmp_path: Path) -> None:
    # Arrange
    folder = _site_folder(tmp_path)
    (folder / "ca.crt").unlink()
    path = _write(folder, VALID)
    # Act
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    # Assert
    assert f"ca_certificate: file {folder / 'ca.crt'} does not exist" in str(err.value)


def test_superlink_without_port_is_refused(tmp_path: Path) -> None:
    # Arrange
    path = _write(_site_folder(tmp_path), VALID.replace("fl.example.org:9092", "fl.example.org"))
    # Act
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    # Assert
    assert "superlink: 'fl.example.org' is not host:port" in str(err.value)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("port: 9095", "port: '9095'", "port: '9095' is not an integer"),
    ("device: cpu", "device: gpu", "device: 'gpu' is unknown"),
    ("name: hospital_a", "name: -a", "name: '-a' is not a valid node name"),
    ("name: hospital_a\n", "", "name: required but missing"),
])
def test_bad_values_are_refused_with_key_and_value(tmp_path: Path, old: str, new: str,
                                                   expected: str) -> None:
    # Arrange
    path = _write(_site_folder(tmp_path), VALID.replace(old, new))
    # Act
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    # Assert
    assert expected in str(err.value)


def test_node_config_string_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: no state_dir, so the ledger lives in the user's state dir
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    folder = _site_folder(tmp_path)
    site = load_site_config(_write(folder, VALID))
    # Act
    text = node_config(site)
    # Assert
    assert text == (f'site="hospital_a" data-path="{folder / "data" / "xray"}" device="cpu" '
                    f'num-threads=2 min-samples=16 state-dir="{tmp_path}/state/fedimg/'
                    'hospital_a" federation="fl.example.org:9092" policy-require-dp=false '
                    'policy-lifetime-delta=1e-05 policy-min-batch-size=1 '
                    'policy-never-accept="seeded_noise,faults,attack,synthetic,hetero"')


POLICY = VALID + """federation: chest-xray-2027
state_dir: /var/lib/fedimg/hospital_a
policy:
  require_dp: true
  max_run_epsilon: 4
  lifetime_epsilon: 10
  min_noise_multiplier: 0.8
  min_batch_size: 16
  never_accept: [seeded_noise, faults]
"""


def test_policy_reaches_the_clientapp_through_the_node_config(tmp_path: Path) -> None:
    # Arrange
    import tomllib

    from fedimg.clientapp.site import site_options

    site = load_site_config(_write(_site_folder(tmp_path), POLICY))
    # Act: Flower parses --node-config as TOML key=value pairs
    parsed = tomllib.loads("\n".join(node_config(site).split(" ")))
    options = site_options(parsed)
    # Assert
    assert options is not None and options.policy == site.policy
    assert options.policy.max_run_epsilon == 4.0 and options.policy.min_batch_size == 16
    assert options.policy.never_accept == ("seeded_noise", "faults")
    assert options.state_dir == "/var/lib/fedimg/hospital_a"
    assert options.federation == "chest-xray-2027"


@pytest.mark.parametrize("policy, named", [
    ("{lifetime_epsilon: 10}", "policy.lifetime_epsilon: a lifetime budget needs require_dp"),
    ("{require_dp: true, max_run_epsilon: -1}", "policy.max_run_epsilon: -1.0 is not positive"),
    ("{never_accept: [seeded_noise, telemetry]}", "unknown settings ['telemetry']"),
    ("{require_dp: yes-please}", "policy.require_dp: 'yes-please' is not true or false"),
    ("{max_epsilon: 3}", "policy.max_epsilon: unknown key"),
    ("{require_dp: true, lifetime_delta: .nan}", "policy.lifetime_delta: nan is not a number"),
    ("{require_dp: true, lifetime_delta: 1e-5x}", "policy.lifetime_delta: '1e-5x' is not a"),
])
def test_a_bad_policy_is_one_line_naming_the_key(tmp_path: Path, policy: str,
                                                 named: str) -> None:
    # Arrange
    path = _write(_site_folder(tmp_path), VALID + f"policy: {policy}\n")
    # Act
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    # Assert
    assert named in str(err.value) and "Fix:" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_number_without_a_dot_is_a_number(tmp_path: Path) -> None:
    # Arrange: YAML 1.1 (PyYAML) reads 1e-6 as the string '1e-6'
    path = _write(_site_folder(tmp_path), VALID + "policy: {require_dp: true, "
                  "lifetime_epsilon: 10, lifetime_delta: 1e-6, max_run_epsilon: 2E+0}\n")
    # Act
    site = load_site_config(path)
    # Assert
    assert site.policy.lifetime_delta == 1e-6 and site.policy.max_run_epsilon == 2.0


def test_node_config_adds_max_samples_only_when_set(tmp_path: Path) -> None:
    # Arrange
    body = VALID.replace("min_samples: 16}", "min_samples: 16, max_samples: 500}")
    site = load_site_config(_write(_site_folder(tmp_path), body))
    # Act
    text = node_config(site)
    # Assert
    assert "num-threads=2 min-samples=16 max-samples=500 state-dir=" in text


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_shipped_site_examples_load(path: Path) -> None:
    # Act
    site = load_site_config(path, check_files=False)
    # Assert
    assert site.name == path.stem
    assert site.ca_certificate == REPO / "clients" / "certs" / "ca.crt"
    assert site.private_key == REPO / "clients" / "keys" / f"{path.stem}.key"


def test_shipped_examples_use_distinct_ports() -> None:
    # Act
    ports = [load_site_config(p, check_files=False).port for p in EXAMPLES]
    # Assert
    assert len(EXAMPLES) == 3 and sorted(ports) == [9094, 9095, 9096]


def test_federation_classes_come_from_the_scenario_or_the_explicit_list() -> None:
    # Arrange
    hospital = load_site_config(REPO / "clients/sites/hospital_a.yaml", check_files=False)
    camera = load_site_config(REPO / "clients/sites/camera_01.yaml", check_files=False)
    # Act / Assert: scenario "medical" is PneumoniaMNIST
    assert federation_classes(hospital) == ("normal", "pneumonia")
    assert federation_classes(camera) == CIFAR10
