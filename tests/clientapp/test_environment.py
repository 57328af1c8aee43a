"""The per-process client task: caching, partitions from the server, a shared model per worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedimg.config.compose import compose_config
from fedimg.config import to_json
from fedimg.clientapp.environment import TaskEnvironment, environment
from fedimg.data import ClientPartition, partition_dataset
from fedimg.errors import ConfigError, DataError
from fedimg.transport.records import partitions_from_record, partitions_record
from fedimg.training import balanced_class_weights


def test_balanced_class_weights_by_hand() -> None:
    # 3 of class 0, 1 of class 1, none of class 2: n / (k * n_c) with k = 2 present.
    weights = balanced_class_weights(torch.tensor([0, 0, 0, 1]), 3)
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 2.0, 1.0]))
    # The mean weight per sample stays 1: (3 * 2/3 + 1 * 2) / 4.
    assert float((3 * weights[0] + weights[1]) / 4) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, tiny_overrides):
    run_dir = tmp_path_factory.mktemp("task")
    return compose_config("medical", [f"hydra.run.dir={run_dir}", *tiny_overrides,
                                      "train.batch_size=16", "train.lr=0.02",
                                      "train.class_weighting=balanced"])


def _server_partitions(env: TaskEnvironment) -> list[ClientPartition]:
    """What the server computes for this config (fedimg.build), from the same data."""
    cfg = env.cfg
    return partition_dataset(env.dataset.train, cfg=cfg.data, num_clients=cfg.clients,
                             seed=cfg.seed)


def test_environment_is_built_once_per_config(tiny_cfg) -> None:
    # Arrange: the worker's environment knows no client until a message brings them
    # (tiny_cfg's run directory is this module's own, so no other test built it)
    first = environment(to_json(tiny_cfg), 1)
    assert environment(to_json(tiny_cfg), 1) is first
    with pytest.raises(DataError, match="partition id 0 is out of range: this run has 0"):
        first.client(0)
    # Act: the partitions as they travel in a message
    first.install_partitions(partitions_from_record(partitions_record(
        _server_partitions(first))))
    # Assert
    assert first.partitions == _server_partitions(first)
    assert first.client(0) is first.client(0)  # loaders cached too


def test_a_standalone_environment_partitions_itself_as_the_server_does(tiny_cfg) -> None:
    env = TaskEnvironment(tiny_cfg, num_threads=1)
    assert len(env.partitions) == 2 and env.partitions == _server_partitions(env)


def test_installing_partitions_refuses_indices_beyond_the_data(tiny_cfg) -> None:
    # Arrange: a worker that loaded the 96 synthetic training images
    env = TaskEnvironment(tiny_cfg, num_threads=1, partitions=())
    n = len(env.dataset.train.labels)
    assert n == 96
    # Act / Assert: index 96 (one past the end) or -1 means the server read other data
    for bad in (np.array([0, 96]), np.array([-1, 3])):
        with pytest.raises(DataError, match="indexes beyond the 96 training images"):
            env.install_partitions([ClientPartition(0, np.arange(8), bad)])
    assert env.partitions == []  # nothing half-installed
    # The first good install holds; a later one changes nothing.
    good = _server_partitions(env)
    env.install_partitions(good)
    env.install_partitions([ClientPartition(0, np.arange(3), np.arange(3, 5))])
    assert env.partitions == good


def test_shared_model_serves_clients_without_leaking_state(tiny_cfg) -> None:
    # Arrange: one environment (one model object) serving two clients in turn.
    env = TaskEnvironment(tiny_cfg, num_threads=1)
    start = env.state()
    # Act: client 0 trains; then the same global weights are loaded for client 1.
    env.load_state(start)
    metrics, n0 = env.train(0, server_round=1)
    after_client0 = env.state()
    env.load_state(start)
    # Assert: client 1 starts exactly from the global weights, not from client 0's.
    assert all(torch.equal(env.state()[k], start[k]) for k in start)
    assert any(not torch.equal(after_client0[k], start[k]) for k in start)
    assert n0 == env.client(0).num_train and metrics["train/steps"] >= 1
    assert env.client(0).class_weights is not None


def test_same_round_and_client_give_the_same_update(tiny_cfg) -> None:
    env = TaskEnvironment(tiny_cfg, num_threads=1)
    start = env.state()
    updates = []
    for _ in range(2):
        env.load_state(start)
        env.train(1, server_round=1)
        updates.append(env.state())
    assert all(torch.equal(updates[0][k], updates[1][k]) for k in start)


def test_a_site_data_error_reaches_the_server_without_file_names(tmp_path, caplog) -> None:
    # Arrange: a site folder whose only image is unreadable (its name could be a patient id)
    import logging

    from fedimg.clientapp import app as client_app
    from fedimg.clientapp.site import SiteOptions
    from fedimg.config import DataConfig, FedimgConfig

    folder = tmp_path / "site" / "RBC"
    folder.mkdir(parents=True)
    (folder / "patient-4711.png").write_bytes(b"not an image")
    cfg = FedimgConfig(data=DataConfig(dataset="bccd_cells"))
    # Act
    with caplog.at_level(logging.ERROR), pytest.raises(DataError) as info:
        client_app._site_environment(to_json(cfg), SiteOptions(data_path=str(tmp_path / "site"),
                                                               name="hospital_a"))
    # Assert: the server's line names the site, not the file; the site's log has it
    assert "hospital_a" in str(info.value) and "patient-4711" not in str(info.value)
    assert "patient-4711" in caplog.text


def test_a_deployed_site_labels_its_images_with_the_runs_own_classes(tmp_path) -> None:
    # Arrange: a run on your own data (a folder at the coordinator), deployed with its
    # class list; the site holds images of both classes under its own path
    from PIL import Image

    from fedimg.clientapp.environment import site_environment
    from fedimg.clientapp.site import SiteOptions
    from fedimg.config.compose import compose_config

    for k, name in enumerate(("benign", "malignant")):
        (tmp_path / "site" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12, 12), (40 + 100 * k, i, 0)).save(
                tmp_path / "site" / name / f"{i}.png")
    cfg = compose_config("medical", ["deploy.enabled=true", "data.dataset=folder",
                                     f"data.path={tmp_path / 'coordinator'}",
                                     "data.classes=[benign,malignant]", "data.image_size=16"])
    # Act
    env = site_environment(to_json(cfg), SiteOptions(data_path=str(tmp_path / "site"),
                                                     name="hospital_a", min_samples=4))
    # Assert
    assert env.dataset.classes == ("benign", "malignant")
    data = env.client(0)
    assert data.num_train + data.num_val == 20 and env.num_classes == 2


def test_deploying_your_own_data_without_its_classes_is_one_line() -> None:
    from fedimg.config.compose import compose_config

    with pytest.raises(ConfigError, match="Fix: name the classes in label order"):
        compose_config("medical", ["deploy.enabled=true", "data.dataset=npz",
                                   "data.path=/x.npz"])
