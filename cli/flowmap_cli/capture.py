"""``flowmap capture``: start, watch, list, stop, delete PacketCaptures and get their files.

    flowmap capture start NAME (--group G ... | --selector k=v,...) [filter flags] [bounds] [--wait [-o FILE]]
    flowmap capture list | stop NAME | delete NAME
    flowmap capture get NAME -o FILE|- [--node N]

With the user's own credentials and nothing else: the kubeconfig (``--kubeconfig``, ``--context``,
``-n`` defaulting to the context's namespace) through the ``kubernetes`` client, for the objects
and for the files, which the operator's results API (``results.flowmap.dev``, aggregated behind
the API server) serves to whoever RBAC lets ``get packetcaptures/pcapng``. The pure parts are in
flowmap_cli.captures. Any failure is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from flowmap_cli import captures
from flowmap_cli.captures import GROUP, PLURAL, RESULTS_GROUP, VERSION, clean
from flowmap_cli.kube import ClusterError, Source
from flowmap_operator.capturing import FINISHED
from flowmap_operator.times import parse_iso

CHUNK = 64 * 1024  # bytes read and written at a time: a download never sits in memory whole
TIMEOUT = (10, 60)  # seconds to connect, to wait for each answer (or each chunk of the file)
POLL = 1.0  # seconds between two reads of a capture that --wait follows


class Failed(RuntimeError):
    """One line for the user; exit code 1."""


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """An API call, its refusal turned into the API server's own words."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, _request_timeout=TIMEOUT, **kwargs)
    except ApiException as exc:
        if exc.status == 0:  # the client's own: TLS and the like
            raise Failed(f"{what}: {clean(exc.reason, 300)}") from None
        raise Failed(captures.explain(exc.status, exc.body)) from None  # its message names the object
    except (HTTPError, OSError) as exc:
        raise Failed(f"{what}: cannot reach the API server: {clean(exc, 300)}") from None


