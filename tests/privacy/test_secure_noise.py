"""``privacy.secure_noise``: ChaCha20 uniforms, Box-Muller normals, Poisson batches, the DP
optimizer's noise, the config refusals, and one DP-SGD round end to end.

Moment tolerances are 5 standard errors of the estimate over n draws (fixed keys, so
the draws, and the test, are deterministic): for U(0, 1) the mean's SE is
sqrt(1/12/n) and the variance's sqrt((1/80 - 1/144)/n) = sqrt(1/(180 n)); for N(0, 1)
sqrt(1/n) and sqrt(2/n).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers.optimizer import _generate_noise
from torch import nn

from fedimg.clientapp.environment import TaskEnvironment
from fedimg.config.compose import compose_config
from fedimg.data import InMemoryLoader
from fedimg.errors import ConfigError
from fedimg.privacy.accounting import PrivacyLedger
from fedimg.privacy.dp_sgd import WeightedDPOptimizer, private_batches, train_private, train_round
from fedimg.privacy.secure_noise import ChaChaStream, SecurePoissonSampler, keystream

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
N = 1_000_000
KEY_A, KEY_B = bytes(range(32)), bytes(range(1, 33))


def _se_bound(se: float) -> float:
    return 5 * se


def test_keystream_matches_rfc_8439_block_function_vector() -> None:
    # Arrange: RFC 8439 section 2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00,
    # block counter 1
    nonce = bytes.fromhex("000000090000004a00000000")
    # Act
    block = keystream(bytes(range(32)), nonce=nonce, nbytes=64, counter=1)
    # Assert: the RFC's serialized block
    assert block.hex() == ("10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
                           "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e")


def test_uniforms_have_the_moments_of_u01_and_never_hit_zero_or_one() -> None:
    # Act
    u = ChaChaStream(KEY_A).uniform(N)
    # Assert
    assert u.dtype == np.float64 and u.shape == (N,)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < _se_bound(math.sqrt(1 / 12 / N))  # 1.4e-3
    assert abs(u.var() - 1 / 12) < _se_bound(math.sqrt(1 / 180 / N))  # 3.7e-4
    k = u * 2.0**53  # exact: every uniform is a 53-bit grid point k / 2^53
    assert np.array_equal(k, np.round(k))


def test_a_zero_mantissa_is_redrawn() -> None:
    # Arrange: the first words give mantissas 0, 5, 0; the redraw gives 7, 9
    stream = ChaChaStream(KEY_A)
    calls = iter([np.array([0, 5 << 11, 0], dtype=np.uint64),
                  np.array([7 << 11, 9 << 11], dtype=np.uint64)])
    stream.words = lambda n: next(calls)  # type: ignore[method-assign]
    # Act / Assert: the zeros are replaced in order
    assert stream.uniform(3).tolist() == [7 * 2.0**-53, 5 * 2.0**-53, 9 * 2.0**-53]


def test_box_muller_on_hand_picked_uniforms() -> None:
    # Arrange: u1 = e^-2, u2 = 1/8: radius sqrt(-2 ln u1) = 2, angle pi/4
    stream = ChaChaStream(KEY_A)
    stream.uniform = lambda n: np.array([math.exp(-2.0), 0.125])  # type: ignore[method-assign]
    # Act
    z = stream.normal(2, std=3.0)
    # Assert: 3 * 2 * (cos pi/4, sin pi/4) = (3 sqrt 2, 3 sqrt 2)
    assert z.tolist() == pytest.approx([3 * math.sqrt(2)] * 2, rel=1e-12)


def test_normals_have_the_moments_of_a_standard_normal() -> None:
    # Act: an odd count (Box-Muller makes pairs), in float32 as gradients are
    z = ChaChaStream(KEY_B).normal(N + 1, dtype=torch.float32).double()
    # Assert: mean 0, variance 1, 5% beyond 1.96, kurtosis 3 (SE sqrt(24/n))
    assert z.shape == (N + 1,)
    assert abs(float(z.mean())) < _se_bound(math.sqrt(1 / N))  # 5e-3
    assert abs(float(z.var()) - 1) < _se_bound(math.sqrt(2 / N))  # 7.1e-3
    tail = float((z.abs() > 1.959964).double().mean())
    assert abs(tail - 0.05) < _se_bound(math.sqrt(0.05 * 0.95 / N))
    assert abs(float((z**4).mean()) - 3) < _se_bound(math.sqrt(96 / N))  # Var(z^4) = 96
    assert float(z.abs().max()) <= math.sqrt(106 * math.log(2))  # u1 >= 2^-53


def test_the_same_key_replays_the_stream_and_another_key_or_no_key_differs() -> None:
    # Act
    a1, a2 = ChaChaStream(KEY_A).words(1000), ChaChaStream(KEY_A).words(1000)
    b, fresh = ChaChaStream(KEY_B).words(1000), ChaChaStream().words(1000)
    # Assert: replay is exact; the others share no word with it
    assert np.array_equal(a1, a2)
    assert not np.isin(a1, b).any() and not np.isin(a1, fresh).any()
    stream = ChaChaStream(KEY_A)
    assert not np.array_equal(stream.words(1000), stream.words(1000))  # a new nonce each call
    assert "ChaChaStream(" in repr(stream) and KEY_A.hex() not in repr(stream)


def test_poisson_batch_sizes_are_binomial() -> None:
    # Arrange: N = 1000 samples, q = 0.05: sizes ~ Binomial(1000, 0.05), mean 50, var 47.5
    n, q, steps = 1000, 0.05, 2000
    sampler = SecurePoissonSampler(num_samples=n, sample_rate=q, steps=steps,
                                   stream=ChaChaStream(KEY_A))
    # Act
    batches = list(sampler)
    sizes = np.array([len(b) for b in batches])
    # Assert: SE of the mean sqrt(47.5 / 2000) = 0.15; of the variance ~ sqrt(2/2000) * 47.5
    assert len(sampler) == len(batches) == steps
    assert abs(sizes.mean() - n * q) < _se_bound(math.sqrt(n * q * (1 - q) / steps))
    assert abs(sizes.var(ddof=1) - n * q * (1 - q)) < _se_bound(
        math.sqrt(2 / steps) * n * q * (1 - q))
    assert all(b == sorted(set(b)) and all(0 <= i < n for i in b) for b in batches)
    counts = np.bincount(np.concatenate(batches), minlength=n)  # each ~ Binomial(2000, q)
    assert abs(counts.var(ddof=1) - steps * q * (1 - q)) < _se_bound(  # 95, SE ~4.2
        math.sqrt(2 / n) * steps * q * (1 - q))


def _loader(n: int = 200) -> InMemoryLoader:
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    return InMemoryLoader(images, torch.arange(n) % 2, indices=np.arange(n), batch_size=20,
                          transform=None, shuffle=True, seed=0)


@pytest.mark.parametrize("poisson", [True, False])
def test_secure_private_batches_leave_torch_randomness_alone(poisson: bool) -> None:
    # Arrange
    generator = torch.Generator().manual_seed(1)
    state, global_state = generator.get_state(), torch.get_rng_state()
    sampler = private_batches(_loader(), rate=0.1, steps=30, generator=generator,
                              poisson=poisson, secure=True).batch_sampler
    # Act
    batches = list(sampler)
    # Assert: the secure sampler drew them (the DataLoader itself seeds from torch; not
    # used here); sizes vary around 20 (Poisson) or are 20, each pass a permutation
    assert torch.equal(generator.get_state(), state)
    assert torch.equal(torch.get_rng_state(), global_state)
    sizes = [len(b) for b in batches]
    if poisson:
        assert isinstance(sampler, SecurePoissonSampler) and len(set(sizes)) > 3
    else:
        assert set(sizes) == {20}
        assert sorted(i for b in batches[:10] for i in b) == list(range(200))


def _zero_gradient_step(*, stream: ChaChaStream | None, generator: torch.Generator | None,
                        sigma: float = 1.5, clip: float = 0.5
                        ) -> tuple[torch.Tensor, WeightedDPOptimizer, bool]:
    """p.grad after one DP step on a zero loss of a 2000 x 50 linear layer (100,050 weights),
    the optimizer, and whether the step moved torch's global RNG or ``generator``."""
    model = nn.Linear(2000, 50)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    opt = WeightedDPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.0),
                              noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=1,
                              loss_reduction="sum", generator=generator, noise_stream=stream)
    (0.0 * gsm(torch.ones(4, 2000)).sum()).backward()  # every per-sample gradient is 0
    before = (torch.get_rng_state(), generator.get_state() if generator else None)
    opt.step()
    moved = not torch.equal(before[0], torch.get_rng_state()) or (
        generator is not None and not torch.equal(before[1], generator.get_state()))
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    gsm._close()
    return grad, opt, moved


