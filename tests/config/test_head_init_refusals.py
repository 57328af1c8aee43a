"""``fl.head_init``, ``transfer.train_head`` and federated class weights: refusals, one line each."""

from __future__ import annotations

import pytest

from fedimg.config import TransferConfig
from fedimg.errors import ConfigError
from fedimg.models import build_model
from fedimg.resolve import compose_and_check
from refusals import assert_refused_in_one_line


@pytest.mark.parametrize(("overrides", "says"), [
    (["fl.head_init=ridge", "privacy.mode=dp_sgd"],
     "fl.head_init=ridge with privacy.mode=dp_sgd: the clients' feature sums would leave"),
    (["fl.head_init=ridge", "privacy.mode=client_dp"], "with privacy.mode=client_dp"),
    (["fl.head_init=ridge", "fl.secure_aggregation=secaggplus"],
     "with fl.secure_aggregation=secaggplus: the feature sums are sent unmasked"),
    (["fl.ridge_lambda=0"], "fl.ridge_lambda=0.0 is impossible"),
    (["fl.ridge_lambda=nan"], "fl.ridge_lambda=nan is impossible"),
])
def test_head_init_refuses_with_one_line_naming_value_reason_and_fix(overrides, says):
    assert_refused_in_one_line(overrides, says)


def test_an_unknown_head_init_names_the_valid_ones():
    with pytest.raises(ConfigError, match="lasso") as caught:
        compose_and_check("medical", ["fl.head_init=lasso"])
    assert "ridge" in str(caught.value) and "none" in str(caught.value)


def test_a_fixed_head_trains_only_the_blocks_and_a_head_only_run_refuses_it():
    # Arrange / Act
    model = build_model("resnet18", num_classes=3, weights="none",
                        transfer=TransferConfig(mode="last_k", last_k=1, train_head=False))
    # Assert: the last block trains, the head does not
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"layer4"}
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        build_model("resnet18", num_classes=3, weights="none",
                    transfer=TransferConfig(mode="head", train_head=False))


def test_both_are_off_by_default():
    cfg = compose_and_check("medical", [])
    assert (cfg.fl.head_init, cfg.fl.ridge_lambda, cfg.transfer.train_head) == \
        ("none", 0.1, True)


@pytest.mark.parametrize(("overrides", "says"), [
    (["train.class_weighting=federated", "privacy.mode=dp_sgd"],
     "train.class_weighting=federated with privacy.mode=dp_sgd: each client's exact class"),
    (["train.class_weighting=federated", "privacy.mode=client_dp"], "privacy.mode=client_dp"),
    (["train.class_weighting=federated", "fl.secure_aggregation=secaggplus"],
     "the class counts are sent unmasked"),
])
def test_federated_class_weights_refuse_what_exact_counts_would_break(overrides, says):
    assert_refused_in_one_line(overrides, says)
