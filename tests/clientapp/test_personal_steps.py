"""FedRep's two phases and Ditto's personal step, by hand on tiny models.

A stand-in environment runs :func:`fedimg.training.train_local` (plain SGD, lr 1, no
momentum, one step on one sample), so that every number below follows from the
cross-entropy gradient p - onehot.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from fedimg.clientapp.personal import PersonalRound, ditto_step
from fedimg.config import FederationConfig, TrainConfig
from fedimg.training import train_local

SGD = TrainConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0, local_steps=1,
                  amp=False, channels_last=False)
SAMPLE = [(torch.tensor([[1.0]]), torch.tensor([0]))]  # x = 1, label 0


class _Env(SimpleNamespace):
    """What PersonalRound and ditto_step use of a TaskEnvironment, on ``model``."""

    def __init__(self, model: nn.Module, **fl: object) -> None:
        super().__init__(model=model, cfg=SimpleNamespace(fl=FederationConfig(**fl)),
                         trunk_cache=None, frozen_keys=frozenset(), head_keys={"1.weight"})

    def local_steps(self, partition_id: int) -> int:
        return 1

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)

    def train(self, partition_id: int, *, server_round: int, steps: int | None = None,
              proximal_mu: float = 0.0, proximal_anchor: dict | None = None
              ) -> tuple[dict[str, float], int]:
        anchors = [(p, proximal_anchor[n]) for n, p in self.model.named_parameters()
                   if proximal_anchor and p.requires_grad]
        train_local(self.model, SAMPLE, cfg=SGD, lr=1.0, device=torch.device("cpu"),
                    proximal_mu=proximal_mu, proximal_anchors=anchors)
        return {}, 1


def _body_and_head() -> nn.Sequential:
    """logits = [h0 * b * x, h1 * b * x]: body b = 1, head h = [0, 0]."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 2, bias=False))
    nn.init.ones_(model[0].weight)
    nn.init.zeros_(model[1].weight)
    return model


def test_fedrep_trains_the_head_with_the_body_frozen_then_the_body_alone() -> None:
    # Arrange
    model = _body_and_head()
    env = _Env(model, personal="fedrep", fedrep_head_steps=1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # Act
    with PersonalRound(env, 0, kept=None, start=start, server_round=1) as personal:
        after_head = {k: v.clone() for k, v in model.state_dict().items()}
        env.train(0, server_round=1)  # the round's own training: the body phase
        after_body = {k: v.clone() for k, v in model.state_dict().items()}
    # Assert. Head phase: logits [0, 0], p = [.5, .5], dCE/dh = (p - e0) b x =
    # [-.5, .5], so h = [.5, -.5]; the body is untouched (b = 1).
    torch.testing.assert_close(after_head["1.weight"], torch.tensor([[0.5], [-0.5]]))
    assert torch.equal(after_head["0.weight"], start["0.weight"])
    # Body phase: logits [.5, -.5], p0 = sigmoid(1); dCE/db = (p0 - 1) * .5 +
    # (1 - p0) * (-.5) = p0 - 1, so b = 1 + (1 - p0) = 2 - sigmoid(1); h untouched.
    p0 = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(after_body["0.weight"], torch.tensor([[2 - p0]]))
    assert torch.equal(after_body["1.weight"], after_head["1.weight"])
    # The client keeps the trained head; the model (what is sent) holds the global head,
    # and every parameter trains again afterwards.
    torch.testing.assert_close(personal.kept["1.weight"], torch.tensor([[0.5], [-0.5]]))
    assert torch.equal(model[1].weight.detach(), start["1.weight"])
    assert all(p.requires_grad for p in model.parameters())


class _OneParameter(nn.Module):
    """logits = [v x, 0]: for label 0, CE = log(1 + e^(-v x)), dCE/dv = -sigmoid(-v) x."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.v * x, torch.zeros_like(x)], dim=1)


def test_dittos_personal_step_adds_lambda_times_the_distance_to_the_global_model() -> None:
    # Arrange: v = 0, the global model w = 1, lambda = 1
    env = _Env(_OneParameter(), personal="ditto", ditto_lambda=1.0)
    # Act
    kept = ditto_step(env, 0, personal={"v": torch.tensor(0.0)},
                      global_state={"v": torch.tensor(1.0)}, server_round=1)
    # Assert: v = 0 - 1 * (dCE/dv + lambda (v - w)) = 0 - (-.5 + 1 * (0 - 1)) = 1.5
    torch.testing.assert_close(kept["v"], torch.tensor(1.5))


def test_ditto_with_lambda_zero_is_local_training() -> None:
    env = _Env(_OneParameter(), personal="ditto", ditto_lambda=0.0)
    kept = ditto_step(env, 0, personal={"v": torch.tensor(0.0)},
                      global_state={"v": torch.tensor(1.0)}, server_round=1)
    torch.testing.assert_close(kept["v"], torch.tensor(0.5))  # 0 - (-.5): no pull


def test_a_ditto_round_trains_v_from_its_own_weights_and_leaves_w_loaded() -> None:
    # Arrange: v kept from an earlier round (2), the global model w = 1 just received
    model = _OneParameter()
    env = _Env(model, personal="ditto", ditto_lambda=1.0)
    start = {"v": torch.tensor(1.0)}
    model.load_state_dict(start)
    # Act
    with PersonalRound(env, 0, kept={"v": torch.tensor(2.0)}, start=start,
                       server_round=1) as personal:
        loaded = model.v.detach().clone()
    # Assert: v = 2 - (-sigmoid(-2) + 1 * (2 - 1)) = 1 + sigmoid(-2); w is loaded for
    # the global round's own training
    torch.testing.assert_close(personal.kept["v"], torch.tensor(1 + 1 / (1 + math.exp(2))))
    assert loaded.item() == 1.0
