"""SecAgg+ arithmetic: the plan of a round, the integer encoding, masks and unmasking.

Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS) with the sparse neighbour graph of SecAgg+
(Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS). Every client i adds to its integer vector x_i, mod M = 2^b,

    y_i = x_i + PRG(b_i) + sum_{j in N(i), j < i} PRG(s_ij) - sum_{j in N(i), j > i} PRG(s_ij)

where b_i is its own seed and s_ij the key agreed with neighbour j (ECDH). The pairwise
masks cancel in the sum; the server learns each b_i of a survivor and the key of a client
that dropped after sharing keys from t Shamir shares held by its neighbours, and so only
sum_i x_i. The cryptography is Flower's (``flwr.common.secure_aggregation``: Shamir
shares, ECDH + HKDF, Fernet; ``flwr.supercore.primitives.asymmetric``: keys). The mask
PRG is ChaCha20 (RFC 8439) under the full 256-bit seed: Flower's ``pseudo_rand_gen`` folds
a seed into 32 bits for numpy's Mersenne Twister, which a server can search.

The encoding of one client's contribution (the plan, :class:`SecAggPlan`, fixes it):

* header ``[weight, contributors, clipped]``: the FedAvg weight (its example count, or 1
  under distributed DP), a 1, and how many coordinates it clipped (not under DP);
* body: ``weight / max_weight * (w_i - w_global)`` (each coordinate clipped to ``clip``,
  a BatchNorm statistic to ``BUFFER_SCALE * clip``: see :func:`coordinate_scale`),
  or under distributed DP the L2-clipped update plus discrete Gaussian noise
  (:mod:`fedimg.privacy.distributed_dp`), in units of ``step = clip / scale``, stochastically
  rounded. The sum of m bodies stays within ``bound`` <= M/4 by construction, so a sum
  coordinate beyond ``bound`` is a detected overflow, never a silently wrapped value.
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from fedimg.errors import ConfigError
from fedimg.privacy.secure_noise import ChaChaStream, keystream

HEADER = 3  # weight, contributors, clipped coordinates
MAX_CLIPPED = 1 << 16  # a client's clipped count saturates here
_NONCE = b"fedimg-mask\x00"  # one key per (round, client pair): a fixed nonce is safe
BUFFER_SCALE = 1e3  # BatchNorm statistics move by hundreds a round: their unit is 1e3 x clip
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
TAIL_SIGMAS = 10.0  # noise margin of the overflow bound: P(|N(0,1)| > 10) < 2e-23


class SecAggError(ValueError):
    """A protocol step that cannot go on (bad input, too few shares, an overflow)."""


@dataclass(frozen=True)
class SecAggPlan:
    """The numbers of one secure round, the same at the server and every client.

    ``shares``: the size of a neighbourhood (the client and its neighbours, odd);
    ``threshold``: shares that rebuild a secret, more than half of ``shares``;
    ``scale``: integer units per ``clip``; ``noise_std``: each client's discrete
    Gaussian std in integer units (0 without distributed DP); ``bound``: the largest
    |coordinate| an honest sum can have.
    """

    sampled: int
    shares: int
    threshold: int
    modulus_bits: int
    clip: float
    scale: int
    max_weight: int
    noise_std: float
    bound: int
    dim: int

    @property
    def modulus(self) -> int:
        return 1 << self.modulus_bits

    @property
    def step(self) -> float:
        return self.clip / self.scale

    def as_record(self) -> dict[str, int | float]:
        return asdict(self)

    @classmethod
    def from_record(cls, values: dict) -> "SecAggPlan":
        """A plan from a message; a missing or mistyped field is a :class:`SecAggError`."""
        try:
            kwargs = {f.name: (float if f.type == "float" else int)(values[f.name])
                      for f in fields(cls)}
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"malformed secure-aggregation plan ({exc})") from None
        return cls(**kwargs)


def byte_strings(values: object, what: str) -> list[bytes]:
    """``values`` from a message, which must be a list of bytes; else a SecAggError.

    ``bytes(n)`` of an int allocates n zero bytes: a hostile 10**12 would exhaust memory.
    """
    if not isinstance(values, list) or not all(isinstance(v, bytes) for v in values):
        raise SecAggError(f"secure aggregation: {what} must be a list of bytes")
    return values


def neighbourhood(sampled: int, shares: int | None) -> int:
    """Neighbourhood size k: every sampled client up to 21, else 21 (odd, at most m).

    Bell et al. show O(log n) neighbours suffice; 21 keeps each client's key
    agreements and shares per round constant beyond 21 clients, and with the default
    threshold (60%) tolerates 8 of any client's 20 neighbours dropping.
    """
    k = min(sampled, shares if shares else 21)
    return k if k == sampled or k % 2 == 1 else k - 1


def make_plan(*, sampled: int, shares: int | None, threshold: float, modulus_bits: int,
              clip: float, dim: int, max_weight: int, noise_multiplier: float = 0.0,
              tolerance: float = 0.0) -> SecAggPlan:
    """The plan for ``sampled`` clients sending ``dim`` floats; ConfigError if impossible.

    Without noise, ``scale`` is the largest K with ``sampled * (K + 1) <= M/4``. With
    distributed DP (``noise_multiplier`` sigma, ``honest`` clients assumed to add their
    noise), h = ceil((1 - tolerance) m) clients are assumed honest and present, and each
    adds std ``sigma (K + sqrt(d)) / sqrt(h)``: the integer sensitivity of a clipped,
    rounded update is at most K + sqrt(d). ``bound`` then adds TAIL_SIGMAS standard
    deviations of the summed noise, and the threshold rises to (1 - tolerance) of a
    neighbourhood, so no client unmasks a sum with fewer noise shares than assumed.
    """
    k = neighbourhood(sampled, shares)
    t = max(k // 2 + 1, math.ceil(threshold * k - 1e-9))
    honest = 0
    if noise_multiplier:
        honest = max(1, math.ceil((1 - tolerance) * sampled - 1e-9))
        t = max(t, math.ceil((1 - tolerance) * k - 1e-9))
    quarter = (1 << modulus_bits) // 4
    if sampled * max(max_weight, MAX_CLIPPED) > quarter:
        raise ConfigError(f"secagg.modulus_bits={modulus_bits} is too small for {sampled} "
                          f"clients with up to {max_weight} examples each. Fix: raise "
                          "secagg.modulus_bits (at most 62)")
    spread = TAIL_SIGMAS * noise_multiplier * math.sqrt(sampled / honest) if honest else 0.0
    scale = int((quarter - sampled - spread * math.sqrt(dim)) / (sampled + spread)) - 1
    if scale < 1 or (noise_multiplier and math.sqrt(dim) > 0.01 * scale):
        raise ConfigError(f"secagg.modulus_bits={modulus_bits} leaves {max(scale, 0)} integer "
                          f"levels per clip for {dim} coordinates of {sampled} clients; "
                          "rounding would dominate. Fix: raise secagg.modulus_bits")
    noise = noise_multiplier * (scale + math.sqrt(dim)) / math.sqrt(honest) if honest else 0.0
    bound = sampled * (scale + 1) + math.ceil(TAIL_SIGMAS * noise * math.sqrt(sampled))
    return SecAggPlan(sampled=sampled, shares=k, threshold=t, modulus_bits=modulus_bits,
                      clip=clip, scale=scale, max_weight=max_weight, noise_std=noise,
                      bound=bound, dim=dim)


def mask(seed: bytes, plan: SecAggPlan) -> np.ndarray:
    """PRG(seed) mod M for a whole contribution (header + body), (HEADER + dim,) uint64."""
    if len(seed) != 32:
        raise SecAggError(f"a mask seed has 32 bytes, got {len(seed)}")
    n = HEADER + plan.dim
    wide = plan.modulus_bits > 32
    raw = keystream(seed, nonce=_NONCE, nbytes=(8 if wide else 4) * n)
    words = np.frombuffer(raw, dtype="<u8" if wide else "<u4").astype(np.uint64)
    return words & np.uint64(plan.modulus - 1)


def agreed_seed(shared_key: bytes) -> bytes:
    """The 32 raw bytes of Flower's ECDH+HKDF key (it returns them base64-encoded)."""
    return base64.urlsafe_b64decode(shared_key)


