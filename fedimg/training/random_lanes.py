"""Per-client random streams for training several clients at once, draw for draw.

Sequential local training (:func:`fedimg.training.loop.train_local`) starts each
client from ``torch.manual_seed(seed_i)`` and then draws, step after step, from the
global generator: first the loader (augmentation, a feature-cache view per sample),
then every random layer of the forward pass in call order (dropout, stochastic
depth: Srivastava et al. 2014, "Dropout", JMLR; Huang et al. 2016, "Deep Networks
with Stochastic Depth", ECCV). :mod:`fedimg.training.vectorized` runs the forward of
all clients in one ``torch.func.vmap`` call, where random ops are refused. To stay
equal to the sequential rounds it keeps one *lane* per client:

* :class:`Lanes` holds each client's generator state (CPU, and the CUDA device's
  when training there); a batch is fetched and that step's masks drawn inside the
  client's lane, so the client's draws come in its sequential order;
* :class:`RandomLayers` finds the random layers that a forward pass calls (a probe
  with forward pre-hooks), draws their noise exactly as the layer itself would
  (``empty(shape).bernoulli_(1 - p).div_(1 - p)`` for ``nn.Dropout`` on the CPU and
  for ``StochasticDepth``; the mask of ``torch.native_dropout`` for dropout on CUDA),
  and during the vmapped forward runs those layers in eval mode (identity) with a
  forward hook that multiplies the output by the pre-drawn noise.

Supported random layers: ``nn.Dropout`` and torchvision's ``StochasticDepth`` with
``0 <= p < 1``; :func:`unsupported_random_layers` names any other (``Dropout2d``,
``AlphaDropout``, ``p = 1``) so the caller can train sequentially instead. Random
ops called as functions in forward code are not seen here; ``vmap`` then raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from fedimg.training.device import autocast

_SUPPORTED = (nn.Dropout, StochasticDepth)


def _is_random(module: nn.Module) -> bool:
    """Whether ``module`` draws noise in train mode (a dropout or stochastic depth, p > 0)."""
    random = isinstance(module, (nn.modules.dropout._DropoutNd, StochasticDepth))
    return random and float(getattr(module, "p", 0.0)) > 0


def unsupported_random_layers(model: nn.Module) -> list[str]:
    """Names of random layers of ``model`` whose draws :class:`RandomLayers` cannot replay."""
    return [name for name, m in model.named_modules() if _is_random(m)
            and (type(m) not in _SUPPORTED or float(m.p) >= 1.0
                 or getattr(m, "mode", "row") not in ("row", "batch"))]


class Lanes:
    """One generator state per client: CPU, plus CUDA when ``device`` is a GPU."""

    def __init__(self, seeds: Sequence[int], *, device: torch.device) -> None:
        self._cuda = device if device.type == "cuda" else None
        self._states: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        with self.preserved():
            for seed in seeds:
                torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
                self._states.append(self._capture())

    def _capture(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self._cuda) if self._cuda is not None else None
        return torch.get_rng_state(), cuda

    @contextmanager
    def preserved(self) -> Iterator[None]:
        """The caller's global generator state, restored on exit."""
        saved = self._capture()
        try:
            yield
        finally:
            torch.set_rng_state(saved[0])
            if self._cuda is not None:
                torch.cuda.set_rng_state(saved[1], self._cuda)

    @contextmanager
    def lane(self, i: int) -> Iterator[None]:
        """Client ``i``'s generator state is the global one inside; kept on exit."""
        cpu, cuda = self._states[i]
        torch.set_rng_state(cpu)
        if self._cuda is not None:
            torch.cuda.set_rng_state(cuda, self._cuda)
        try:
            yield
        finally:
            self._states[i] = self._capture()


@dataclass(frozen=True)
class _Call:
    """One call of a random layer in a forward pass (per-sample input shape, dtype)."""

    name: str
    sample_shape: tuple[int, ...]  # input shape without the batch dimension
    dtype: torch.dtype


@dataclass
class RandomLayers:
    """The random layers a forward pass calls, their noise drawn outside ``vmap``."""

    model: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    _calls: dict[tuple[int, ...], list[_Call]] = field(default_factory=dict)
    _feed: list[torch.Tensor] = field(default_factory=list)
    _probing: bool = False

    def calls(self, sample_shape: tuple[int, ...]) -> list[_Call]:
        """Random-layer calls of one forward on inputs of ``sample_shape`` (probed once)."""
        if sample_shape not in self._calls:
            self._calls[sample_shape] = self._probe(sample_shape)
        return self._calls[sample_shape]

    def _probe(self, sample_shape: tuple[int, ...]) -> list[_Call]:
        """One eval-mode forward of a zero sample; pre-hooks record each random call."""
        found: list[_Call] = []
        hooks = [m.register_forward_pre_hook(
            lambda _m, args, name=name: found.append(
                _Call(name, tuple(args[0].shape[1:]), args[0].dtype)))
            for name, m in self.model.named_modules() if _is_random(m)]
        was_training = [(m, m.training) for m in self.model.modules()]
        try:
            self._probing = True
            self.model.eval()
            dtype = next((p.dtype for p in self.model.parameters()), torch.float32)
            x = torch.zeros((1, *sample_shape), device=self.device, dtype=dtype)
            with torch.no_grad(), autocast(self.device, self.amp_dtype):
                self.model(x)
        finally:
            self._probing = False
            for hook in hooks:
                hook.remove()
            for m, was in was_training:
                m.training = was
        return found

    def draw(self, batch_size: int, sample_shape: tuple[int, ...]) -> list[torch.Tensor]:
        """The noise of one step's forward, in call order, from the global generator."""
        return [self._noise(self.model.get_submodule(c.name), (batch_size, *c.sample_shape),
                            c.dtype) for c in self.calls(sample_shape)]

    def _noise(self, module: nn.Module, shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
        """What ``module`` would multiply its input by, drawn as ``module`` draws it."""
        keep = 1.0 - float(module.p)
        if isinstance(module, StochasticDepth):
            size = [shape[0]] + [1] * (len(shape) - 1) if module.mode == "row" else [1] * len(shape)
            noise = torch.empty(size, dtype=dtype, device=self.device).bernoulli_(keep)
            return noise.div_(keep)
        if self.device.type == "cuda":  # the fused kernel's mask, scaled as it scales
            probe = torch.empty(shape, dtype=dtype, device=self.device)
            return torch.native_dropout(probe, float(module.p), True)[1].to(dtype) * (1 / keep)
        return torch.empty(shape, dtype=dtype, device=self.device).bernoulli_(keep).div_(keep)

    @contextmanager
    def replayed(self) -> Iterator[list[torch.Tensor]]:
        """While open: random layers are identities times the tensors put in the list.

        The caller fills the yielded list with one step's noise (inside ``vmap``: the
        per-client slices) in call order before each forward; each layer takes the next.
        """
        modules = [m for m in self.model.modules() if _is_random(m)]
        feed = self._feed

        def multiply(_m: nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
            return out if self._probing else out * feed.pop(0)

        hooks = [m.register_forward_hook(multiply) for m in modules]
        modes = [(m, m.training) for m in modules]
        try:
            for m in modules:
                m.training = False
            yield feed
        finally:
            for hook in hooks:
                hook.remove()
            for m, was in modes:
                m.training = was
            feed.clear()