def test_secure_noise_has_std_sigma_times_c_and_leaves_torch_randomness_alone() -> None:
    # Arrange: sigma = 1.5, C = 0.5, so the noise has std 0.75
    torch.manual_seed(0)
    # Act
    grad, opt, moved = _zero_gradient_step(stream=ChaChaStream(KEY_A),
                                           generator=torch.Generator().manual_seed(5))
    # Assert: the gradient is pure noise, N(0, 0.75^2) per weight (SE of the std
    # 0.75 / sqrt(2 n)); one draw of 100,050 normals; neither torch RNG moved
    n = grad.numel()
    assert grad.dtype == torch.float32 and n == 100_050
    assert abs(float(grad.double().std()) - 0.75) < _se_bound(0.75 / math.sqrt(2 * n))
    assert abs(float(grad.double().mean())) < _se_bound(0.75 / math.sqrt(n))
    assert opt.noise_stream.words_drawn == 2 * math.ceil(n / 2)  # Box-Muller pairs
    assert not moved


def test_without_a_stream_the_noise_is_opacus_own() -> None:
    # Arrange: Opacus' _generate_noise from the same seeded generator, per parameter
    torch.manual_seed(0)
    expected_gen = torch.Generator().manual_seed(5)
    reference = nn.Linear(2000, 50)
    expected = torch.cat([_generate_noise(std=0.75, reference=p, generator=expected_gen).flatten()
                          for p in reference.parameters()])
    # Act
    grad, _, moved = _zero_gradient_step(stream=None,
                                         generator=torch.Generator().manual_seed(5))
    # Assert: bit for bit, drawn from the generator
    assert torch.equal(grad, expected) and moved


