"""Rewrite a network so that its forward pass runs no in-place operation.

Why: Opacus computes per-sample gradients (``grad_sample_mode="hooks"``, and also
``"functorch"`` and ``"ghost"``) from full backward hooks on every trainable
layer. Such a hook turns the layer's inputs and outputs into views that must not
be modified in place, so stock torchvision MobileNetV3, EfficientNet, DenseNet
(and ResNet with trainable BatchNorm) fail with "Output 0 of BackwardHookFunction
is a view and is being modified inplace" (upstream issue meta-pytorch/opacus#828).
``ModuleValidator.fix()`` does not help.

:func:`make_inplace_free` fixes it in two steps, without copying any weight:

1. every ``inplace`` flag of a submodule (ReLU, ReLU6, Hardswish, SiLU, Dropout,
   ...) is switched off;
2. the forward code is traced with :mod:`torch.fx` and every in-place call
   (``out += identity``, ``x.add_(y)``, ``torch.relu_(x)``,
   ``F.relu(x, inplace=True)``) becomes its out-of-place twin; later uses of
   the mutated tensor read the new result, as they would have read the mutation.

Leaf modules are kept whole: torch.nn layers, FrozenBatchNorm2d, StochasticDepth
(so ``model.eval()`` still switches it off) and any module fx cannot trace on
its own (e.g. a padding layer that branches on the input size; its own code is
kept as written). A network with nothing to rewrite is returned as it is.

Limits: forward code that reads ``self.training`` outside leaf modules, or
updates a buffer in place, is refused with a :class:`~fedimg.errors.ModelError`
naming the fix; a view taken before an in-place call would no longer see it.

Example::

    model = build_model("resnet18", num_classes=3, transfer=TransferConfig(bn="frozen"))
    dp_model = make_inplace_free(model)  # shares every parameter with ``model``
"""

from __future__ import annotations

import inspect
import logging
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import FrozenBatchNorm2d

from fedimg.errors import ModelError

logger = logging.getLogger(__name__)

LEAF_MODULES: tuple[type[nn.Module], ...] = (FrozenBatchNorm2d, StochasticDepth)
"""Modules never traced into, besides torch.nn's own layers."""

INPLACE_OPERATORS: dict[Callable[..., Any], Callable[..., Any]] = {
    operator.iadd: operator.add, operator.isub: operator.sub,
    operator.imul: operator.mul, operator.itruediv: operator.truediv,
    operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.imatmul: operator.matmul,
    operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift,
    operator.irshift: operator.rshift,
}
"""Augmented assignments (``a += b``) and the binary operators that replace them."""


class _InplaceProxy(fx.Proxy):
    """An fx Proxy that records ``a += b`` as ``operator.iadd`` instead of ``a + b``.

    A plain Proxy has no ``__iadd__``, so Python would silently trace ``a + b``
    and hide the mutation of ``a``.
    """


def _augmented(op: Callable[..., Any]) -> Callable[[fx.Proxy, Any], fx.Proxy]:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _op in INPLACE_OPERATORS:
    setattr(_InplaceProxy, f"__{_op.__name__}__", _augmented(_op))


class _Tracer(fx.Tracer):
    """Tracer with extra leaf modules, whose proxies record augmented assignments."""

    def __init__(self, *, leaf_types: tuple[type[nn.Module], ...] = LEAF_MODULES,
                 leaves: Iterable[nn.Module] = (), root: nn.Module | None = None) -> None:
        # defaults: GraphModule's unpickler re-creates the tracer without arguments
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_ids = {id(m) for m in leaves}
        self.only_root = root  # when set, every module but this one is a leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.only_root is not None:
            return m is not self.only_root
        return (isinstance(m, self.leaf_types) or id(m) in self.leaf_ids
                or super().is_leaf_module(m, module_qualified_name))

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InplaceProxy(node, self)


