"""Update compression: codec error bounds, error feedback, and the rebuilt update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedimg.transport.codecs import CODECS, compress_update, decompress_update


def _delta(seed: int = 0, shape: tuple[int, ...] = (64, 33)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_fp16_and_int8_round_trip_within_their_bounds() -> None:
    x = _delta()
    half = CODECS.get("fp16")
    back = half.decode(half.encode(x, 0.0), tuple(x.shape))
    # fp16 keeps 11 significant bits: relative error <= 2^-11 (normal range)
    assert ((back - x).abs() <= x.abs() * 2.0 ** -11 + 1e-7).all()
    int8 = CODECS.get("int8")
    parts = int8.encode(x, 0.0)
    scale = float(parts["s"][0])
    assert scale == pytest.approx(float(x.abs().max()) / 127)
    assert parts["q"].dtype == np.int8 and parts["q"].nbytes == x.numel()
    err = int8.decode(parts, tuple(x.shape)) - x
    assert float(err.abs().max()) <= scale / 2 + 1e-6


def test_topk_sends_exactly_the_largest_entries() -> None:
    x = torch.tensor([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3]])
    topk = CODECS.get("topk")
    parts = topk.encode(x, 1 / 3)  # ceil(6 / 3) = 2 entries
    assert sorted(parts["i"].tolist()) == [1, 3] and parts["i"].dtype == np.int32
    back = topk.decode(parts, (2, 3))
    assert back.tolist() == [[0.0, -5.0, 0.0], [3.0, 0.0, 0.0]]


def test_error_feedback_delays_but_never_loses_the_update() -> None:
    # Five rounds of the same true delta d with top-1%: what was sent plus what is
    # still in the residual equals 5 d.
    d = _delta(1)
    zero = {"w": torch.zeros_like(d)}
    residual: dict[str, torch.Tensor] = {}
    sent_total = torch.zeros_like(d)
    for _ in range(5):
        arrays, residual = compress_update("topk", 0.01, global_state=zero,
                                           local_state={"w": d}, trained=frozenset({"w"}),
                                           frozen=frozenset(), residual=residual)
        full = decompress_update("topk", arrays, {"w": zero["w"].numpy()})
        sent_total += torch.from_numpy(full["w"])
    torch.testing.assert_close(sent_total + residual["w"], 5 * d, rtol=0, atol=1e-5)
    assert arrays["w::v"].size == int(np.ceil(0.01 * d.numel()))


def test_the_server_rebuilds_the_full_state() -> None:
    # Arrange: a trained weight, a BatchNorm buffer that changes, a frozen weight.
    start = {"w": torch.ones(4), "bn.running_mean": torch.zeros(2), "frozen": torch.full((3,), 7.0)}
    local = {"w": torch.tensor([1.5, 1.0, 0.0, 1.0]), "bn.running_mean": torch.tensor([0.2, 0.4]),
             "frozen": torch.full((3,), 7.0)}
    # Act
    arrays, _ = compress_update("int8", 0.0, global_state=start, local_state=local,
                                trained=frozenset({"w"}), frozen=frozenset({"frozen"}),
                                residual=None)
    full = decompress_update("int8", arrays, {k: v.numpy() for k, v in start.items()})
    # Assert: the frozen weight is not sent (the server's frozen_home filter puts it back,
    # tests/serverapp/test_filters.py); the buffer travels as is
    assert set(arrays) == {"w::q", "w::s", "bn.running_mean"}
    np.testing.assert_allclose(full["w"], [1.5, 1.0, 0.0, 1.0], atol=1 / 127)
    assert full["bn.running_mean"].tolist() == pytest.approx([0.2, 0.4])
    assert "frozen" not in full
