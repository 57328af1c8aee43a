"""Personalised federated learning on the client (``fl.personal``): what stays local.

Each mode keeps part of a model in the client's own state between rounds (the
handlers put it in the Flower ``context.state``: :mod:`fedimg.clientapp.app`); only the
shared part of the update leaves the client.

* ``fedper``: FedPer (Arivazhagan et al. 2019, "Federated Learning with
  Personalization Layers"). Body and head train together from the global body and
  this client's own head; the head is kept and the reply carries the global head
  exactly as it was sent, which the server's update checks insist on (like frozen
  arrays), so its aggregate is the body's alone.
* ``fedrep``: FedRep (Collins et al. 2021, "Exploiting Shared Representations for
  Personalized Federated Learning"). First the head alone trains (the body frozen) for
  ``fl.fedrep_head_steps`` steps, then the body alone (the head frozen) for the round's
  steps; kept and replied as under FedPer. BatchNorm statistics follow the data in
  both phases, as in the authors' code.
* ``ditto``: Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through
  Personalization"). The global model trains as under FedAvg; the client also keeps a
  personal model v (the global one at its first round) and moves it each round by the
  round's steps on ``F_k(v) + lambda / 2 * ||v - w||^2``, w the global model received
  (``fl.ditto_lambda``); v never leaves the client.

The personalised model (global body with the kept head, or v) is what
:func:`personal_metrics` evaluates on the client's own validation split, reported as
``val/personal_*`` beside the global model's ``val/*``. In a natural split it also
scores it on the test rows of the client's own site (``test/personal/*``), beside
the global model's ``test/site/<name>/*``. Plain PyTorch; no flwr here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch

from fedimg.clientapp.environment import TaskEnvironment
from fedimg.training import evaluate
from fedimg.training.metrics import COUNT_PREFIX

Tensors = dict[str, torch.Tensor]
SITE_TEST_PREFIX = "test/personal/"  # the personal model on the client's own site's test rows
SITE_TEST_METRICS = ("accuracy", "balanced_accuracy", "auc")


def _copy(env: TaskEnvironment, keys: Iterable[str]) -> Tensors:
    state = env.model.state_dict()
    return {k: state[k].detach().to("cpu", copy=True) for k in keys}


@contextmanager
def _frozen(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Those parameters untrained while open (``requires_grad`` off), restored after."""
    switched = [p for p in params if p.requires_grad]
    for p in switched:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in switched:
            p.requires_grad_(True)


class PersonalRound:
    """One training round's personal part, around the global round's own training.

    ``with PersonalRound(...) as personal:`` the global model trains; entering runs the
    personal part that comes first, leaving undoes any freezing (also on an error) and
    sets :attr:`kept`, what the client keeps (its head, or v; None with
    ``fl.personal=none``), leaving the shared model holding what is sent.
    """

    def __init__(self, env: TaskEnvironment, partition_id: int, *, kept: Tensors | None,
                 start: Mapping[str, torch.Tensor], server_round: int) -> None:
        self.env, self.pid, self.start, self.round = env, partition_id, start, server_round
        self.mode = env.cfg.fl.personal
        self.kept: Tensors | None = kept if self.mode != "none" else None
        self._stack = ExitStack()

    def __enter__(self) -> PersonalRound:
        """Ditto: the personal step, then the global weights back. FedPer / FedRep: this
        client's head over the global one; FedRep: the head phase, then the head frozen."""
        env = self.env
        if self.mode == "none":
            return self
        env.trunk_cache, env.frozen_keys  # noqa: B018 (split before anything is frozen)
        if self.mode == "ditto":
            self.kept = ditto_step(env, self.pid, personal=self.kept or self.start,
                                   global_state=self.start, server_round=self.round)
            env.load_state(self.start)
            return self
        if self.kept:
            env.model.load_state_dict(self.kept, strict=False)
        if self.mode == "fedrep":
            heads = env.head_keys
            head_phase(env, self.pid, server_round=self.round, heads=heads)
            self._stack.enter_context(
                _frozen(p for n, p in env.model.named_parameters() if n in heads))
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._stack.close()
        if kind is None and self.mode in ("fedper", "fedrep"):  # keep the trained head,
            heads = self.env.head_keys  # send the global one back as it came
            self.kept = _copy(self.env, heads)
            self.env.model.load_state_dict({k: self.start[k] for k in heads}, strict=False)


def head_phase(env: TaskEnvironment, partition_id: int, *, server_round: int,
               heads: frozenset[str]) -> dict[str, float]:
    """FedRep's first phase: the head trains, every other parameter frozen."""
    steps = env.cfg.fl.fedrep_head_steps or env.local_steps(partition_id)
    with _frozen(p for n, p in env.model.named_parameters() if n not in heads):
        metrics, _ = env.train(partition_id, server_round=server_round, steps=steps)
    return metrics


def ditto_step(env: TaskEnvironment, partition_id: int, *, personal: Mapping[str, torch.Tensor],
               global_state: Mapping[str, torch.Tensor], server_round: int) -> Tensors:
    """Ditto's personal update: v trains on ``F_k(v) + lambda/2 ||v - w||^2``; returns v.

    Leaves v loaded in the shared model (the caller reloads the global one).
    """
    env.load_state(personal)
    env.train(partition_id, server_round=server_round, proximal_mu=env.cfg.fl.ditto_lambda,
              proximal_anchor=global_state)
    return _copy(env, env.model.state_dict())


def personal_metrics(env: TaskEnvironment, partition_id: int, *, kept: Tensors | None
                     ) -> dict[str, float]:
    """``val/personal_*``: the personalised model on this client's validation split.

    FedPer / FedRep: the loaded global body with the kept head; Ditto: v. A client that
    has not trained yet has nothing kept: its personalised model is the global one.
    """
    if kept:
        env.model.load_state_dict(kept, strict=env.cfg.fl.personal == "ditto")
    metrics, _ = env.evaluate_client(partition_id)
    out = {f"val/personal_{k.split('/', 1)[1]}": v for k, v in metrics.items()
           if f"/{COUNT_PREFIX}" not in k}
    own_test = env.site_test(partition_id)
    if own_test is not None:  # a natural split: also the site's own test rows
        tested = evaluate(env.model, own_test, device=env.device, num_classes=env.num_classes,
                          amp=env.cfg.train.amp)
        out.update({f"{SITE_TEST_PREFIX}{k}": float(tested[k]) for k in SITE_TEST_METRICS})
    return out