def make_inplace_free(
    model: nn.Module, *, leaf_modules: tuple[type[nn.Module], ...] = ()
) -> nn.Module:
    """``model`` computing the same function with no in-place operation.

    The result shares every parameter and buffer (same objects, same
    ``requires_grad``, same state-dict keys) with ``model``: a state dict loaded
    into one is seen by both. ``model``'s own ``inplace`` flags are switched off
    (that changes no output). When the forward code has no in-place call left,
    ``model`` itself is returned; otherwise an ``fx.GraphModule`` is, so apply
    :func:`~fedimg.models.transfer.apply_transfer` before this, not after.
    ``leaf_modules`` are extra module types to keep whole (never traced into).
    """
    leaf_types = LEAF_MODULES + tuple(leaf_modules)
    switched = disable_inplace_flags(model)
    graph, leaves = _trace_model(model, leaf_types)
    if not any(_is_inplace(node) for node in graph.nodes):
        logger.debug("%s: %d inplace flags off, forward code already out-of-place",
                     type(model).__name__, switched)
        return model
    _check_mode_independent(model, graph, leaf_types, leaves)
    rewritten = [_rewrite_node(graph, node) for node in list(graph.nodes)]
    graph.lint()
    free = fx.GraphModule(model, graph, class_name=f"{type(model).__name__}InplaceFree")
    free.train(model.training)
    _check_same_state(model, free)
    logger.info("%s: %d inplace flags off, %d in-place calls rewritten",
                type(model).__name__, switched, sum(rewritten))
    return free


def inplace_ops(
    model: nn.Module, *, leaf_modules: tuple[type[nn.Module], ...] = ()
) -> list[str]:
    """Every in-place operation of ``model``'s forward pass that fx can see.

    One entry per submodule with ``inplace=True`` (``"layer1.0.relu: inplace=True"``)
    and per in-place call in the traced forward code (``"add_1: operator.iadd"``).
    An empty list means Opacus' backward hooks will not trip over in-place ops.
    """
    flags = [f"{name}: inplace=True" for name, module in model.named_modules()
             if getattr(module, "inplace", False) is True]
    graph, _ = _trace_model(model, LEAF_MODULES + tuple(leaf_modules))
    calls = [f"{node.name}: {_describe(node)}" for node in graph.nodes if _is_inplace(node)]
    return flags + calls


def disable_inplace_flags(model: nn.Module) -> int:
    """Set every submodule's boolean ``inplace`` attribute to False; return how many were on."""
    count = 0
    for module in model.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
            count += 1
    return count


def _trace_model(model: nn.Module,
                 leaf_types: tuple[type[nn.Module], ...]) -> tuple[fx.Graph, list[nn.Module]]:
    """The fx graph of ``model``, with modules fx cannot trace kept as leaves."""
    leaves = _untraceable(model, leaf_types)
    try:
        graph = _Tracer(leaf_types=leaf_types, leaves=leaves).trace(model)
    except Exception as exc:  # fx raises many types; name the model and the way out
        raise ModelError(
            f"torch.fx cannot trace {type(model).__name__} ({exc}); fix: pass the "
            f"offending module type in leaf_modules=(...) to keep it whole"
        ) from exc
    return graph, leaves


