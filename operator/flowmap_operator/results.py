"""The edge of ``results.flowmap.dev``: an HTTPS server behind the API server's aggregation layer.

What it decides is :mod:`flowmap_operator.retrieval`'s; here are the sockets. The TLS server
requires a client certificate signed by the API server's front-proxy CA (read from
``kube-system/extension-apiserver-authentication``, again every ``REFRESH`` seconds, as its
serving certificate is), so a request reaches a handler only through the API server, which has
authenticated and authorised the user already; the handler asks again with a
SubjectAccessReview, then streams the nodes' files from their agents
(:class:`flowmap_operator.uploading.Uploads`) without holding them.

Only the leader holds the agents' streams: a follower answers 503 and the client tries again.
With the operator's own certificate (``FLOWMAP_OPERATOR_GRPC_TLS_SECRET``) it also keeps the
APIService's ``caBundle`` (``FLOWMAP_OPERATOR_RESULTS_APISERVICE``): nothing is shipped.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from kubernetes_asyncio import client

from flowmap_api.pacing import pause
from flowmap_operator import retrieval
from flowmap_operator.errors import ApiError
from flowmap_operator.kubeapi import call
from flowmap_operator.recording import CaptureHub
from flowmap_operator.retrieval import Caller, FrontProxy, NodeFile
from flowmap_operator.uploading import FetchesBusy, UploadFailed, Uploads

log = logging.getLogger("flowmap.operator.results")
AUTHENTICATION = ("kube-system", "extension-apiserver-authentication")
REFRESH = 600.0  # seconds between looks at the front proxy's CA and the serving certificate

Material = Callable[[], tuple[bytes, bytes, bytes | None]]  # serving certificate, key, its CA (None: not ours)


def _load(context: ssl.SSLContext, cert: bytes, key: bytes, proxy: FrontProxy) -> None:
    """Serve ``cert``; admit clients with a certificate of the front proxy's CA (a rotated CA is
    added to the one before). A running server's next handshake takes them."""
    with tempfile.TemporaryDirectory() as folder:  # load_cert_chain reads files only
        cert_file, key_file = Path(folder, "tls.crt"), Path(folder, "tls.key")
        key_file.touch(0o600)
        key_file.write_bytes(key)
        cert_file.write_bytes(cert)
        context.load_cert_chain(cert_file, key_file)
    context.load_verify_locations(cadata=proxy.client_ca)


def _common_name(peercert: Any) -> str:
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(retrieval.error(code, reason, message), status=code)


