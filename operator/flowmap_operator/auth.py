"""Agents authenticate with a projected ServiceAccount token, checked by TokenReview.

The token must be the agent ServiceAccount's, for the ``flowmap`` audience, and bound to the node
the batch claims (Kubernetes puts the node of a pod-bound or node-bound token in the review's
``authentication.kubernetes.io/node-name`` extra).

TokenReviews stay few whoever calls, since each is a write to the API server:
- an accepted token is remembered until shortly before it expires (its JWT ``exp``, read only once
  the API server vouched for the token), and re-reviewed at least every ``REVIEW_AGAIN`` seconds:
  a token bound to a pod stops being valid when the pod is deleted, and this bounds how long the
  operator would go on trusting it;
- a refused token is remembered for ``REFUSED_FOR`` seconds;
- each peer address may have ``PEER_BURST`` tokens refused in a row, then one more every
  ``PEER_REFILL`` seconds; beyond that its unknown tokens are refused without a review (a token
  already accepted still works). Random tokens from one address cost a handful of reviews, not one
  each.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes_asyncio.client import AuthenticationV1Api, V1TokenReview, V1TokenReviewSpec

from flowmap_operator import metrics
from flowmap_operator.errors import ApiError, PermissionDenied, Unauthenticated, Unavailable
from flowmap_operator.kubeapi import call

NODE_EXTRA = "authentication.kubernetes.io/node-name"
REVIEW_AGAIN = 600.0
EXPIRY_MARGIN = 60.0  # an accepted token is not taken from memory this close to its expiry
REFUSED_FOR = 30.0
PEER_BURST = 5
PEER_REFILL = 2.0
CACHE_MAX = 10_000  # tokens remembered; and peers
MAX_TOKEN = 16384


@dataclass(frozen=True)
class Identity:
    username: str
    node: str


def peer_address(peer: str) -> str:
    """The address of a gRPC peer string without its port (``ipv4:10.0.0.1:4242`` -> ``ipv4:10.0.0.1``):
    every connection of a client comes from a new port."""
    kind, _, rest = peer.partition(":")
    return f"{kind}:{rest.rpartition(':')[0]}" if kind in ("ipv4", "ipv6") else peer


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (Unix seconds), unverified: only read once a review accepted the token."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
    except (IndexError, ValueError, binascii.Error, AttributeError):
        return None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


class Authenticator:
    def __init__(self, api: AuthenticationV1Api, *, namespace: str, service_account: str, audience: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.api = api
        self.expected = f"system:serviceaccount:{namespace}:{service_account}"
        self.audience = audience
        self.clock = clock
        self._cache: dict[str, tuple[float, Identity | None]] = {}  # token hash -> (until, identity or refused)
        self._peers: dict[str, tuple[float, float]] = {}  # peer address -> (refusals it may still have, as of)

    async def identify(self, metadata: tuple[tuple[str, str | bytes], ...], peer: str = "") -> Identity:
        """Who the call's bearer token belongs to; Unauthenticated (or Unavailable) otherwise."""
        token = next((v for k, v in metadata if k == "authorization"), None)
        if not isinstance(token, str) or not token.startswith("Bearer ") or len(token) > MAX_TOKEN:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        token = token.removeprefix("Bearer ").strip()
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        cached = self._cache.get(digest)
        if cached is None or cached[0] <= now:
            address = peer_address(peer)
            if not self._may_review(address, now):
                metrics.TOKENS_UNREVIEWED.inc()
                raise Unauthenticated("too many refused tokens from this address: not checked for a few seconds")
            try:
                identity = await self._review(token)
            except Unavailable:
                self._refund(address)  # not the caller's fault
                raise
            now = self.clock()
            if identity is not None:
                self._refund(address)
                expiry = token_expiry(token)
                until = min(now + REVIEW_AGAIN, expiry - EXPIRY_MARGIN if expiry is not None else now + REVIEW_AGAIN)
            else:
                until = now + REFUSED_FOR
            cached = (until, identity)
            self._remember(digest, cached, now)
        if cached[1] is None:
            raise Unauthenticated("the token was not accepted for audience " + self.audience)
        return cached[1]

    def _may_review(self, address: str, now: float) -> bool:
        """Take one review from the address's allowance (a leaky bucket of refusals)."""
        left, at = self._peers.get(address, (float(PEER_BURST), now))
        left = min(float(PEER_BURST), left + (now - at) / PEER_REFILL)
        if left < 1.0:
            self._peers[address] = (left, now)
            return False
        if address not in self._peers and len(self._peers) >= CACHE_MAX:
            # Forget the addresses whose allowance is whole again; a flood of addresses, all of them.
            self._peers = {a: (n, t) for a, (n, t) in self._peers.items() if n + (now - t) / PEER_REFILL < PEER_BURST}
            if len(self._peers) >= CACHE_MAX:
                self._peers.clear()
        self._peers[address] = (left - 1.0, now)
        return True

    def _refund(self, address: str) -> None:
        if address in self._peers:
            left, at = self._peers[address]
            self._peers[address] = (min(float(PEER_BURST), left + 1.0), at)

    def _remember(self, digest: str, entry: tuple[float, Identity | None], now: float) -> None:
        if entry[0] <= now:
            return  # about to expire: reviewed again next time
        if len(self._cache) >= CACHE_MAX:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
        self._cache[digest] = entry

    async def _review(self, token: str) -> Identity | None:
        try:
            review = await call(self.api.create_token_review(
                V1TokenReview(spec=V1TokenReviewSpec(token=token, audiences=[self.audience]))))
        except ApiError as exc:
            metrics.TOKEN_REVIEWS.labels("error").inc()
            raise Unavailable(f"TokenReview failed: {exc}") from None
        status = review.status
        if not status or not status.authenticated or not status.user:
            metrics.TOKEN_REVIEWS.labels("refused").inc()
            return None
        metrics.TOKEN_REVIEWS.labels("accepted").inc()
        nodes = (status.user.extra or {}).get(NODE_EXTRA) or [""]
        return Identity(status.user.username or "", nodes[0])

    def authorize(self, identity: Identity, node: str) -> None:
        if identity.username != self.expected:
            raise PermissionDenied(f"{identity.username} is not the agent service account {self.expected}")
        if not identity.node:
            raise PermissionDenied("the token is not bound to a node (use a projected, pod-bound token)")
        if identity.node != node:
            raise PermissionDenied(f"the token is bound to node {identity.node}, the batch claims {node}")