def stochastic_round(values: np.ndarray, stream: ChaChaStream) -> np.ndarray:
    """Unbiased rounding to integers: floor(v) + Bernoulli(v - floor(v)), int64."""
    low = np.floor(values)
    return (low + (stream.uniform(values.size) < (values - low))).astype(np.int64)


def encode(body: np.ndarray, *, weight: int, clipped: int, plan: SecAggPlan) -> np.ndarray:
    """Header + integer body as residues mod M, (HEADER + dim,) uint64."""
    if body.shape != (plan.dim,):
        raise SecAggError(f"the update has {body.size} coordinates, the plan {plan.dim}")
    header = np.array([weight, 1, min(clipped, MAX_CLIPPED - 1)], dtype=np.int64)
    signed = np.concatenate([header, body.astype(np.int64)])
    return signed.astype(np.uint64) & np.uint64(plan.modulus - 1)  # two's complement mod M


def quantize(values: np.ndarray, plan: SecAggPlan, stream: ChaChaStream
             ) -> tuple[np.ndarray, int]:
    """``values`` clipped to +-clip and rounded to ``step``; the count clipped."""
    clipped = int(np.count_nonzero(np.abs(values) > plan.clip))
    return stochastic_round(np.clip(values, -plan.clip, plan.clip) / plan.step, stream), clipped


