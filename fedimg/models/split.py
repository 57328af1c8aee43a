"""Split a partly frozen network into its frozen trunk and its trainable tail.

With ``transfer.mode=head`` or ``last_k`` the first part of the network holds no
trainable parameter and only frozen BatchNorm, so its output is a function of the
input image alone: it can be computed once per image and cached
(:mod:`fedimg.training.feature_cache`), and training runs the tail on the cached
features. :func:`split_model` finds that part for any traceable network, from the
model's :mod:`torch.fx` graph (traced like :func:`~fedimg.models.make_inplace_free`,
with untraceable modules kept whole):

* a node belongs to the **tail** if it calls a module that owns a trainable
  parameter, reads a trainable parameter, or uses the value of a tail node;
  every other node belongs to the **trunk**;
* the **boundary** is the one trunk value the tail reads (frozen constants read by
  the tail are read again there, not cached); a dropout or stochastic-depth layer
  at the boundary moves into the tail, so it keeps drawing fresh noise per step, and
  where the tail reads several trunk values (DenseNet's concatenations) the latest
  joins the tail until one is left;
* ``trunk`` and ``tail`` are ``fx.GraphModule`` objects that share every module,
  parameter and buffer with the model: weights loaded into the model are theirs.

A split is checked before it is returned: ``tail(trunk(x))`` must reproduce the
model on a probe batch in eval mode. It is **exact** when the trunk also computes
the same in train mode; a trunk holding dropout, stochastic depth (EfficientNet's
``drop_connect``) or a train-mode BatchNorm is not (:attr:`ModelSplit.stochastic`
names them): cached features are the eval-mode trunk's. A network that cannot be
split raises :class:`SplitRefused` with a one-line reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from fedimg.errors import ModelError
from fedimg.models.inplace import LEAF_MODULES, _trace_model

logger = logging.getLogger(__name__)

_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      torch.dropout)


class SplitRefused(ModelError):
    """The network has no frozen trunk that can be cached; the message says why."""


@dataclass(frozen=True)
class ModelSplit:
    """A model as ``tail(trunk(x))``; both parts share the model's parameters and buffers."""

    trunk: fx.GraphModule  # image (B, 3, S, S) -> features (B, ...); nothing trainable
    tail: fx.GraphModule  # features -> logits (B, K); every trainable parameter
    boundary: str  # the graph node whose value is cached
    stochastic: tuple[str, ...]  # trunk modules that compute differently in train mode

    @property
    def exact(self) -> bool:
        """Whether the trunk computes the same in train and eval mode (cache = no cache)."""
        return not self.stochastic

    def trunk_state(self) -> dict[str, torch.Tensor]:
        """The trunk's parameters and buffers under the model's state-dict keys."""
        return dict(self.trunk.state_dict(keep_vars=True))


def split_model(model: nn.Module, *, probe: torch.Tensor) -> ModelSplit:
    """``model`` cut after its frozen trunk; ``probe`` (B >= 2, 3, S, S) checks the cut.

    Raises :class:`SplitRefused` (one line: why, and what still works) when nothing
    is frozen, the trunk feeds the tail through several tensors, fx cannot trace the
    model, or the two parts do not reproduce it.
    """
    name = type(model).__name__
    try:
        graph, _ = _trace_model(model, LEAF_MODULES)
    except ModelError as exc:
        raise SplitRefused(f"{name} cannot be split: {exc}") from None
    tail_nodes = _tail_nodes(model, graph)
    boundary = _boundary(model, graph, tail_nodes)
    trunk = fx.GraphModule(model, _trunk_graph(graph, boundary), class_name=f"{name}Trunk")
    if not trunk.state_dict():
        raise SplitRefused(f"{name} has no frozen weights before its first trainable layer "
                           "(transfer.mode=full); use transfer.mode=head or last_k")
    tail = fx.GraphModule(model, _tail_graph(graph, tail_nodes, boundary),
                          class_name=f"{name}Tail")
    _check_split(model, trunk, tail, probe)
    stochastic = _stochastic(model, graph, tail_nodes) or _train_mode_differs(trunk, probe)
    logger.debug("%s split at %s: %d trunk, %d tail nodes; %s", name, boundary.name,
                 len(trunk.graph.nodes), len(tail.graph.nodes),
                 f"random in train mode: {', '.join(stochastic)}" if stochastic else "exact")
    return ModelSplit(trunk=trunk, tail=tail, boundary=boundary.name, stochastic=stochastic)


# --- which node goes where ------------------------------------------------------------


def _owns_trainable(model: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return any(p.requires_grad for p in model.get_submodule(str(node.target)).parameters())
    if node.op == "get_attr":
        value = _attr(model, str(node.target))
        return isinstance(value, nn.Parameter) and value.requires_grad
    return False


def _attr(model: nn.Module, target: str) -> object:
    owner, _, leaf = target.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, leaf)


def _tail_nodes(model: nn.Module, graph: fx.Graph) -> set[fx.Node]:
    """Nodes that need a trainable parameter, directly or through an input."""
    tail: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if _owns_trainable(model, node) or any(a in tail for a in node.all_input_nodes):
            tail.add(node)
    return tail