class ResultServer:
    """Serves ``packetcaptures/pcapng`` of the captures the hub knows, from the nodes' agents."""

    def __init__(self, hub: CaptureHub, uploads: Uploads, api: client.ApiClient, is_leader: Callable[[], bool],
                 material: Material, apiservice: str = "") -> None:
        self.hub, self.uploads, self.is_leader, self.material = hub, uploads, is_leader, material
        self.core, self.authz = client.CoreV1Api(api), client.AuthorizationV1Api(api)
        self.registration = client.ApiregistrationV1Api(api)
        self.apiservice = apiservice
        self.proxy: FrontProxy | None = None
        self.context: ssl.SSLContext | None = None
        self._runner: web.AppRunner | None = None
        self._served: tuple[bytes, str] | None = None  # (certificate, front-proxy CA) in the context

    async def start(self, port: int) -> bool:
        """Listen on ``port``; False (and a log line saying why) when the API server has no front proxy."""
        try:
            await self._refresh()
        except (ValueError, ApiError, OSError) as exc:
            why = f"{exc} reading {'/'.join(AUTHENTICATION)}" if isinstance(exc, ApiError) else exc
            log.error("results.flowmap.dev is not served, so `flowmap capture get` cannot work: %s", why)
            return False
        app = web.Application()
        app.router.add_route("GET", "/{path:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, port=port, ssl_context=self.context).start()
        log.info("serving results.flowmap.dev on :%d", port)
        return True

    async def keep(self, stop: asyncio.Event) -> None:
        """Take a new front-proxy CA or serving certificate every REFRESH seconds until ``stop``."""
        while not await pause(stop, REFRESH):
            try:
                await self._refresh()
            except (ValueError, ApiError, OSError) as exc:
                log.warning("results.flowmap.dev keeps its TLS as it is: %s", exc)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _refresh(self) -> None:
        body = await call(self.core.read_namespaced_config_map(AUTHENTICATION[1], AUTHENTICATION[0]))
        proxy = FrontProxy.from_configmap(body.data or {})
        cert, key, ca = self.material()
        if self._served != (cert, proxy.client_ca):
            if self.context is None:
                self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                self.context.verify_mode = ssl.CERT_REQUIRED
            _load(self.context, cert, key, proxy)
            self._served = (cert, proxy.client_ca)
        self.proxy = proxy
        if ca is not None and self.apiservice:
            await self._register(ca)

    async def _register(self, ca: bytes) -> None:
        """Make the APIService trust the operator's CA (its caBundle), when it does not yet."""
        bundle = base64.b64encode(ca).decode()
        try:
            current = await call(self.registration.read_api_service(self.apiservice))
            if current.spec.ca_bundle == bundle:
                return
            await call(self.registration.patch_api_service(self.apiservice, {"spec": {"caBundle": bundle}}))
            log.info("APIService %s trusts the operator's CA", self.apiservice)
        except ApiError as exc:
            log.warning("APIService %s not updated (%s): install manifests/operator/apiservice.yaml",
                        self.apiservice, exc)

    # -- requests ----------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        proxy = self.proxy
        assert proxy is not None
        who = retrieval.caller(proxy, _common_name(request.transport and request.transport.get_extra_info("peercert")),
                               list(request.headers.items()))
        document = retrieval.discovery(request.path)
        if document is not None:
            return web.json_response(document)
        found = retrieval.target(request.path)
        if found is None:
            return _status(404, "NotFound", f"no such path in {retrieval.GROUP}: {request.path[:200]}")
        if isinstance(who, str):
            return _status(401, "Unauthorized", who)
        namespace, name = found
        denied = await self._authorize(who, namespace, name)
        if denied is not None:
            return denied
        if not self.is_leader():
            return _status(503, "ServiceUnavailable", "this operator replica is not the leader: try again")
        capture = self.hub.captures.get((namespace, name))
        if capture is None:
            return _status(404, "NotFound", f'packetcaptures.flowmap.dev "{name}" not found')
        node = request.query.get("node")
        chosen = retrieval.files(capture.status, node)
        if isinstance(chosen, str):
            return _status(404, "NotFound", chosen) if node is not None else _status(409, "Conflict", chosen)
        return await self._send(request, who, capture.id, chosen)

    async def _authorize(self, who: Caller, namespace: str, name: str) -> web.Response | None:
        try:
            answer = await call(self.authz.create_subject_access_review(
                retrieval.review(who, namespace, name)))  # type: ignore[arg-type]  # a dict goes as it is
        except ApiError as exc:
            log.warning("SubjectAccessReview failed: %s", exc)
            return _status(503, "ServiceUnavailable", "the API server could not be asked whether you may read it")
        if not answer.status.allowed:
            why = f": {answer.status.reason}" if answer.status.reason else ""
            return _status(403, "Forbidden", f'{retrieval.RESOURCE}.{retrieval.GROUP} "{name}" is forbidden: '
                                             f'User "{who.user}" cannot get resource "{retrieval.RESOURCE}/'
                                             f'{retrieval.SUBRESOURCE}" in API group "{retrieval.GROUP}" in the '
                                             f'namespace "{namespace}"{why}')
        return None

    async def _send(self, request: web.Request, who: Caller, capture_id: str,
                    chosen: list[NodeFile]) -> web.StreamResponse:
        streams = [self.uploads.fetch(f.node, capture_id, f.size, f.sha256) for f in chosen]
        # The first bytes before the answer: a node that cannot send is a clear error, not a cut file.
        try:
            first = await anext(streams[0], b"")
        except FetchesBusy as exc:  # nothing wrong with the file: the client asks again shortly
            await _close(streams)
            return _status(503, "ServiceUnavailable", f"{chosen[0].node}: {exc}")
        except UploadFailed as exc:
            await _close(streams)
            return _status(502, "BadGateway", f"{chosen[0].node}: {exc}")
        namespace, name, _ = capture_id.split("/", 2)
        response = web.StreamResponse(headers={
            "Content-Type": retrieval.MEDIA_TYPE, "Content-Length": str(sum(f.size for f in chosen)),
            "Content-Disposition": f'attachment; filename="{namespace}_{name}.pcapng"',
            "X-Flowmap-Nodes": json.dumps([[f.node, f.size, f.sha256] for f in chosen])})
        await response.prepare(request)
        sent = 0
        try:
            await response.write(first)
            sent += len(first)
            for stream in streams:  # the first goes on after its first chunk
                async for chunk in stream:
                    await response.write(chunk)
                    sent += len(chunk)
        except UploadFailed as exc:
            # The status line is out: cut the connection, so that the client sees a short file.
            log.warning("%r's read of %s stopped after %d bytes: %s", who.user[:256], capture_id, sent, exc)
            if request.transport is not None:
                request.transport.close()
            return response
        except ConnectionError:
            log.info("%r went away after %d bytes of %s", who.user[:256], sent, capture_id)
            return response
        finally:
            await _close(streams)
        await response.write_eof()
        log.info("%r read %s: %d bytes from %s", who.user[:256], capture_id, sent, ", ".join(f.node for f in chosen))
        return response


async def _close(streams: list[AsyncIterator[bytes]]) -> None:
    """End the fetches (each withdraws its request from its node)."""
    for stream in streams:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
