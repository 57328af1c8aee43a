"""make_inplace_free: same function, same weights, no in-place op left (Opacus #828)."""

from __future__ import annotations

import copy
import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import StochasticDepth

from fedimg.config import TransferConfig
from fedimg.errors import ModelError
from fedimg.models import (
    MODELS,
    apply_transfer,
    build_model,
    inplace_ops,
    list_models,
    make_inplace_free,
)
from fedimg.models.efficientnet_lite import SamePad2d
from fedimg.models.inplace import INPLACE_OPERATORS

FAMILIES = list_models()


def _zoo_model(name: str, bn: str, *, seed: int = 0) -> nn.Module:
    """Random weights with BatchNorm statistics of real activations, then ``bn`` applied.

    With the initial statistics (mean 0, variance 1) the outputs of the random
    EfficientNets and MobileNets do not depend on the input at all, so comparing
    them would prove nothing; pretrained statistics would avoid that too.
    """
    torch.manual_seed(seed)
    model = build_model(name, num_classes=3, weights="none").train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None  # cumulative average: the statistics of the one batch below
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))
    for norm in norms:
        norm.momentum = 0.1
    spec = MODELS.get(name)
    return apply_transfer(model, blocks=spec.blocks(model), head=spec.get_head(model),
                          transfer=TransferConfig(mode="full", bn=bn))


def _graph_inplace_calls(graph: fx.Graph) -> list[str]:
    """In-place calls in an fx graph, checked independently of the module under test."""
    found = []
    for node in graph.nodes:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.op in ("call_function", "call_method") and (
            node.target in INPLACE_OPERATORS or node.kwargs.get("inplace") is True
            or (isinstance(name, str) and name.endswith("_") and not name.startswith("_"))
        ):
            found.append(node.format_node())
    return found


@pytest.mark.parametrize("bn", ["frozen", "train"])
@pytest.mark.parametrize("name", FAMILIES)
def test_rewrite_keeps_function_weights_and_removes_inplace_ops(name: str, bn: str) -> None:
    # Arrange: an untouched deep copy to compare against
    model = _zoo_model(name, bn)
    original = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 32, 32)

    # Act
    free = make_inplace_free(model).eval()

    # Assert: same outputs (which differ between the two images), same shared
    # weights, nothing in place
    with torch.no_grad():
        expected = original(x)
        torch.testing.assert_close(free(x), expected, rtol=0, atol=1e-5)
    assert float((expected[0] - expected[1]).abs().max()) > 1e-3
    assert list(free.state_dict()) == list(original.state_dict())
    shared = model.state_dict(keep_vars=True)
    assert all(v is shared[k] for k, v in free.state_dict(keep_vars=True).items())
    assert ([(k, p.requires_grad) for k, p in free.named_parameters()]
            == [(k, p.requires_grad) for k, p in original.named_parameters()])
    assert not [n for n, m in free.named_modules() if getattr(m, "inplace", False)]
    assert inplace_ops(free) == []
    if MODELS.get(name).inplace_free:
        assert free is model
    else:
        assert isinstance(free, fx.GraphModule)
        assert _graph_inplace_calls(free.graph) == []


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small", "densenet121"])
def test_train_mode_randomness_is_unchanged(name: str) -> None:
    # Arrange: dropout and stochastic depth draw the same masks for the same seed
    model = _zoo_model(name, "frozen").train()
    original = copy.deepcopy(model)
    free = make_inplace_free(model).train()
    x = torch.randn(2, 3, 32, 32)

    # Act
    torch.manual_seed(5)
    expected = original(x)
    torch.manual_seed(5)
    actual = free(x)

    # Assert
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_full_backward_hooks_work_after_rewrite(name: str) -> None:
    # Arrange: the hooks Opacus puts on every trainable layer; BatchNorm trains too
    model = make_inplace_free(_zoo_model(name, "train").train())
    for module in model.modules():
        if list(module.parameters(recurse=False)):
            module.register_full_backward_hook(lambda *_: None)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)

    # Act: stock torchvision models raise "... is a view and is being modified inplace"
    model(x).sum().backward()

    # Assert
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_resnet18_inplace_ops_are_counted_and_all_removed() -> None:
    # Arrange: ReLU(inplace=True) in the stem and in each of the 8 BasicBlocks,
    # plus one `out += identity` per block
    model = build_model("resnet18", num_classes=3, weights="none")

    # Act
    before = inplace_ops(model)
    free = make_inplace_free(model)

    # Assert
    assert sum(op.endswith("inplace=True") for op in before) == 9
    assert sum(op.endswith("operator.iadd") for op in before) == 8
    assert len(before) == 17
    assert inplace_ops(free) == []
    adds = [n for n in free.graph.nodes if n.target is operator.add]
    assert len(adds) == 8  # the residual additions, now out-of-place


def test_densenet_functional_relu_inplace_is_rewritten() -> None:
    # Arrange: DenseNet.forward calls F.relu(features, inplace=True) before pooling
    model = build_model("densenet121", num_classes=3, weights="none")

    # Act
    before = [op for op in inplace_ops(model) if "inplace=True" not in op]
    free = make_inplace_free(model)

    # Assert
    assert before == ["relu: torch.nn.functional.relu"]
    relus = [n for n in free.graph.nodes if n.target is F.relu]
    assert len(relus) == 1 and relus[0].kwargs["inplace"] is False