def _secure_round(sigma: float) -> tuple[nn.Module, torch.Generator, bytes]:
    """5 DP-SGD steps of a linear model on 40 4-px images, q = 0.2, secure noise."""
    cfg = compose_config("medical", ["privacy=dp_sgd", "weights=none", "train.optimizer=sgd",
                                     "train.momentum=0", "train.batch_size=8",
                                     "train.local_steps=5", "privacy.secure_noise=true"])
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    loader = InMemoryLoader(images, torch.arange(40) % 2, indices=np.arange(40), batch_size=8,
                            transform=None, shuffle=False, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    book = PrivacyLedger(target_epsilon=8.0, delta=1e-3, noise_multiplier=sigma, sample_rate=0.2)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    train_private(model, loader, book, cfg=cfg, device=torch.device("cpu"), class_weights=None,
                  lr=0.5, steps=5, generator=generator)
    assert book.history == [(sigma, 0.2, 5)]
    return model, generator, bytes(state.numpy())


def test_a_secure_round_never_uses_the_generator_and_differs_on_every_run() -> None:
    # Act: the same round twice, same seeds everywhere
    first, generator, state = _secure_round(sigma=1.0)
    second, _, _ = _secure_round(sigma=1.0)
    # Assert: fresh keys, so different batches and noise; the generator is untouched
    assert bytes(generator.get_state().numpy()) == state
    assert not torch.equal(first[1].weight, second[1].weight)


def test_a_dp_sgd_round_with_secure_noise_runs_end_to_end(tmp_path, tiny_overrides) -> None:
    # Arrange: the tiny synthetic federation of test_dp_sgd, secure noise on
    cfg = compose_config("medical", [*tiny_overrides, "privacy=dp_sgd", "weights=none",
                                     "model=mobilenet_v3_small", "train.batch_size=16",
                                     "train.local_steps=2", "data.synthetic.train_size=128",
                                     "train.class_weighting=none", "privacy.secure_noise=true",
                                     f"hydra.run.dir={tmp_path}"])
    env = TaskEnvironment(cfg, num_threads=2)
    before = {k: v.clone() for k, v in env.state().items()}
    # Act
    result = train_round(env, 0, server_round=1)
    # Assert: trained, finite, accounted like any DP-SGD round
    after = env.state()
    assert not result.declined and result.metrics["train/steps"] == 2
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert 0 < result.metrics["dp/epsilon"] <= 8.0


@pytest.mark.parametrize(("overrides", "message"), [
    (["privacy=dp_sgd", "privacy.secure_noise=true", "privacy.seeded_noise=true"],
     r"privacy.secure_noise=true with privacy.seeded_noise=true: .* set "
     r"privacy.seeded_noise=false"),
    (["privacy=client_dp", "privacy.secure_noise=true"],
     r"privacy.secure_noise=true with privacy.mode=client_dp: .*Flower's DP wrapper at the "
     r"server.*set privacy=dp_sgd"),
    (["privacy.secure_noise=true"], r"privacy.secure_noise=true with privacy.mode=none"),
])
def test_secure_noise_is_refused_where_it_cannot_apply(overrides, message, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        compose_config("medical", [*overrides, f"hydra.run.dir={tmp_path}"])
    assert "\n" not in str(info.value)
