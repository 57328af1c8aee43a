"""SecAgg+ keys and shares: a client's four stages, and the server's unmasking.

The client side of Bell et al. 2020 (SecAgg+), stage by stage, with the checks a
client makes before it reveals anything (the server is not trusted with a client's
update):

1. ``setup``: two fresh ECDH key pairs per round (``c`` for masks, ``s`` for shares);
2. ``share_keys``: given its neighbours' public keys, a fresh self-mask seed b_i; Shamir
   shares (threshold t) of b_i and of the mask key are encrypted to each neighbour.
   It refuses a neighbourhood smaller than t, repeated keys, keys not its own, and a
   threshold not above half the neighbourhood (then no server can collect, for any
   client, t shares of its seed *and* t of its mask key: each neighbour reveals only one);
3. ``collect``: it decrypts the shares forwarded to it (each checked for sender and
   recipient) and masks its contribution with every neighbour whose shares reached it;
4. ``unmask``: for each neighbour the server says survived, its share of b_j; for each
   one it says dropped, its share of the mask key. A node in both lists, a node not
   its neighbour, fewer survivors than t, or itself among the dropped is refused.

Every secret is fresh each round, so a share revealed in one round says nothing of
another. The state between stages is plain JSON (base64 bytes) for Flower's
``context.state``; it never leaves the client.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.fernet import InvalidToken
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedimg.privacy.secagg import SecAggError, SecAggPlan, agreed_seed

STAGES = ("setup", "share_keys", "collect", "unmask")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def _keypair() -> tuple[bytes, bytes]:
    sk, pk = generate_key_pairs()
    return private_key_to_bytes(sk), public_key_to_bytes(pk)


def mask_seed(own_secret: bytes, their_public: bytes) -> bytes:
    """The pairwise mask seed of two clients: ECDH, then HKDF (Flower's), 32 raw bytes."""
    return agreed_seed(generate_shared_key(bytes_to_private_key(own_secret),
                                           bytes_to_public_key(their_public)))


@dataclass
class ClientKeys:
    """One client's secrets and what it learnt in one round (JSON between stages)."""

    me: int
    round: int
    stage: str = "setup"
    plan: dict[str, Any] = field(default_factory=dict)
    c_sk: str = ""
    c_pk: str = ""
    s_sk: str = ""
    s_pk: str = ""
    seed: str = ""
    neighbour_keys: dict[str, list[str]] = field(default_factory=dict)  # id -> [c_pk, s_pk]
    seed_shares: dict[str, str] = field(default_factory=dict)  # whose -> my share of b_j
    key_shares: dict[str, str] = field(default_factory=dict)  # whose -> my share of c_sk_j
    masked_with: list[int] = field(default_factory=list)
    arrays: list[str] = field(default_factory=list)  # the model arrays summed, in order

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ClientKeys":
        return cls(**json.loads(text))

    def expect(self, stage: str, server_round: int) -> None:
        """Stages run in order within one round; anything else is refused."""
        if stage == "setup":
            return
        previous = STAGES[STAGES.index(stage) - 1]
        if self.stage != previous or self.round != server_round:
            raise SecAggError(f"secure aggregation: stage {stage} of round {server_round} "
                              f"after {self.stage} of round {self.round}; refused")


def setup(me: int, server_round: int, plan: SecAggPlan) -> tuple[ClientKeys, list[bytes]]:
    """Stage 1: fresh key pairs; returns the state and [c_pk, s_pk] to publish."""
    (c_sk, c_pk), (s_sk, s_pk) = _keypair(), _keypair()
    keys = ClientKeys(me=me, round=server_round, plan=plan.as_record(), c_sk=_b64(c_sk),
                      c_pk=_b64(c_pk), s_sk=_b64(s_sk), s_pk=_b64(s_pk))
    return keys, [c_pk, s_pk]


def share_keys(keys: ClientKeys, published: dict[int, list[bytes]]
               ) -> tuple[list[int], list[bytes]]:
    """Stage 2: shares of b_i and c_sk, encrypted to each neighbour: (recipients, ciphertexts)."""
    plan = SecAggPlan.from_record(keys.plan)
    _check_neighbourhood(keys, published, plan)
    keys.stage, seed = "share_keys", os.urandom(32)
    keys.seed = _b64(seed)
    keys.neighbour_keys = {str(n): [_b64(c), _b64(s)] for n, (c, s) in published.items()}
    order = sorted(published)
    seed_shares = create_shares(seed, plan.threshold, len(order))
    key_shares = create_shares(_unb64(keys.c_sk), plan.threshold, len(order))
    recipients, ciphertexts = [], []
    for node, b_share, c_share in zip(order, seed_shares, key_shares):
        if node == keys.me:
            keys.seed_shares[str(node)], keys.key_shares[str(node)] = _b64(b_share), _b64(c_share)
            continue
        channel = generate_shared_key(bytes_to_private_key(_unb64(keys.s_sk)),
                                      bytes_to_public_key(published[node][1]))
        plaintext = share_keys_plaintext_concat(keys.me, node, b_share, c_share)
        recipients.append(node)
        ciphertexts.append(encrypt(channel, plaintext))
    return recipients, ciphertexts


def _check_neighbourhood(keys: ClientKeys, published: dict[int, list[bytes]],
                         plan: SecAggPlan) -> None:
    size = len(published)
    if size < plan.threshold or 2 * plan.threshold <= size or size > plan.shares:
        raise SecAggError(f"secure aggregation: {size} neighbours (incl. this client) with "
                          f"threshold {plan.threshold} and planned {plan.shares}: refused "
                          "(need threshold <= neighbours < 2 x threshold)")
    flat = [k for pair in published.values() for k in pair]
    if any(len(pair) != 2 for pair in published.values()) or len(set(flat)) != len(flat):
        raise SecAggError("secure aggregation: repeated or malformed public keys; refused")
    if published.get(keys.me) != [_unb64(keys.c_pk), _unb64(keys.s_pk)]:
        raise SecAggError("secure aggregation: the server altered this client's own keys")


def receive_shares(keys: ClientKeys, senders: list[int], ciphertexts: list[bytes]) -> list[int]:
    """Stage 3, first half: decrypt and keep the shares sent to this client."""
    if len(senders) != len(ciphertexts) or len(set(senders)) != len(senders):
        raise SecAggError("secure aggregation: forwarded shares do not match their senders")
    s_sk = bytes_to_private_key(_unb64(keys.s_sk))
    for sender, ciphertext in zip(senders, ciphertexts):
        pair = keys.neighbour_keys.get(str(sender))
        if pair is None or sender == keys.me:
            raise SecAggError(f"secure aggregation: shares from {sender}, not a neighbour")
        try:
            plain = decrypt(generate_shared_key(s_sk, bytes_to_public_key(_unb64(pair[1]))),
                            ciphertext)
        except InvalidToken:
            raise SecAggError(f"secure aggregation: the shares from {sender} do not "
                              "decrypt (tampered or misaddressed); refused") from None
        src, dst, b_share, c_share = share_keys_plaintext_separate(plain)
        if src != sender or dst != keys.me:
            raise SecAggError(f"secure aggregation: a share claims {src}->{dst}, "
                              f"forwarded as {sender}->{keys.me}")
        keys.seed_shares[str(sender)], keys.key_shares[str(sender)] = _b64(b_share), _b64(c_share)
    plan = SecAggPlan.from_record(keys.plan)
    if len(senders) + 1 < plan.threshold:
        raise SecAggError(f"secure aggregation: shares from {len(senders)} neighbours, fewer "
                          f"than threshold {plan.threshold} - 1; refused")
    keys.stage, keys.masked_with = "collect", sorted(senders)
    return keys.masked_with


def own_seed(keys: ClientKeys) -> bytes:
    """This round's self-mask seed b_i."""
    return _unb64(keys.seed)


def pair_seeds(keys: ClientKeys) -> dict[int, bytes]:
    """The pairwise mask seed with every neighbour whose shares reached this client."""
    c_sk = _unb64(keys.c_sk)
    return {n: mask_seed(c_sk, _unb64(keys.neighbour_keys[str(n)][0]))
            for n in keys.masked_with}


def reveal(keys: ClientKeys, survived: list[int], dropped: list[int]
           ) -> tuple[list[int], list[bytes]]:
    """Stage 4: seed shares of survivors, mask-key shares of the dropped; checked first."""
    plan, known = SecAggPlan.from_record(keys.plan), set(keys.masked_with) | {keys.me}
    alive, dead = set(survived), set(dropped)
    problem = ("a node both survived and dropped" if alive & dead else
               "a node that is not a neighbour" if not (alive | dead) <= known else
               "this client among the dropped" if keys.me in dead else
               f"{len(alive)} survivors, below threshold {plan.threshold}"
               if len(alive) < plan.threshold else
               "repeated node ids" if len(alive) + len(dead) != len(survived) + len(dropped)
               else "")
    if problem:
        raise SecAggError(f"secure aggregation: the unmask request names {problem}; refused")
    keys.stage = "unmask"
    nodes = sorted(alive) + sorted(dead)
    shares = [_unb64(keys.seed_shares[str(n)]) for n in sorted(alive)] + \
             [_unb64(keys.key_shares[str(n)]) for n in sorted(dead)]
    return nodes, shares


def public_of(secret: bytes) -> bytes:
    """The public key of a rebuilt mask key (the server checks it against the published one)."""
    return public_key_to_bytes(bytes_to_private_key(secret).public_key())


def rebuild(shares: list[bytes], threshold: int) -> bytes:
    """A secret from at least ``threshold`` Shamir shares (Flower's combine)."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed")
    return combine_shares(shares[:threshold])