def test_efficientnet_b0_stochastic_depth_stays_a_leaf_that_eval_disables() -> None:
    # Arrange: 16 MBConv blocks; the 9 that keep their shape add a residual
    # through StochasticDepth(p > 0)
    free = make_inplace_free(_zoo_model("efficientnet_b0", "frozen"))
    depth = [m for m in free.modules() if isinstance(m, StochasticDepth)]
    calls = [n for n in free.graph.nodes
             if n.op == "call_module" and isinstance(free.get_submodule(n.target), StochasticDepth)]
    identity: list[bool] = []
    for module in depth:
        module.register_forward_hook(lambda m, inp, out: identity.append(out is inp[0]))
    x = torch.randn(2, 3, 32, 32)

    # Act
    free.eval()
    free(x)
    in_eval = list(identity)
    identity.clear()
    free.train()
    free(x)

    # Assert: identity in eval, random row drops in train
    assert len(calls) == 9 and len(depth) == 9 and all(m.p > 0 for m in depth)
    assert in_eval == [True] * 9
    assert identity == [False] * 9


def test_frozen_batchnorm_stays_a_leaf() -> None:
    # Arrange: resnet18 has 20 BatchNorm layers (stem, 2 per block, 3 downsamples)
    free = make_inplace_free(_zoo_model("resnet18", "frozen"))

    # Act
    targets = [type(free.get_submodule(n.target)).__name__
               for n in free.graph.nodes if n.op == "call_module"]

    # Assert
    assert targets.count("FrozenBatchNorm2d") == 20


def test_federated_state_dict_loads_strictly_into_both_versions() -> None:
    # Arrange: a "global" model from another seed
    model = _zoo_model("mobilenet_v3_small", "frozen")
    free = make_inplace_free(model).eval()
    other = _zoo_model("mobilenet_v3_small", "frozen", seed=9).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = free(x)

    # Act: load into the rewritten model only
    free.load_state_dict(other.state_dict(), strict=True)

    # Assert: both versions now compute the global model
    with torch.no_grad():
        expected = other(x)
        assert float((before - expected).abs().max()) > 1e-3
        torch.testing.assert_close(free(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=1e-5)


class _MethodsInPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        alias = y
        y.add_(1)  # statement whose result is discarded: `alias` must see it
        torch.relu_(y)
        z = F.hardtanh(alias - 2, -1.0, 1.0, True)  # inplace passed by position
        z *= 3
        return alias + z


def test_inplace_methods_functions_and_aliases_are_rewritten() -> None:
    # Arrange: x = [-1, 0, 1]: y = relu(2x + 1) = [0, 1, 3]; z = 3 * clamp(y - 2) = [-3, -3, 3]
    module = _MethodsInPlace()
    x = torch.tensor([-1.0, 0.0, 1.0])

    # Act
    free = make_inplace_free(module)
    out = free(x)

    # Assert
    assert torch.equal(out, torch.tensor([-3.0, -2.0, 6.0]))
    assert torch.equal(module(x.clone()), out)
    assert len(inplace_ops(module)) == 4
    assert _graph_inplace_calls(free.graph) == []


def test_flag_only_model_is_returned_itself_with_flags_off() -> None:
    # Arrange
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Dropout(0.5, inplace=True))

    # Act
    free = make_inplace_free(model)

    # Assert
    assert free is model
    assert (model[1].inplace, model[2].inplace) == (False, False)


class _PaddedResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pad = SamePad2d(3, 1)  # branches on the input size: fx cannot trace it
        self.conv = nn.Conv2d(2, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(self.pad(x))
        out += x
        return out


def test_untraceable_submodule_is_kept_whole() -> None:
    # Arrange
    torch.manual_seed(0)
    module = _PaddedResidual()
    x = torch.randn(1, 2, 5, 5)

    # Act
    free = make_inplace_free(module)

    # Assert
    called = [n.target for n in free.graph.nodes if n.op == "call_module"]
    assert called == ["pad", "conv"]
    torch.testing.assert_close(free(x), module(x), rtol=0, atol=1e-6)
    assert _graph_inplace_calls(free.graph) == []


class _RunningMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mean.mul_(0.9).add_(0.1 * x.mean())  # a state update, not a computation
        return x


class _ModeDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1
        x += 1
        return F.dropout(x, 0.5, self.training)


class _UnusedChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(2, 2)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.used(x)
        out += x
        return out


@pytest.mark.parametrize(("module", "message"), [
    (_RunningMean(), "Tensor.add_ updates the attribute 'mean' in place"),
    (_ModeDependent(), "depends on train/eval mode"),
    (_UnusedChild(), r"changed its state-dict keys \(missing \['unused.bias', 'unused.weight'\]"),
])
def test_unsafe_rewrites_are_refused_with_the_fix(module: nn.Module, message: str) -> None:
    # Act / Assert
    with pytest.raises(ModelError, match=message) as info:
        make_inplace_free(module)
    assert "fix:" in str(info.value)


def test_rewritten_model_survives_deepcopy_and_torch_save(tmp_path: Path) -> None:
    # Arrange
    free = make_inplace_free(_zoo_model("resnet18", "frozen")).eval()
    x = torch.randn(1, 3, 32, 32)

    # Act
    torch.save(free, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False).eval()
    copied = copy.deepcopy(free)

    # Assert
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), free(x), rtol=0, atol=0)
        torch.testing.assert_close(copied(x), free(x), rtol=0, atol=0)
    assert list(loaded.state_dict()) == list(free.state_dict())