def _untraceable(model: nn.Module, leaf_types: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """Submodules whose own forward fx cannot trace (children treated as leaves).

    They become leaves of the model's trace, so their own forward code is kept
    as written: fx cannot see (nor rewrite) an in-place call inside it.
    """
    builtin = _Tracer(leaf_types=leaf_types)
    found: list[nn.Module] = []
    for name, module in model.named_modules():
        if name == "" or builtin.is_leaf_module(module, name):
            continue
        try:
            _Tracer(leaf_types=leaf_types, root=module).trace(module)
        except Exception as exc:  # control flow on tensor values/shapes, etc.
            logger.debug("%s (%s) is kept whole: fx cannot trace it (%s)",
                         name, type(module).__name__, exc)
            found.append(module)
    return found


def _is_inplace(node: fx.Node) -> bool:
    """Whether ``node`` is an augmented assignment, a ``*_`` call or passes inplace=True."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target in INPLACE_OPERATORS or _passes_inplace_true(node):
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def _passes_inplace_true(node: fx.Node) -> bool:
    """Whether the call passes ``inplace=True``, by keyword or by position."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op != "call_function":
        return False
    target: Callable[..., Any] = node.target  # type: ignore[assignment]
    try:
        bound = inspect.signature(target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return bound.arguments.get("inplace") is True


def _rewrite_node(graph: fx.Graph, node: fx.Node) -> bool:
    """Make ``node`` out-of-place if it is in-place; return whether it was."""
    if not _is_inplace(node):
        return False
    mutated = node.args[0] if node.args else None
    if isinstance(mutated, fx.Node) and mutated.op == "get_attr":
        raise ModelError(
            f"{_describe(node)} updates the attribute '{mutated.target}' in place, a state "
            f"change that cannot be made out-of-place; fix: keep its module whole with "
            f"leaf_modules=(...)"
        )
    if node.op == "call_function" and node.target in INPLACE_OPERATORS:
        node.target = INPLACE_OPERATORS[node.target]
    elif _passes_inplace_true(node):
        _set_inplace_false(node)
    elif node.op == "call_method":
        node.target = _out_of_place_method(node)
    else:
        node.target = _out_of_place_function(node)
    if isinstance(mutated, fx.Node):
        _redirect_later_uses(graph, mutated, node)
    return True


def _set_inplace_false(node: fx.Node) -> None:
    if "inplace" in node.kwargs:
        node.kwargs = {**node.kwargs, "inplace": False}
        return
    target: Callable[..., Any] = node.target  # type: ignore[assignment]
    bound = inspect.signature(target).bind(*node.args, **node.kwargs)
    bound.arguments["inplace"] = False
    node.args, node.kwargs = bound.args, bound.kwargs


def _out_of_place_method(node: fx.Node) -> str:
    name = str(node.target)[:-1]
    if not callable(getattr(torch.Tensor, name, None)):  # e.g. zero_, copy_, requires_grad_
        raise ModelError(
            f"Tensor.{node.target} has no out-of-place twin Tensor.{name}; fix: keep its "
            f"module whole with leaf_modules=(...) or rewrite it out-of-place"
        )
    return name


def _out_of_place_function(node: fx.Node) -> Callable[..., Any]:
    name = getattr(node.target, "__name__", str(node.target))[:-1]
    for namespace in (torch, torch.nn.functional):
        twin = getattr(namespace, name, None)
        if callable(twin):
            return twin
    raise ModelError(
        f"{_describe(node)} has no out-of-place twin torch.{name}; fix: keep its "
        f"module whole with leaf_modules=(...) or rewrite it out-of-place"
    )


def _redirect_later_uses(graph: fx.Graph, mutated: fx.Node, result: fx.Node) -> None:
    """Uses of ``mutated`` after ``result`` read ``result`` (what they saw mutated)."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    for user in list(mutated.users):
        if user is not result and order[user] > order[result]:
            user.replace_input_with(mutated, result)


def _describe(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.target in INPLACE_OPERATORS:
        return f"operator.{node.target.__name__}"  # type: ignore[union-attr]
    module = getattr(node.target, "__module__", None) or "torch"
    return f"{module}.{getattr(node.target, '__name__', node.target)}"


def _check_mode_independent(model: nn.Module, graph: fx.Graph,
                            leaf_types: tuple[type[nn.Module], ...],
                            leaves: list[nn.Module]) -> None:
    """Refuse forward code that reads ``self.training`` outside leaf modules.

    fx bakes the value seen while tracing into the graph, so such a graph would
    ignore ``model.eval()``: trace again in the other mode and compare the code.
    """
    modes = {module: module.training for module in model.modules()}
    try:
        model.train(not model.training)
        other = _Tracer(leaf_types=leaf_types, leaves=leaves).trace(model)
    finally:
        for module, mode in modes.items():
            module.training = mode
    if other.python_code("self").src != graph.python_code("self").src:
        raise ModelError(
            f"the forward code of {type(model).__name__} depends on train/eval mode "
            f"(it reads self.training), which a traced graph would freeze; fix: pass "
            f"that module's type in leaf_modules=(...) to keep it whole"
        )


def _check_same_state(model: nn.Module, free: nn.Module) -> None:
    """The rewrite must keep the state-dict keys, so federated weights load strictly."""
    before, after = set(model.state_dict()), set(free.state_dict())
    if before != after:
        raise ModelError(
            f"the rewritten {type(model).__name__} changed its state-dict keys "
            f"(missing {sorted(before - after)[:5]}, new {sorted(after - before)[:5]}): "
            f"modules unused by forward() are dropped by torch.fx; fix: remove them "
            f"from the model, or keep their parent whole with leaf_modules=(...)"
        )
