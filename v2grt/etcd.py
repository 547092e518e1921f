"""A small etcd v3 client over etcd's JSON gateway (``/v3/...``): leases and the leader-key transaction.

Only what leadership needs (docs/ha.md): grant, keep-alive and revoke a lease; create a key with a lease
if it is absent, else read it; read and delete a key. One HTTP/1.1 request per call on a fresh
connection, each with its own timeout, so a hung etcd member costs one timeout and never a stuck
socket; the caller records when it SENT a keep-alive (the lease's validity counts from then).
Int64s travel as JSON strings, keys and values as base64 (etcd's gRPC-gateway encoding).
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import ssl
import time
import urllib.parse


class EtcdError(RuntimeError):
    """No endpoint answered, or an endpoint answered with an error; the message names the endpoint."""


class _EndpointFailed(Exception):
    """One endpoint gave no usable answer (HTTP status other than 200): the client tries the next one."""


@dataclasses.dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int


#: The most keys a campaign reads under its prefix (the candidates: a fleet has a few aggregators); a bound on the
#: work of each poll whatever else is written there.
MAX_UNDER_PREFIX = 64


@dataclasses.dataclass(frozen=True)
class Campaign:
    """What one campaign transaction found: created (we hold the key now) or the holder, plus the extra reads."""

    created: bool
    holder: KeyValue | None
    also: dict[str, KeyValue | None]
    under_prefix: list[KeyValue]
    revision: int  # the store's revision when the transaction ran


def tls_context(ca_file: str | None = None, cert_file: str | None = None,
                key_file: str | None = None) -> ssl.SSLContext:
    """A client context for etcd over TLS: trusts ``ca_file`` (None: the system's CAs), presents ``cert_file`` and
    ``key_file`` when given (etcd's ``--client-cert-auth``). ValueError names the file that cannot be used."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"etcd TLS: CA file {ca_file!r} cannot be used: {exc}") from None
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"etcd TLS: client certificate {cert_file!r} with key {key_file!r} cannot be used: "
                             f"{exc}") from None
    return context


def _prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with ``prefix`` (its last byte plus one)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _kv(raw: dict) -> KeyValue:
    return KeyValue(key=base64.b64decode(raw.get("key", "")).decode(errors="replace"),
                    value=base64.b64decode(raw.get("value", "")).decode(errors="replace"),
                    create_revision=int(raw.get("create_revision", 0)),
                    mod_revision=int(raw.get("mod_revision", 0)), lease=int(raw.get("lease", 0)))


class EtcdClient:
    """etcd's v3 JSON gateway at one or more client URLs (``http://host:port``), tried in turn.

    A call moves on to the next endpoint when one fails at the transport or HTTP level (refused,
    timeout, a reply that is not JSON, any status but 200: a partitioned member answers 503 "etcdserver:
    no leader" while the others have quorum); it raises EtcdError, naming each endpoint and its error,
    only when every endpoint failed. An error inside a 200 reply is etcd's answer and is raised at
    once. The endpoint that last answered is tried first next time. Not thread-safe by design: one
    owner (the elector thread).
    """

    def __init__(self, endpoints: list[str], timeout_s: float = 0.5, ssl_context: ssl.SSLContext | None = None):
        if not endpoints:
            raise ValueError("EtcdClient: no etcd endpoints given (expected http://host:port URLs)")
        self.endpoints: list[tuple[str, int, str]] = []
        for url in endpoints:
            u = urllib.parse.urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname or not u.port:
                raise ValueError(f"etcd endpoint {url!r}: expected http://host:port or https://host:port (the v3 "
                                 "JSON gateway)")
            self.endpoints.append((u.hostname, u.port, url))
        if len({url.split(":", 1)[0] for _h, _p, url in self.endpoints}) > 1:
            raise ValueError(f"etcd endpoints {endpoints!r}: mix http:// and https://; expected one scheme")
        self.tls = self.endpoints[0][2].startswith("https:")
        #: https: this context (tls_context: the CA, a client certificate); None: the system's default
        self.ssl_context = (ssl_context or ssl.create_default_context()) if self.tls else None
        self.timeout_s = timeout_s
        self._first = 0

    def _connect(self, host: str, port: int, timeout_s: float) -> http.client.HTTPConnection:
        if self.tls:
            return http.client.HTTPSConnection(host, port, timeout=timeout_s, context=self.ssl_context)
        return http.client.HTTPConnection(host, port, timeout=timeout_s)

    def call(self, path: str, body: dict, timeout_s: float | None = None) -> dict:
        """POST ``body`` to ``/v3/<path>`` on the first endpoint that answers; the decoded JSON reply."""
        errors = []
        n = len(self.endpoints)
        for k in range(n):
            i = (self._first + k) % n
            host, port, url = self.endpoints[i]
            try:
                reply = self._post(host, port, path, body, self.timeout_s if timeout_s is None else timeout_s)
            except _EndpointFailed as exc:
                errors.append(f"{url}: {exc}")
                continue
            except (OSError, http.client.HTTPException, ValueError) as exc:  # ssl.SSLError is an OSError
                errors.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            self._first = i
            if "error" in reply and "result" not in reply and "header" not in reply:
                raise EtcdError(f"etcd {url} /v3/{path}: {reply.get('error') or reply.get('message')}")
            return reply
        raise EtcdError(f"etcd /v3/{path}: no endpoint answered ({'; '.join(errors)}; expected HTTP 200 "
                        "with a JSON reply from at least one)")

    def _post(self, host: str, port: int, path: str, body: dict, timeout_s: float) -> dict:
        conn = self._connect(host, port, timeout_s)
        try:
            conn.request("POST", f"/v3/{path}", body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            try:
                reply = json.loads(data)
                why = reply.get("message") or reply.get("error") or data[:200]
            except (ValueError, AttributeError):  # a proxy's HTML page, or JSON that is not an object
                why = data[:200]
            raise _EndpointFailed(f"HTTP {resp.status}: {why!r}")
        reply = json.loads(data) if data else {}
        if not isinstance(reply, dict):
            raise ValueError(f"reply is JSON {type(reply).__name__}, expected an object: {data[:200]!r}")
        return reply

    # ---------------------------------------------------------------------------------------- leases
    def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease asking ``ttl_s``; returns (lease id, granted TTL s): etcd may grant more (its floor)."""
        r = self.call("lease/grant", {"TTL": int(ttl_s)})
        return int(r["ID"]), int(r["TTL"])

    def keepalive(self, lease_id: int) -> int:
        """Renew a lease once; returns its TTL in s from now, 0 if it has expired or was revoked."""
        r = self.call("lease/keepalive", {"ID": str(lease_id)})
        return int(r.get("result", {}).get("TTL", 0))

    def revoke(self, lease_id: int) -> None:
        """Revoke a lease: its keys are deleted at once (a graceful step-down)."""
        self.call("kv/lease/revoke", {"ID": str(lease_id)})

    # ------------------------------------------------------------------------------------------- kv
    def create_or_get(self, key: str, value: str, lease_id: int) -> tuple[bool, KeyValue | None]:
        """Put ``key`` = ``value`` with the lease if the key does not exist, in one transaction.

        Returns (True, our KeyValue) when created, else (False, the holder's KeyValue, None if it
        vanished between compare and read: cannot happen inside one etcd transaction, kept for types).
        """
        k = _b64(key)
        r = self.call("kv/txn", {
            "compare": [{"target": "CREATE", "key": k, "createRevision": "0"}],
            "success": [{"requestPut": {"key": k, "value": _b64(value), "lease": str(lease_id)}}],
            "failure": [{"requestRange": {"key": k}}]})
        if r.get("succeeded"):
            rev = int(r["header"]["revision"])  # the put's revision is the key's create_revision
            return True, KeyValue(key, value, rev, rev, lease_id)
        kvs = r["responses"][0]["response_range"].get("kvs", [])
        return False, _kv(kvs[0]) if kvs else None

    def campaign(self, key: str, value: str, lease_id: int, *, also: tuple[str, ...] = (),
                 prefix: str | None = None) -> Campaign:
        """``create_or_get`` that also reads, in the same transaction when the key exists, the keys ``also`` and
        every key under ``prefix`` (the handover key and the candidates, docs/ha.md): one request per poll."""
        k = _b64(key)
        reads = [{"requestRange": {"key": k}}] + [{"requestRange": {"key": _b64(a)}} for a in also]
        if prefix is not None:
            reads.append({"requestRange": {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)),
                                           "limit": str(MAX_UNDER_PREFIX)}})
        r = self.call("kv/txn", {
            "compare": [{"target": "CREATE", "key": k, "createRevision": "0"}],
            "success": [{"requestPut": {"key": k, "value": _b64(value), "lease": str(lease_id)}}],
            "failure": reads})
        revision = int(r["header"]["revision"])
        if r.get("succeeded"):
            return Campaign(True, KeyValue(key, value, revision, revision, lease_id), {}, [], revision)
        ranges = [resp["response_range"].get("kvs", []) for resp in r["responses"]]
        holder = _kv(ranges[0][0]) if ranges[0] else None
        others = {a: (_kv(kvs[0]) if kvs else None) for a, kvs in zip(also, ranges[1:])}
        under = [_kv(raw) for raw in ranges[1 + len(also)]] if prefix is not None else []
        return Campaign(False, holder, others, under, revision)

    def put(self, key: str, value: str, lease_id: int = 0) -> int:
        """Put ``key`` = ``value`` (bound to ``lease_id`` if not 0); the revision of the put."""
        r = self.call("kv/put", {"key": _b64(key), "value": _b64(value), "lease": str(lease_id)})
        return int(r["header"]["revision"])

    def put_if(self, key: str, value: str, *, lease_id: int | None = None, value_is: str | None = None,
               create_revision_of: tuple[str, int] | None = None) -> bool:
        """Put in one transaction only if the key's value is ``value_is`` and/or the key
        ``create_revision_of[0]`` has that create revision; ``lease_id`` None keeps the key's lease. True if put."""
        compare = []
        if value_is is not None:
            compare.append({"target": "VALUE", "key": _b64(key), "value": _b64(value_is)})
        if create_revision_of is not None:
            compare.append({"target": "CREATE", "key": _b64(create_revision_of[0]),
                            "createRevision": str(create_revision_of[1])})
        put = {"key": _b64(key), "value": _b64(value)}
        put.update({"ignore_lease": True} if lease_id is None else {"lease": str(lease_id)})
        r = self.call("kv/txn", {"compare": compare, "success": [{"requestPut": put}]})
        return bool(r.get("succeeded"))

    def delete_if(self, key: str, value_is: str) -> bool:
        """Delete ``key`` only if its value is ``value_is``; True if deleted."""
        k = _b64(key)
        r = self.call("kv/txn", {"compare": [{"target": "VALUE", "key": k, "value": _b64(value_is)}],
                                 "success": [{"requestDeleteRange": {"key": k}}]})
        return bool(r.get("succeeded"))

    def watch_delete(self, key: str, start_revision: int, timeout_s: float, on_watching=None) -> bool:
        """Watch ``key`` from ``start_revision``: True as soon as etcd reports its deletion, False after ``timeout_s``.

        One streaming request (``/v3/watch``, a JSON object per line) to the endpoint that answered last;
        ``on_watching()`` runs once etcd confirmed the watch (so nothing deleted after it can be missed); False from
        it ends the watch (False). Any
        transport error raises EtcdError: the caller falls back to polling.
        """
        host, port, url = self.endpoints[self._first]
        deadline = time.monotonic() + timeout_s
        conn = self._connect(host, port, max(0.01, timeout_s))
        try:
            body = {"create_request": {"key": _b64(key), "start_revision": str(start_revision)}}
            conn.request("POST", "/v3/watch", body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise EtcdError(f"etcd {url} /v3/watch: HTTP {resp.status}: {resp.read(200)!r}")
            while (left := deadline - time.monotonic()) > 0:
                conn.sock.settimeout(left)
                try:
                    line = resp.readline()
                except TimeoutError:
                    return False
                if not line:
                    raise EtcdError(f"etcd {url} /v3/watch: the stream ended")
                result = json.loads(line).get("result", {})
                if result.get("created") and on_watching is not None and on_watching() is False:
                    return False
                if any(ev.get("type") == "DELETE" for ev in result.get("events", [])):
                    return True
            return False
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise EtcdError(f"etcd {url} /v3/watch: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()

    def get(self, key: str) -> KeyValue | None:
        r = self.call("kv/range", {"key": _b64(key)})
        kvs = r.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def delete(self, key: str) -> int:
        r = self.call("kv/deleterange", {"key": _b64(key)})
        return int(r.get("deleted", 0))
