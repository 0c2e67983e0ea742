"""Agents authenticate with a projected ServiceAccount token, checked by TokenReview.

The token must be the agent ServiceAccount's, for the ``flowmap`` audience, and bound to the node
the batch claims (Kubernetes puts the node of a pod-bound or node-bound token in the review's
``authentication.kubernetes.io/node-name`` extra). Reviews are cached briefly by token hash so
that a thousand agents reporting every second do not cost a thousand TokenReviews a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass

import aiohttp
from kubernetes_asyncio.client import AuthenticationV1Api, V1TokenReview, V1TokenReviewSpec
from kubernetes_asyncio.client.exceptions import ApiException

from flowmap_operator.errors import PermissionDenied, Unauthenticated, Unavailable

NODE_EXTRA = "authentication.kubernetes.io/node-name"
CACHE_SECONDS = 60.0
CACHE_MAX = 10_000


@dataclass(frozen=True)
class Identity:
    username: str
    node: str


class Authenticator:
    def __init__(self, api: AuthenticationV1Api, *, namespace: str, service_account: str, audience: str) -> None:
        self.api = api
        self.expected = f"system:serviceaccount:{namespace}:{service_account}"
        self.audience = audience
        self._cache: dict[str, tuple[float, Identity | None]] = {}

    async def identify(self, metadata: tuple[tuple[str, str | bytes], ...]) -> Identity:
        token = next((v for k, v in metadata if k == "authorization"), None)
        if not isinstance(token, str) or not token.startswith("Bearer ") or len(token) > 16384:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        token = token.removeprefix("Bearer ").strip()
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is None or cached[0] < now:
            cached = (now + CACHE_SECONDS, await self._review(token))
            if len(self._cache) >= CACHE_MAX:
                self._cache = {k: v for k, v in self._cache.items() if v[0] >= now}
                if len(self._cache) >= CACHE_MAX:
                    self._cache.clear()
            self._cache[digest] = cached
        if cached[1] is None:
            raise Unauthenticated("the token was not accepted for audience " + self.audience)
        return cached[1]

    async def _review(self, token: str) -> Identity | None:
        try:
            review = await self.api.create_token_review(
                V1TokenReview(spec=V1TokenReviewSpec(token=token, audiences=[self.audience])))
        except ApiException as exc:
            raise Unavailable(f"TokenReview failed: {exc.status} {exc.reason}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise Unavailable(f"TokenReview failed: {exc}") from None
        status = review.status
        if not status or not status.authenticated or not status.user:
            return None
        nodes = (status.user.extra or {}).get(NODE_EXTRA) or [""]
        return Identity(status.user.username or "", nodes[0])

    def authorize(self, identity: Identity, node: str) -> None:
        if identity.username != self.expected:
            raise PermissionDenied(f"{identity.username} is not the agent service account {self.expected}")
        if not identity.node:
            raise PermissionDenied("the token is not bound to a node (use a projected, pod-bound token)")
        if identity.node != node:
            raise PermissionDenied(f"the token is bound to node {identity.node}, the batch claims {node}")