def masked(encoded: np.ndarray, *, own_seed: bytes, pair_seeds: dict[int, bytes],
           me: int, plan: SecAggPlan) -> np.ndarray:
    """``encoded`` + PRG(own seed) +- the pairwise masks (+ for a smaller neighbour id)."""
    out = encoded + mask(own_seed, plan)
    for other, seed in sorted(pair_seeds.items()):
        out = out + mask(seed, plan) if me > other else out - mask(seed, plan)
    return out & np.uint64(plan.modulus - 1)


def decode(total: np.ndarray, plan: SecAggPlan, *, contributors: int
           ) -> tuple[int, int, np.ndarray]:
    """(weight sum, clipped count, body sum in floats) of an unmasked sum; checks it.

    A residue r stands for r - M when r >= M/2. The header must count exactly the
    ``contributors`` the server unmasked, and every body coordinate must lie within the
    plan's bound: otherwise the sum wrapped (or a client sent garbage) and nothing is
    released.
    """
    half = np.uint64(plan.modulus // 2)
    signed = total.astype(np.int64) - np.where(total >= half, plan.modulus, 0).astype(np.int64)
    weight, count, clipped = (int(v) for v in signed[:HEADER])
    if count != contributors or weight <= 0:
        raise SecAggError(f"the unmasked header counts {count} contributors and weight "
                          f"{weight}, the server unmasked {contributors}: the sum is corrupt")
    body = signed[HEADER:]
    worst = int(np.abs(body).max()) if body.size else 0
    if worst > plan.bound:
        raise SecAggError(f"overflow: a summed coordinate reached {worst} > bound "
                          f"{plan.bound} (mod 2^{plan.modulus_bits}); the round is not released")
    return weight, clipped, body.astype(np.float64) * plan.step


def flatten(update: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    """The arrays named by ``keys`` (sorted by the caller), as one float64 vector."""
    return np.concatenate([np.asarray(update[k], dtype=np.float64).ravel() for k in keys]) \
        if keys else np.zeros(0)


def unflatten(vector: np.ndarray, like: dict[str, np.ndarray], keys: list[str]
              ) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`: pieces shaped like ``like`` (still float64)."""
    out, start = {}, 0
    for k in keys:
        size = int(np.asarray(like[k]).size)
        out[k] = vector[start:start + size].reshape(np.asarray(like[k]).shape)
        start += size
    return out


def coordinate_scale(like: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    """Per coordinate, the unit of ``clip``: BUFFER_SCALE for BatchNorm statistics, else 1.

    A parameter rarely moves by more than ``secagg.clip_range`` in one round, while a
    running variance can move by hundreds; one range for both would either clip the
    statistics or waste the parameters' precision. Both sides derive it from the names.
    """
    return np.concatenate([np.full(int(np.asarray(like[k]).size),
                                   BUFFER_SCALE if k.endswith(_BUFFERS) else 1.0)
                           for k in keys]) if keys else np.zeros(0)

