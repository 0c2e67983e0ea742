"""How many TokenReviews the operator makes, and how many lines its refusals log: few, whoever calls.

Pure: the Authenticator over a stand-in for the API's TokenReview endpoint and a clock of the
test's own; the serving side's Tally on its own. The same against a real operator and API server
is in test_strangers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from typing import Any

import pytest
from kubernetes_asyncio.client import V1TokenReview, V1TokenReviewStatus, V1UserInfo
from kubernetes_asyncio.client.exceptions import ApiException

from flowmap_operator.auth import (EXPIRY_MARGIN, NODE_EXTRA, PEER_BURST, PEER_REFILL, REFUSED_FOR, REVIEW_AGAIN,
                                   Authenticator, peer_address, token_expiry)
from flowmap_operator.errors import Unauthenticated, Unavailable
from flowmap_operator.serving import Tally

AGENT = "system:serviceaccount:flowmap-system:flowmap-agent"


def jwt(exp: float) -> str:
    payload = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJSUzI1NiJ9.{payload}.{secrets.token_urlsafe(16)}"


class Reviews:
    """The TokenReview endpoint: accepts the tokens it was given, counts every review."""

    def __init__(self, *good: str) -> None:
        self.good, self.made, self.down = set(good), 0, False

    async def create_token_review(self, body: V1TokenReview) -> V1TokenReview:
        self.made += 1
        if self.down:
            raise ApiException(status=503, reason="Service Unavailable")
        if body.spec.token not in self.good:
            return V1TokenReview(spec=body.spec, status=V1TokenReviewStatus(authenticated=False))
        return V1TokenReview(spec=body.spec, status=V1TokenReviewStatus(authenticated=True, user=V1UserInfo(
            username=AGENT, extra={NODE_EXTRA: ["node-a"]})))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def authenticator(reviews: Reviews, clock: Clock) -> Authenticator:
    return Authenticator(reviews, namespace="flowmap-system", service_account="flowmap-agent",  # type: ignore[arg-type]
                         audience="flowmap", clock=clock)


def identify(auth: Authenticator, token: str, peer: str = "ipv4:10.0.0.1:40000") -> Any:
    return asyncio.run(auth.identify((("authorization", f"Bearer {token}"),), peer))


def test_peer_address_and_token_expiry() -> None:
    assert peer_address("ipv4:10.0.0.1:40000") == "ipv4:10.0.0.1"
    assert peer_address("ipv6:[fd00::1]:40000") == "ipv6:[fd00::1]"
    assert peer_address("unix:/run/x.sock") == "unix:/run/x.sock"
    assert token_expiry(jwt(1234.0)) == 1234.0
    assert token_expiry("not-a-jwt") is None and token_expiry("a.%%%.c") is None and token_expiry("a.bnVsbA.c") is None


def test_an_accepted_token_is_reviewed_again_only_shortly_before_it_expires() -> None:
    clock = Clock()
    soon, later = jwt(clock.now + 300), jwt(clock.now + 7200)
    reviews = Reviews(soon, later)
    auth = authenticator(reviews, clock)
    assert identify(auth, soon).node == "node-a" and identify(auth, later).node == "node-a"
    clock.now += 300 - EXPIRY_MARGIN - 1
    identify(auth, soon)
    identify(auth, later)
    assert reviews.made == 2
    clock.now += 2  # within the margin of its expiry: reviewed again (the API server says whether it still holds)
    identify(auth, soon)
    assert reviews.made == 3
    clock.now += REVIEW_AGAIN  # a token bound to a deleted pod stops working within this
    identify(auth, later)
    assert reviews.made == 4


def test_random_tokens_from_one_address_cost_a_handful_of_reviews() -> None:
    clock = Clock()
    good = jwt(clock.now + 3600)
    reviews = Reviews(good)
    auth = authenticator(reviews, clock)
    identify(auth, good)  # the agent's token, known before the flood
    for _ in range(3000):
        with pytest.raises(Unauthenticated):
            identify(auth, secrets.token_urlsafe(40))
    assert reviews.made == 1 + PEER_BURST
    assert identify(auth, good).node == "node-a"  # a token already accepted works on
    with pytest.raises(Unauthenticated, match="not checked"):
        identify(auth, jwt(clock.now + 3600))  # a new one waits for the address's allowance
    assert reviews.made == 1 + PEER_BURST
    with pytest.raises(Unauthenticated, match="not accepted"):
        identify(auth, secrets.token_urlsafe(40), peer="ipv4:10.0.0.2:40000")  # another address has its own
    clock.now += PEER_REFILL
    with pytest.raises(Unauthenticated, match="not accepted"):
        identify(auth, secrets.token_urlsafe(40), peer="ipv4:10.0.0.1:50000")  # one more review, from a new port too
    assert reviews.made == 1 + PEER_BURST + 2


def test_a_refused_token_is_remembered_and_an_api_outage_is_nobodys_fault() -> None:
    clock = Clock()
    good = jwt(clock.now + 3600)
    reviews = Reviews(good)
    auth = authenticator(reviews, clock)
    for _ in range(10):
        with pytest.raises(Unauthenticated):
            identify(auth, "the-same-bad-token")
    assert reviews.made == 1
    clock.now += REFUSED_FOR + 1
    with pytest.raises(Unauthenticated):
        identify(auth, "the-same-bad-token")
    assert reviews.made == 2
    reviews.down = True
    for _ in range(2 * PEER_BURST):
        with pytest.raises(Unavailable):
            identify(auth, good)
    reviews.down = False
    assert identify(auth, good).node == "node-a"  # the outage used none of the address's allowance


def test_refusals_are_logged_as_a_count_per_interval() -> None:
    tally = Tally(interval=10.0)
    assert tally.note("unauthenticated", "no token", 100.0) == ["refused (unauthenticated): no token"]
    for i in range(2999):
        assert tally.note("unauthenticated", f"token {i}", 100.0 + i / 1000) == []
    assert tally.note("malformed", "not protobuf", 105.0) == []
    lines = tally.note("unauthenticated", "again", 111.0)
    assert lines == ["refused 3000 more in 10 s (unauthenticated 2999, malformed 1); latest: "
                     "unauthenticated: token 2998; malformed: not protobuf", "refused (unauthenticated): again"]
    assert tally.summary() == []