def _is_random(model: nn.Module, node: fx.Node) -> bool:
    """Whether ``node`` is a dropout or stochastic-depth call (noise in train mode)."""
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        return isinstance(module, (nn.modules.dropout._DropoutNd, StochasticDepth)) \
            and float(getattr(module, "p", 0.0)) > 0
    return node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS


def _frontier(graph: fx.Graph, tail: set[fx.Node]) -> list[fx.Node]:
    """Trunk values (not constants) that a tail node or the output reads."""
    seen: list[fx.Node] = []
    for node in graph.nodes:
        if node in tail or node.op == "output":
            for arg in node.all_input_nodes:
                if arg not in tail and arg.op != "get_attr" and arg not in seen:
                    seen.append(arg)
    return seen


def _boundary(model: nn.Module, graph: fx.Graph, tail: set[fx.Node]) -> fx.Node:
    """The single cached value; ``tail`` grows (in place) until there is one.

    A dropout or stochastic-depth layer at the boundary joins the tail (it keeps its
    fresh noise). With several boundary values (DenseNet's concatenations) the latest
    one joins the tail until one is left: their common frozen ancestor.
    """
    name, order = type(model).__name__, {n: i for i, n in enumerate(graph.nodes)}
    while True:
        frontier = _frontier(graph, tail)
        if any(n.op == "placeholder" for n in frontier) or not tail:
            raise SplitRefused(f"{name} has no frozen trunk to cache: its first layer "
                               "trains (transfer.mode=full); use transfer.mode=head or last_k")
        random = [n for n in frontier if _is_random(model, n)]
        if random:
            tail.update(random)
        elif len(frontier) > 1:
            tail.add(max(frontier, key=order.__getitem__))
        else:
            break
    if sum(n.op == "placeholder" for n in graph.nodes) != 1:
        raise SplitRefused(f"{name} takes several inputs; the feature cache splits "
                           "single-input image models only")
    return frontier[0]


def _stochastic(model: nn.Module, graph: fx.Graph, tail: set[fx.Node]) -> tuple[str, ...]:
    """Names of trunk modules (or submodules of trunk leaves) that differ in train mode."""
    found: list[str] = []
    for node in graph.nodes:
        if node in tail or node.op not in ("call_module", "call_function"):
            continue
        if node.op == "call_function":
            if node.target in _DROPOUT_FUNCTIONS:
                found.append(node.name)
            continue
        module = model.get_submodule(str(node.target))
        for sub_name, sub in module.named_modules(prefix=str(node.target)):
            live_bn = isinstance(sub, nn.modules.batchnorm._BatchNorm)
            random = isinstance(sub, (nn.modules.dropout._DropoutNd, StochasticDepth)) \
                and float(getattr(sub, "p", 0.0)) > 0
            if (live_bn or random) and sub_name not in found:
                found.append(sub_name)
    return tuple(found)


# --- the two graphs -------------------------------------------------------------------


def _trunk_graph(graph: fx.Graph, boundary: fx.Node) -> fx.Graph:
    """Input -> ``boundary``: the boundary's ancestors, in the original order."""
    needed: set[fx.Node] = set()
    stack = [boundary]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    trunk, env = fx.Graph(), {}
    for node in graph.nodes:
        if node in needed:
            env[node] = trunk.node_copy(node, lambda n: env[n])
    trunk.output(env[boundary])
    trunk.lint()
    return trunk


def _tail_graph(graph: fx.Graph, tail: set[fx.Node], boundary: fx.Node) -> fx.Graph:
    """``boundary`` -> output: tail nodes, plus the frozen constants they read."""
    new, env = fx.Graph(), {}
    env[boundary] = new.placeholder("features")

    def arg(node: fx.Node) -> fx.Node:
        if node not in env:  # a constant (get_attr) of the trunk, read again here
            env[node] = new.node_copy(node, arg)
        return env[node]

    for node in graph.nodes:
        if node in tail or node.op == "output":
            env[node] = new.node_copy(node, arg)
    new.lint()
    return new


# --- the checks -----------------------------------------------------------------------


@contextmanager
def module_mode(*modules: nn.Module, training: bool) -> Iterator[None]:
    """Every submodule of ``modules`` in train (or eval) mode; each one's own mode after."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.train(training)
        yield
    finally:
        for m, was in saved:
            m.training = was


def _check_split(model: nn.Module, trunk: nn.Module, tail: nn.Module,
                 probe: torch.Tensor) -> None:
    """``tail(trunk(x)) == model(x)`` in eval mode, or :class:`SplitRefused`."""
    with torch.inference_mode(), module_mode(model, training=False):
        expected = model(probe)
        got = tail(trunk(probe))
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        diff = (got - expected).abs().max() if got.shape == expected.shape else "shape"
        raise SplitRefused(f"{type(model).__name__}: tail(trunk(x)) differs from the model "
                           f"(max |diff| {diff}); the forward code is not a pure graph")


def _train_mode_differs(trunk: nn.Module, probe: torch.Tensor) -> tuple[str, ...]:
    """``("forward code",)`` if the trunk (no known random layer) differs in train mode."""
    with torch.inference_mode():
        with module_mode(trunk, training=False):
            evaluated = trunk(probe)
        with module_mode(trunk, training=True):
            trained = trunk(probe)
    return () if torch.equal(evaluated, trained) else ("forward code in train mode",)