class Session:
    """The cluster as one command sees it: its API client, the custom objects, its namespace."""

    def __init__(self, args: argparse.Namespace) -> None:
        source = Source(args.kubeconfig, args.context)
        self.namespace: str = args.namespace or source.namespace()
        self.api = source.api_client()
        from kubernetes import client

        self.objects = client.CustomObjectsApi(self.api)

    def read(self, name: str) -> dict[str, Any]:
        got: dict[str, Any] = _call(f"cannot read PacketCapture {clean(name)}", self.objects.get_namespaced_custom_object,
                                    GROUP, VERSION, self.namespace, PLURAL, name)
        return got

    def results(self, name: str, node: str | None) -> Any:
        """The files of capture ``name`` (of ``node`` alone, if given), as an unread HTTP answer."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        path = (f"/apis/{RESULTS_GROUP}/{VERSION}/namespaces/{quote(self.namespace, safe='')}/{PLURAL}/"
                f"{quote(name, safe='')}/pcapng")
        query = [("node", node)] if node is not None else []
        what = f"cannot get the files of {clean(name)}"
        try:
            if hasattr(self.api, "param_serialize"):  # the client generated since openapi-generator 7
                request = self.api.param_serialize("GET", path, query_params=query, auth_settings=["BearerToken"])
                raw = self.api.call_api(*request, _request_timeout=TIMEOUT).response
            else:  # the older python-legacy client: raises on an error answer, the body read
                raw = self.api.call_api(path, "GET", query_params=query, auth_settings=["BearerToken"],
                                        _preload_content=False, _request_timeout=TIMEOUT)
        except ApiException as exc:
            raise Failed(f"{what}: {captures.explain(exc.status, exc.body, results=True)}") from None
        except (HTTPError, OSError) as exc:
            raise Failed(f"{what}: cannot reach the API server: {clean(exc, 300)}") from None
        if not 200 <= raw.status <= 299:
            answer = raw.read(captures.MAX_ERROR_BODY)
            raw.release_conn()
            raise Failed(f"{what}: {captures.explain(raw.status, answer, results=True)}")
        return raw


# -- subcommands -------------------------------------------------------------------------------------


def _start(args: argparse.Namespace) -> int:
    session = Session(args)
    spec = captures.spec(args)
    _call(f"cannot create PacketCapture {clean(args.name)}", session.objects.create_namespaced_custom_object,
          GROUP, VERSION, session.namespace, PLURAL, captures.body(args.name, spec))
    print(f"packetcapture {clean(args.name)} created in {clean(session.namespace)}", file=sys.stderr)
    if not args.wait:
        return 0
    status = _follow(session, args.name)
    print(f"{clean(args.name)}: {captures.outcome(status)}", file=sys.stderr)
    if args.output is None:
        return 0 if status.get("phase") != "Failed" else 1
    return _get_files(session, args.name, args.output, None, status)


def _follow(session: Session, name: str, *, poll: float = POLL) -> dict[str, Any]:
    """Show the capture's progress until it finishes (on a terminal, one line rewritten; else one
    line per change); returns its last status."""
    tty = sys.stderr.isatty()
    shown = ""
    try:
        while True:
            status = session.read(name).get("status") or {}
            line = captures.progress(status)
            if line != shown:
                if tty:
                    width = os.get_terminal_size(sys.stderr.fileno()).columns
                    sys.stderr.write("\r\x1b[K" + line[:max(20, width - 1)])
                else:
                    sys.stderr.write(line + "\n")
                sys.stderr.flush()
                shown = line
            if status.get("phase") in FINISHED:
                if tty:
                    sys.stderr.write("\n")
                return dict(status)
            time.sleep(poll)
    except KeyboardInterrupt:
        raise Failed(f"stopped waiting; {clean(name)} goes on (flowmap capture stop {clean(name)} ends it)") from None


def _list(args: argparse.Namespace) -> int:
    session = Session(args)
    got = _call("cannot list PacketCaptures", session.objects.list_namespaced_custom_object,
                GROUP, VERSION, session.namespace, PLURAL)
    items = sorted(got.get("items") or [], key=lambda o: str((o.get("metadata") or {}).get("name", "")))
    if not items:
        print(f"no PacketCaptures in {clean(session.namespace)}", file=sys.stderr)
        return 0
    now = time.time()
    rows = []
    for obj in items:
        created = (obj.get("metadata") or {}).get("creationTimestamp")
        rows.append(captures.row(obj, now, parse_iso(created) if created else None))
    print("\n".join(captures.table(rows)))
    return 0


def _stop(args: argparse.Namespace) -> int:
    session = Session(args)
    got = _call(f"cannot stop {clean(args.name)}", session.objects.patch_namespaced_custom_object,
                GROUP, VERSION, session.namespace, PLURAL, args.name, captures.stop_patch(),
                _content_type="application/merge-patch+json")
    phase = (got.get("status") or {}).get("phase") or "Pending"
    if phase in FINISHED:
        print(f"{clean(args.name)} had already finished ({clean(phase)}): nothing to stop", file=sys.stderr)
    else:
        print(f"{clean(args.name)} stopping: its nodes close their files, which are kept "
              f"(flowmap capture get {clean(args.name)} -o FILE)", file=sys.stderr)
    return 0


def _delete(args: argparse.Namespace) -> int:
    session = Session(args)
    _call(f"cannot delete {clean(args.name)}", session.objects.delete_namespaced_custom_object,
          GROUP, VERSION, session.namespace, PLURAL, args.name)
    print(f"packetcapture {clean(args.name)} deleted (its files go from the nodes)", file=sys.stderr)
    return 0


def _get(args: argparse.Namespace) -> int:
    session = Session(args)
    return _get_files(session, args.name, args.output, args.node, None)


def _get_files(session: Session, name: str, output: str, node: str | None,
               status: dict[str, Any] | None) -> int:
    """Download, check each node's part against the status, and only then put it under ``output``."""
    from urllib3.exceptions import HTTPError

    status = status if status is not None else session.read(name).get("status") or {}
    expected = captures.parts(status, node)
    if not expected:
        which = f"node {clean(node)} has" if node is not None else "no node has"
        raise Failed(f"{which} a finished file of {clean(name)} yet (phase {clean(status.get('phase') or 'Pending')})")
    raw = session.results(name, node)
    with _destination(output) as (out, path):
        checker = captures.Checker(expected)
        try:
            for chunk in raw.stream(CHUNK):
                out.write(chunk)
                checker.feed(chunk)
        except (HTTPError, OSError) as exc:  # the connection, or the disk
            raise Failed(f"the download of {clean(name)} broke off: {clean(exc, 300)}") from None
        finally:
            raw.release_conn()
        out.flush()
        verdict = checker.done()
        if not verdict.ok and path is not None:
            # A node may have finished between the status read and the download: read it again.
            again = captures.parts(session.read(name).get("status") or {}, node)
            if again != expected:
                with open(path, "rb") as f:
                    verdict = captures.check(again, iter(lambda: f.read(CHUNK), b""))
        for line in verdict.lines():
            print(line, file=sys.stderr)
        if not verdict.ok:
            raise Failed(f"the files of {clean(name)} are not those its status names: nothing written")
    shown = "stdout" if output == "-" else clean(output)
    print(f"{len(verdict.parts)} node files, {captures.human(sum(verdict.got))}, written to {shown}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _destination(output: str) -> Iterator[tuple[IO[bytes], str | None]]:
    """stdout, or a temporary file beside ``output`` renamed to it only when the body completes:
    a failure leaves nothing under ``output``. The file is the user's alone (0600, mkstemp's):
    packets carry payload."""
    if output == "-":
        yield sys.stdout.buffer, None
        return
    target = Path(output)
    fd, temp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=f".{target.name}.",
                                suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out, temp
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def run(args: argparse.Namespace) -> int:
    try:
        result: int = args.action(args)
        return result
    except (Failed, ClusterError) as exc:
        print(f"flowmap capture: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"flowmap capture: {clean(exc, 300)}", file=sys.stderr)
        return 1


# -- flags -------------------------------------------------------------------------------------------


def _argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    wrapped.__name__ = parse.__name__  # argparse names the type in its message
    return wrapped


def register(parser: argparse.ArgumentParser) -> None:
    """``flowmap capture start|list|stop|delete|get``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", help="the captures' namespace (default: the context's)")
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    common.add_argument("--context", help="kubeconfig context (default: the current one)")
    sub = parser.add_subparsers(dest="action_name", required=True, metavar="ACTION")

    start = sub.add_parser("start", parents=[common], help="create a PacketCapture (and follow it with --wait)",
                           description="Create a PacketCapture from flags. The filter flags make one filter "
                                       "(a packet must match all of them); for several filters, or a "
                                       "matchExpressions selector, write the PacketCapture in a manifest "
                                       "(manifests/samples/packetcapture.yaml) and kubectl apply it. The API "
                                       "server checks the spec: a refusal names the field.")
    start.add_argument("name", metavar="NAME")
    targets = start.add_argument_group("targets (of the namespace; both: the union)")
    targets.add_argument("--group", action="append", metavar="G",
                         help="a workload of the namespace (its Group <namespace>.G); repeat for more")
    targets.add_argument("--selector", type=_argtype(captures.labels), metavar="k=v,...",
                         help="pods with these labels (podSelector.matchLabels); '' selects every pod")
    one = start.add_argument_group("filter (one; absent: every packet of the targets)")
    one.add_argument("--peer-group", metavar="G", help="the other end is a pod of workload G of the namespace")
    one.add_argument("--peer-cidr", metavar="CIDR", help="the other end is in CIDR (10.0.0.0/8, 2001:db8::/48)")
    one.add_argument("--port", type=int, help="either end's port (needs --protocol TCP, UDP or SCTP)")
    one.add_argument("--protocol", metavar="P", help="TCP, UDP, ICMP or SCTP")
    one.add_argument("--direction", metavar="D", help="Ingress (to the target), Egress (from it) or Both")
    bounds = start.add_argument_group("bounds")
    bounds.add_argument("--duration", type=_argtype(captures.seconds), metavar="T",
                        help="how long it captures, after the trigger if any (30, 90s, 5m; default 60 s, at most 10 m)")
    bounds.add_argument("--max-bytes", type=_argtype(captures.size), metavar="SIZE",
                        help="file size per node (512Ki, 4Mi; default 1 MiB, at most 100 MiB)")
    bounds.add_argument("--max-packets", type=int, metavar="N", help="packets per node (default 10000)")
    snap = bounds.add_mutually_exclusive_group()
    snap.add_argument("--snap-length", type=int, metavar="BYTES", help="bytes kept of each packet (default 128)")
    snap.add_argument("--whole-packets", action="store_true", help="keep whole packets (up to 256 KiB each)")
    bounds.add_argument("--ttl", type=_argtype(captures.seconds), metavar="T",
                        help="the files are removed this long after it finished (default 1h, at most 7d)")
    trigger = start.add_argument_group("trigger")
    trigger.add_argument("--trigger", metavar="ON", help="wait for Denied, Violation or Threat on a target's edge")
    trigger.add_argument("--pre-trigger", type=_argtype(captures.seconds), metavar="SECONDS",
                         help="with --trigger: the seconds before it kept in the file (default 5, at most 30)")
    start.add_argument("--wait", action="store_true", help="show its progress until it completes or fails")
    start.add_argument("-o", "--output", metavar="FILE", help="with --wait: then get its files into FILE (- for stdout)")
    start.set_defaults(action=_start_checked)

    sub.add_parser("list", parents=[common], help="the namespace's PacketCaptures").set_defaults(action=_list)
    for verb, helped, action in (("stop", "end a capture now; its files are kept", _stop),
                                 ("delete", "delete a capture; its files go from the nodes", _delete)):
        p = sub.add_parser(verb, parents=[common], help=helped)
        p.add_argument("name", metavar="NAME")
        p.set_defaults(action=action)
    get = sub.add_parser("get", parents=[common], help="download a capture's files (one pcapng section per node)")
    get.add_argument("name", metavar="NAME")
    get.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write them (- for stdout)")
    get.add_argument("--node", metavar="N", help="only node N's file")
    get.set_defaults(action=_get)
    parser.set_defaults(func=run)


def _start_checked(args: argparse.Namespace) -> int:
    if args.output is not None and not args.wait:
        raise Failed("-o needs --wait (or use flowmap capture get NAME -o FILE once it has finished)")
    return _start(args)
