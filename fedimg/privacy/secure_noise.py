"""DP-SGD's noise and batches from a cryptographic keystream (``privacy.secure_noise``).

Opacus' ``secure_mode`` needs ``torchcsprng``, which is not installable here. This
module is the replacement: a :class:`ChaChaStream` reads the ChaCha20 keystream
(RFC 8439, "ChaCha20 and Poly1305 for IETF Protocols", sections 2.3-2.4; through the
``cryptography`` package, i.e. OpenSSL) under a 256-bit key from :mod:`secrets`,
fresh for every stream and never derived from the run seed, so no config, seed or
earlier output lets anyone predict, regenerate and subtract the noise.

The method, all vectorised (numpy / torch, no per-sample Python loop):

* **words**: each call encrypts zeros under its own 96-bit nonce (the call's
  number; the block counter starts at 0), and reads the keystream as little-endian
  uint64 words. One call may use at most 2^32 blocks (256 GiB), RFC 8439's limit.
* **uniforms** in (0, 1): the top 53 bits k of a word give k / 2^53, exactly
  representable, uniform on the 2^53 - 1 grid points of (0, 1); k = 0 (probability
  2^-53) is redrawn, so neither 0 nor 1 occurs.
* **normals**: the Box-Muller transform (Box and Muller 1958), exact in exact
  arithmetic: z = sqrt(-2 ln u1) * (cos 2 pi u2, sin 2 pi u2) for two uniforms gives two
  independent N(0, 1). It runs in float64, is scaled by the standard deviation, and
  is rounded once to the target dtype. As u1 >= 2^-53, |z| <= sqrt(106 ln 2) = 8.57.
* **Poisson batches** (:class:`SecurePoissonSampler`): as Opacus'
  ``UniformWithReplacementSampler``, each of N samples is in a step's batch
  independently with probability q (uniform < q), for ``steps`` batches.
* **permutations** (shuffled batches, ``privacy.poisson=false``): the argsort of
  uint64 words, uniform unless two words tie (probability below n^2 / 2^65).

What it does *not* fix: floating-point Gaussians have gaps and a porous support that
can reveal the unnoised value (Mironov 2012, "On significance of the least
significant bits for differential privacy", CCS), and the running time is not
constant; see README, "Secure noise".
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch.utils.data import Sampler

KEY_BYTES = 32  # ChaCha20's 256-bit key
_MAX_BLOCKS = 2**32  # RFC 8439: a 32-bit block counter per (key, nonce)
CHUNK = 1 << 18  # normals per Box-Muller pass: 2 MiB of float64 uniforms
_SHIFT = np.uint64(11)  # keep a word's top 53 bits: a float64 mantissa


def keystream(key: bytes, *, nonce: bytes, nbytes: int, counter: int = 0) -> bytes:
    """``nbytes`` of ChaCha20 keystream: ``key`` 32 B, ``nonce`` 12 B, from block ``counter``.

    ``cryptography`` takes RFC 8439's 32-bit block counter (little-endian) and 96-bit
    nonce as one 16-byte value, in that order (checked against RFC 8439 2.3.2).
    """
    if len(key) != KEY_BYTES or len(nonce) != 12:
        raise ValueError(f"ChaCha20 needs a 32-byte key and a 12-byte nonce, got "
                         f"{len(key)} and {len(nonce)} bytes")
    cipher = Cipher(algorithms.ChaCha20(key, counter.to_bytes(4, "little") + nonce), mode=None)
    return cipher.encryptor().update(bytes(nbytes))


class ChaChaStream:
    """Uniform, normal and Bernoulli draws from a ChaCha20 keystream (see the module).

    ``key`` defaults to 32 fresh bytes from :mod:`secrets`; pass one only to replay a
    stream in a test. Each call to :meth:`words` is one RFC 8439 message with its own
    nonce, so the same key and the same calls give the same draws.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = secrets.token_bytes(KEY_BYTES) if key is None else bytes(key)
        if len(self._key) != KEY_BYTES:
            raise ValueError(f"a ChaCha20 key has {KEY_BYTES} bytes, got {len(self._key)}")
        self._messages = 0  # nonces used so far
        self.words_drawn = 0  # uint64 words read, for tests and benchmarks

    def __repr__(self) -> str:
        return f"ChaChaStream(messages={self._messages})"  # never the key

    def words(self, n: int) -> np.ndarray:
        """``n`` independent uniform uint64 words, (n,)."""
        if 8 * n > 64 * _MAX_BLOCKS:
            raise ValueError(f"{n} words exceed one ChaCha20 message (2^32 blocks)")
        nonce = self._messages.to_bytes(12, "little")
        self._messages += 1
        self.words_drawn += n
        return np.frombuffer(keystream(self._key, nonce=nonce, nbytes=8 * n), dtype="<u8")

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms k / 2^53, k in 1..2^53 - 1 (never 0 or 1), (n,)."""
        k = self.words(n) >> _SHIFT
        zero = k == 0
        while zero.any():  # probability 2^-53 per draw; redraw those
            k[zero] = self.words(int(zero.sum())) >> _SHIFT
            zero = k == 0
        return k.astype(np.float64) * 2.0**-53

    def normal(self, n: int, *, std: float = 1.0, dtype: torch.dtype = torch.float64
               ) -> torch.Tensor:
        """``n`` N(0, std^2) draws, Box-Muller in float64, rounded once to ``dtype``, (n,).

        Drawn in chunks of :data:`CHUNK`, so that the float64 temporaries stay small.
        """
        out = torch.empty(n, dtype=dtype)
        for start in range(0, n, CHUNK):
            self._box_muller(out[start:start + CHUNK], std=std)
        return out

    def _box_muller(self, out: torch.Tensor, *, std: float) -> None:
        """Fill ``out`` (m,) with std * sqrt(-2 ln u1) * (cos, sin)(2 pi u2), in float64."""
        m = len(out)
        half = (m + 1) // 2
        u = torch.from_numpy(self.uniform(2 * half))  # (2 * half,) float64
        radius = u[:half].log_().mul_(-2.0).sqrt_().mul_(std)
        angle = u[half:].mul_(2.0 * math.pi)
        torch.mul(radius, torch.cos(angle), out=out[:half])
        torch.mul(radius[:m - half], angle[:m - half].sin_(), out=out[half:])

    def normal_like(self, references: Sequence[torch.Tensor], *, std: float
                    ) -> list[torch.Tensor]:
        """N(0, std^2) noise shaped, typed and placed like each reference (one draw for all).

        Like Opacus' ``_generate_noise``, ``std == 0`` gives zeros and draws nothing.
        """
        if std == 0:
            return [torch.zeros_like(r) for r in references]
        sizes, dtypes = [r.numel() for r in references], {r.dtype for r in references}
        flat = self.normal(sum(sizes), std=std,  # rounded once: to the common dtype, or below
                           dtype=dtypes.pop() if len(dtypes) == 1 else torch.float64)
        return [piece.view(r.shape).to(device=r.device, dtype=r.dtype)
                for piece, r in zip(flat.split(sizes), references)]

    def randperm(self, n: int) -> torch.Tensor:
        """A uniform permutation of 0..n-1 (argsort of uint64 words), like ``torch.randperm``."""
        return torch.from_numpy(np.argsort(self.words(n), kind="stable").astype(np.int64))


class SecurePoissonSampler(Sampler[list[int]]):
    """Opacus' ``UniformWithReplacementSampler`` over a :class:`ChaChaStream`.

    Each of the ``steps`` batches holds every position 0..N-1 independently with
    probability ``sample_rate`` (a float64 uniform below q), so a batch has
    Binomial(N, q) samples and may be empty, as the accountants assume.
    """

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int,
                 stream: ChaChaStream) -> None:
        if num_samples <= 0 or not 0 < sample_rate <= 1:
            raise ValueError(f"need num_samples > 0 and 0 < sample_rate <= 1, got "
                             f"{num_samples} and {sample_rate}")
        self.num_samples, self.sample_rate, self.steps = num_samples, sample_rate, steps
        self.stream = stream

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield np.flatnonzero(self.stream.uniform(self.num_samples) < self.sample_rate).tolist()
