"""Hostile input (issue 5, item 6): a property/fuzz test of the request surface, and
schemathesis against the served /openapi.json.

One kvstore instance (auth on: KV_API_TOKENS) over a fresh database serves the whole module.
Requests go over raw sockets, so anything can be sent: invalid UTF-8, NUL and control bytes,
percent-encoding tricks, dot segments, huge/deep/invalid JSON, 10 MB bodies with and without
Content-Length, malformed framing, huge and many headers, garbage query strings and cursors.

The test keeps an exact model of the store (key -> compact value text, version, ETag), seeded
with the initial dataset and a set of sentinel keys that sit next to what the fuzzer writes
(same key with another case, a trailing space, NFC vs NFD, `%`/`_`, `..`, SQL metacharacters).
Invariants checked on every response:
- never a 5xx, and the process is still alive;
- every response the application answers carries a sane X-Request-Id, and every 4xx is an
  RFC 9457 problem+json with a `code` from API.md (plus `request_timeout`) and that request id;
- a successful write returns exactly the key it targeted and the value as sent (compact JSON,
  byte for byte), and every read agrees with the model.
Periodically and after every test the whole store is compared with the model three ways: the
paginated listing, a cache-bypassing GET of every sentinel (value, version and ETag), and the
rows of the database itself (HEX of key and value bytes): no fuzzed request may change any key
but the one it targets, and SQL metacharacters are stored literally.

Requests the HTTP layer (hyper) refuses before the application sees them -- not valid HTTP/1.1
(raw control bytes or `<>`` ` `` in the target, malformed Content-Length, bad chunk framing),
over 100 headers, a URI over 64 KiB -- get 400 problem documents with a request id like every
other refusal (src/refusal.rs rewrites hyper's bare 400/414/431), with `connection: close`.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.parse
import uuid

import pytest
import requests

# Hypothesis keeps a cache directory; keep it out of the repository.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                      os.path.join(os.environ.get("TMPDIR", "/tmp"), "kvstore-hypothesis"))
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import launch_kvstore  # noqa: E402  (tests/ops is on sys.path under pytest)

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]

TOKEN = "hostile-fuzz-token-1"
TOKEN2 = "second.token~2"
TOKENS = (TOKEN, TOKEN2)
AUTH = ("Authorization", f"Bearer {TOKEN}")

MAX_VALUE_BYTES = 1024 * 1024  # default KV_MAX_VALUE_BYTES
MAX_DEPTH = 128

# API.md's error codes, plus request_timeout (openapi.json's Problem.code enum).
CODES = {
    "invalid_key", "invalid_json", "invalid_request", "unauthorized", "not_found",
    "method_not_allowed", "precondition_failed", "value_too_large", "unavailable", "internal",
    "request_timeout",
}
CODE_STATUS = {
    "invalid_key": 400, "invalid_json": 400, "invalid_request": 400, "unauthorized": 401,
    "not_found": 404, "method_not_allowed": 405, "request_timeout": 408,
    "precondition_failed": 412, "value_too_large": 413,
}
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
CONTROL = "".join(chr(c) for c in range(0x20)) + "\x7f"

# Property tests: a fixed, bounded number of examples, derandomized (same cases every run).
FUZZ = settings(
    max_examples=int(os.environ.get("KV_HOSTILE_EXAMPLES", "100")),
    deadline=None,
    derandomize=True,
    database=None,
    # `verified` is function-scoped on purpose: it checks the whole store once the test ends.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)

SQL_META = [
    "'", "''", '"', ";", "--", "-- ", "#", "/*", "*/", "\\", "\\'", '\\"', "`", "%", "_", "\\%",
    "\\_", "%%", "' OR '1'='1", "\" OR \"\"=\"", "'; DROP TABLE kv_entries; --",
    "\"; DELETE FROM kv_entries; #", "` OR 1=1 #", "' UNION SELECT k, v FROM kv_entries --",
    "1; SELECT SLEEP(5)", "\\0", "0x27", "CHAR(39)", "?", ":k", "$1", "@@version", "NULL",
    "%00", "%27", "\\x27", "\\u0027", "*/ OR /*",
]

# Keys that sit next to what the fuzzer writes; none of them may ever change.
SENTINELS = {
    "sentinel/plain": '"plain"',
    "sentinel/Plain": '"Plain"',
    "sentinel/PLAIN": '{"case":"upper"}',
    "sentinel/plain ": '"trailing space"',
    " sentinel/plain": '"leading space"',
    "sentinel/caf\u00e9": '"nfc"',
    "sentinel/cafe\u0301": '"nfd"',
    "sentinel/stra\u00dfe": '"sharp s"',
    "sentinel/strasse": '"ss"',
    "sentinel/%": '"percent"',
    "sentinel/_": '"underscore"',
    "sentinel/%25": '"percent-25"',
    "sentinel/a%2Fb": '"literal %2F"',
    "sentinel/a/b": '"slash"',
    "sentinel/../plain": '"dot segment"',
    "sentinel/./plain": '"dot"',
    "sentinel/": '"trailing slash"',
    "sentinel": '"no slash"',
    "sentinel/'; DROP TABLE kv_entries; --": '"\'; DROP TABLE kv_entries; --"',
    'sentinel/"': '"\\""',
    "sentinel/\\": '"\\\\"',
    "sentinel/`": '"`"',
    "sentinel/\u00a0": '"nbsp"',
    "sentinel/\U0001f600": '["emoji",1,2.50,null,true,{"z":1,"a":"\\u0027"}]',
    "sentinel/" + "k" * 503: '"512 bytes"',
}


# ---------------------------------------------------------------------------------------------
# Raw HTTP over sockets


class Resp:
    def __init__(self, status: int, headers: dict[str, list[str]], body: bytes, head: bytes):
        self.status = status
        self.headers = headers
        self.body = body
        self.head = head

    def h(self, name: str) -> str | None:
        v = self.headers.get(name.lower())
        return v[0] if v else None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def __repr__(self) -> str:
        return f"<{self.status} {self.head[:600]!r} {self.body[:600]!r}>"


def _b(x) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode("utf-8")


def http(port: int, method, target, headers=(), body: bytes | None = None, *, chunked=False,
         content_length=True, version=b"HTTP/1.1", timeout=30.0, raw: bytes | None = None) -> Resp:
    """One request on a new connection (`Connection: close`), response read whole.

    `content_length=False` sends the body without a Content-Length (the caller sets framing);
    `raw` sends those bytes verbatim instead of building a request."""
    if raw is None:
        head = _b(method) + b" " + _b(target) + b" " + version + b"\r\nHost: 127.0.0.1\r\n"
        head += b"Connection: close\r\n"
        for n, v in headers:
            head += _b(n) + b": " + _b(v) + b"\r\n"
        payload = b""
        if body is not None:
            if chunked:
                head += b"Transfer-Encoding: chunked\r\n"
                step = 64 * 1024
                payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step])
                                   for i in range(0, len(body), step)) + b"0\r\n\r\n"
            else:
                if content_length:
                    head += b"Content-Length: %d\r\n" % len(body)
                payload = body
        data = head + b"\r\n" + payload
    else:
        data = raw
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sender = None
        if len(data) > 512 * 1024:
            # Big bodies go from a thread: the server may answer (413) before reading it all.
            def send():
                try:
                    sock.sendall(data)
                except OSError:
                    pass
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
        else:
            try:
                sock.sendall(data)
            except OSError:
                pass
        resp = _read_response(sock, _b(method) if raw is None else raw.split(b" ", 1)[0])
        if sender is not None:
            sender.join(timeout)
        return resp
    finally:
        sock.close()


def _read_response(sock: socket.socket, method: bytes) -> Resp:
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed without a full response: {buf[:300]!r}")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        if 100 <= status < 200:
            buf = rest
            continue
        break
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        n, _, v = line.partition(b":")
        headers.setdefault(n.strip().lower().decode("latin-1"), []).append(
            v.strip().decode("latin-1"))
    if method == b"HEAD" or status in (204, 304):
        length = 0
    elif "content-length" in headers:
        length = int(headers["content-length"][0])
    else:
        length = None
    while length is None or len(rest) < length:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        rest += chunk
    if length is not None:
        assert len(rest) >= length, f"short body: {len(rest)} of {length} bytes: {head!r}"
        rest = rest[:length]
    return Resp(status, headers, rest, head)


# ---------------------------------------------------------------------------------------------
# Raw JSON: the exact text of each member, so values are compared byte for byte


_DEC = json.JSONDecoder()
_WS = " \t\r\n"


def _ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def raw_members(s: str, i: int = 0) -> tuple[dict[str, str], int, list[str]]:
    """Members of the JSON object at s[i:] as raw text; also the names, duplicates included."""
    i = _ws(s, i)
    assert s[i] == "{", s[i:i + 50]
    out: dict[str, str] = {}
    names: list[str] = []
    i = _ws(s, i + 1)
    if s[i] == "}":
        return out, i + 1, names
    while True:
        i = _ws(s, i)
        name, i = _DEC.raw_decode(s, i)
        assert isinstance(name, str)
        i = _ws(s, i)
        assert s[i] == ":"
        i = _ws(s, i + 1)
        _, j = _DEC.raw_decode(s, i)
        out[name] = s[i:j]
        names.append(name)
        i = _ws(s, j)
        if s[i] == "}":
            return out, i + 1, names
        assert s[i] == ",", s[i:i + 50]
        i += 1


class Entry:
    def __init__(self, raw: str):
        m, end, _ = raw_members(raw)
        assert set(m) == {"key", "value", "version", "created_at", "updated_at", "expires_at"}, m
        self.key = json.loads(m["key"])
        self.value = m["value"]
        self.version = json.loads(m["version"])
        self.expires_at = json.loads(m["expires_at"])
        for f in ("created_at", "updated_at"):
            assert TIMESTAMP.fullmatch(json.loads(m[f])), m[f]
        assert self.expires_at is None or TIMESTAMP.fullmatch(self.expires_at)
        self.end = end


def list_page(text: str) -> tuple[list[Entry], str | None]:
    m, _, _ = raw_members(text)
    assert set(m) == {"items", "next_cursor"}, text[:300]
    items = m["items"]
    entries: list[Entry] = []
    i = _ws(items, 1)
    while items[i] != "]":
        e = Entry(items[i:])
        entries.append(e)
        i = _ws(items, i + e.end)
        if items[i] == ",":
            i = _ws(items, i + 1)
    return entries, json.loads(m["next_cursor"])


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# The service and its model


def _db_cli(url: str, database: str | None, sql: str) -> str:
    u = urllib.parse.urlparse(url)
    cmd = ["mariadb", "--no-defaults", "-h", u.hostname or "127.0.0.1", "-P", str(u.port or 3306),
           "-u", urllib.parse.unquote(u.username or "root"), "-N", "-B", "-e", sql]
    if u.password:
        cmd.insert(2, f"-p{urllib.parse.unquote(u.password)}")
    if database:
        cmd.append(database)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout


class Rec:
    def __init__(self, value: str, version: int, etag: str):
        self.value, self.version, self.etag = value, version, etag

    def __repr__(self):
        return f"Rec({self.value[:60]!r}, v{self.version}, {self.etag})"


class Service:
    def __init__(self, proc: subprocess.Popen, port: int, lines: list[str], db_url: str, db: str):
        self.proc = proc
        self.port = port
        self.lines = lines
        self.db_url = db_url
        self.db = db
        self.model: dict[str, Rec] = {}
        self.ops = 0

    # -- requests ----------------------------------------------------------------------------
    def req(self, method, target, headers=(), body=None, **kw) -> Resp:
        r = http(self.port, method, target, headers, body, **kw)
        check(self, r, method=_b(method).decode("latin-1"))
        self.ops += 1
        return r

    def alive(self) -> None:
        assert self.proc.poll() is None, "kvstore died:\n" + "\n".join(self.lines[-40:])

    # -- writes and reads checked against the model --------------------------------------------
    def put(self, key: str, value: str, *, target: bytes | None = None, body: bytes | None = None,
            headers=(AUTH,), **kw) -> Resp:
        """PUT a valid value to `key` and check it against the model."""
        if target is None:
            target = b"/v1/keys/" + quote_key(key)
        if body is None:
            body = ('{"value":' + value + "}").encode()
        r = self.req("PUT", target, headers, body, **kw)
        self.expect_written(r, key, value)
        return r

    def expect_written(self, r: Resp, key: str, value: str) -> None:
        prev = self.model.get(key)
        assert r.status == (200 if prev else 201), (key, r)
        assert r.h("content-type") == "application/json", r
        e = Entry(r.text)
        assert e.key == key, f"a write for {key!r} wrote {e.key!r}"
        assert e.value == value, f"stored value differs: {e.value[:200]!r} != {value[:200]!r}"
        assert e.version == (prev.version + 1 if prev else 1), (prev, e.version)
        etag = r.h("etag")
        assert etag and re.fullmatch(r'"[^"]*"', etag), r
        if prev:
            assert etag != prev.etag, "the ETag did not change on a write"
        else:
            loc = r.h("location")
            assert loc and loc.startswith("/v1/keys/"), r
            assert urllib.parse.unquote(loc[len("/v1/keys/"):], errors="strict") == key, loc
        self.model[key] = Rec(value, e.version, etag)

    def record_write(self, r: Resp) -> None:
        """A write whose outcome the test cannot predict exactly: learn it from the response."""
        e = Entry(r.text)
        prev = self.model.get(e.key)
        assert r.status == (200 if prev else 201), (prev, r)
        assert e.version == (prev.version + 1 if prev else 1)
        self.model[e.key] = Rec(e.value, e.version, r.h("etag"))

    def get(self, key: str, *, target: bytes | None = None, no_cache=False) -> Resp:
        if target is None:
            target = b"/v1/keys/" + quote_key(key)
        hdrs = [("Cache-Control", "no-cache")] if no_cache else []
        r = self.req("GET", target, hdrs)
        self.expect_read(r, key)
        return r

    def expect_read(self, r: Resp, key: str) -> None:
        rec = self.model.get(key)
        if rec is None:
            assert r.status == 404, f"{key!r} should be absent: {r!r}"
            assert json.loads(r.body)["code"] == "not_found"
            return
        assert r.status == 200, f"{key!r} should be {rec}: {r!r}"
        e = Entry(r.text)
        assert (e.key, e.value, e.version, r.h("etag")) == (key, rec.value, rec.version, rec.etag), (
            f"{key!r}: read {e.value[:100]!r} v{e.version} {r.h('etag')}, model {rec}")

    def delete(self, key: str, *, target: bytes | None = None, headers=(AUTH,)) -> Resp:
        if target is None:
            target = b"/v1/keys/" + quote_key(key)
        r = self.req("DELETE", target, headers)
        if key in self.model:
            assert r.status == 204, (key, r)
            assert r.body == b""
            del self.model[key]
        else:
            assert r.status == 404, (key, r)
        return r

    # -- the whole store -------------------------------------------------------------------------
    def listing(self, limit: int = 1000) -> dict[str, tuple[str, int]]:
        out: dict[str, tuple[str, int]] = {}
        cursor = None
        last = None
        for _ in range(10000):
            q = {"limit": str(limit)}
            if cursor:
                q["cursor"] = cursor
            r = self.req("GET", "/v1/keys?" + urllib.parse.urlencode(q))
            assert r.status == 200, r
            items, cursor = list_page(r.text)
            assert len(items) <= limit
            assert items or cursor is None, "an empty page that is not the last"
            assert (r.h("link") is not None) == (cursor is not None), r
            for e in items:
                kb = e.key.encode()
                assert last is None or kb > last, f"listing out of order or repeated at {e.key!r}"
                last = kb
                out[e.key] = (e.value, e.version)
            if cursor is None:
                return out
        raise AssertionError("listing does not end")

    def db_rows(self) -> dict[str, tuple[str, int, str]]:
        rows = {}
        sql = ("SELECT HEX(k), HEX(v), version, rev FROM kv_entries "
               "WHERE expires_at IS NULL OR expires_at > UTC_TIMESTAMP(6)")
        for line in _db_cli(self.db_url, self.db, sql).splitlines():
            k, v, version, rev = line.split("\t")
            rows[bytes.fromhex(k).decode("utf-8")] = (
                bytes.fromhex(v).decode("utf-8"), int(version), f'"{rev}"')
        return rows

    def verify_all(self, *, small_pages=False) -> None:
        """The whole store equals the model: listing, sentinels read from the database, rows."""
        self.alive()
        want = {k: (r.value, r.version) for k, r in self.model.items()}
        got = self.listing()
        if got != want:
            extra = sorted(set(got) - set(want))[:10]
            missing = sorted(set(want) - set(got))[:10]
            changed = sorted(k for k in set(got) & set(want) if got[k] != want[k])[:10]
            raise AssertionError(f"the store differs from the model: unexpected keys {extra}, "
                                 f"missing {missing}, changed {[(k, got[k], want[k]) for k in changed]}")
        if small_pages:
            assert self.listing(limit=7) == want
        for key in SENTINELS:
            self.get(key, no_cache=True)
        rows = self.db_rows()
        want_rows = {k: (r.value, r.version, r.etag) for k, r in self.model.items()}
        diff = sorted(k for k in set(rows) | set(want_rows) if rows.get(k) != want_rows.get(k))
        assert not diff, "database rows differ from the model: " + "; ".join(
            f"{k!r}: row {str(rows.get(k))[:120]} model {str(want_rows.get(k))[:120]}" for k in diff[:5])

    def resync(self) -> None:
        """After a failure: take the database as the model, so later tests start consistent."""
        self.model = {k: Rec(v, ver, etag) for k, (v, ver, etag) in self.db_rows().items()}

    @contextlib.contextmanager
    def guard(self):
        try:
            yield
        except BaseException:
            self.resync()
            raise

    def tick(self, every: int = 25) -> None:
        """Called once per generated example: the whole store is checked every `every`."""
        self._examples = getattr(self, "_examples", 0) + 1
        if self._examples % every == 0:
            self.verify_all()

    def log_problems(self) -> list[str]:
        return [l for l in self.lines if "panicked" in l or '"msg":"internal error"' in l]


def check(svc: Service, r: Resp, *, method: str) -> None:
    """The invariants of every response (those of requests hyper refuses before routing
    included: src/refusal.rs makes them problem documents like the rest)."""
    svc.alive()
    assert r.status < 500, f"{method}: server error {r!r}"
    rid = r.h("x-request-id")
    assert rid is not None, f"{method}: a response without X-Request-Id: {r!r}"
    assert SANE_REQUEST_ID.fullmatch(rid), rid
    if r.status >= 400:
        if method == "HEAD":
            assert r.body == b"", r
            return
        assert r.h("content-type") == "application/problem+json", r
        doc = json.loads(r.body)
        assert doc.get("code") in CODES, doc
        assert doc["status"] == r.status and doc.get("request_id") == rid, doc
        assert doc.get("type") == "about:blank" and doc.get("title"), doc
        assert isinstance(doc.get("detail"), str) and doc["detail"], doc
        assert CODE_STATUS.get(doc["code"], r.status) == r.status, doc
        if r.status == 401:
            assert (r.h("www-authenticate") or "").startswith("Bearer"), r
        if r.status == 405:
            assert r.h("allow"), r


def quote_key(key: str, style: str = "quote") -> bytes:
    """A path spelling of `key` that percent-decodes to it."""
    if style == "quote":
        return urllib.parse.quote(key, safe="/").encode()
    if style == "quote_all":  # `/` as %2F
        return urllib.parse.quote(key, safe="").encode()
    if style == "lower":  # lower-case hex digits
        return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(),
                      urllib.parse.quote(key, safe="")).encode()
    if style == "every_byte":  # every byte escaped, alternating hex case
        return b"".join((b"%%%02X" if i % 2 else b"%%%02x") % c
                        for i, c in enumerate(key.encode()))
    if style == "minimal":  # only what a request-target cannot carry; UTF-8 raw
        out = []
        for ch in key:
            if ch in "%?#<>` " or ch in CONTROL or "\x80" <= ch <= "\x9f":
                out.append(urllib.parse.quote(ch, safe=""))
            else:
                out.append(ch)
        return "".join(out).encode()
    raise ValueError(style)


ENCODINGS = ["quote", "quote_all", "lower", "every_byte", "minimal"]


@pytest.fixture(scope="module")
def svc(database_url, kvstore_bin):
    db = "kv_hostile_" + uuid.uuid4().hex[:10]
    _db_cli(database_url, None, f"CREATE DATABASE `{db}`")
    u = urllib.parse.urlparse(database_url)
    url = urllib.parse.urlunparse(u._replace(path="/" + db))
    proc, port, lines = start_service(kvstore_bin, {
        "KV_DATABASE_URL": url, "KV_API_TOKENS": ",".join(TOKENS)})
    try:
        s = Service(proc, port, lines, database_url, db)
        # The initial dataset, learnt through the API; then the sentinels.
        for key, (value, version) in s.listing().items():
            r = http(port, "GET", b"/v1/keys/" + quote_key(key))
            s.model[key] = Rec(value, version, r.h("etag"))
        assert set(s.model) == {"Homer", "Jeffrey", "Stan"}, s.model
        for key, value in SENTINELS.items():
            s.put(key, value)
        s.verify_all()
        yield s
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _db_cli(database_url, None, f"DROP DATABASE IF EXISTS `{db}`")


def start_service(binary, env: dict[str, str]) -> tuple[subprocess.Popen, int, list[str]]:
    """conftest's launch_kvstore for a module-scoped instance; also waits for /readyz."""
    k = launch_kvstore(binary, {"KV_SHUTDOWN_DELAY": "0s", **env})
    proc, lines = k.proc, k.lines
    port = int(k.http.rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc, port, lines
        except requests.RequestException:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("kvstore never became ready:\n" + "\n".join(lines))


def guarded(test):
    """Inside a property test: a failing example resyncs the model before it propagates."""
    @functools.wraps(test)
    def run(verified, *args, **kwargs):
        with verified.guard():
            return test(verified, *args, **kwargs)
    return run


@pytest.fixture
def verified(svc):
    """Every test ends with the whole store checked against the model and clean logs."""
    yield svc
    with svc.guard():
        svc.verify_all()
    assert not svc.log_problems(), svc.log_problems()[:5]


# ---------------------------------------------------------------------------------------------
# Strategies

key_char = st.one_of(
    st.sampled_from(list("'\";-/*\\`%_ .~+&=?#[]{}:@!$(),<>|^aZ09")),
    st.characters(codec="utf-8", exclude_characters=CONTROL),
)
key_piece = st.one_of(st.sampled_from(SQL_META + ["/", "..", ".", "%2F", "%252F", "%25", "%A",
                                                  "%zz", "%", "%%41", "%C3%A9"]),
                      st.text(key_char, min_size=1, max_size=6))
fuzz_key = st.lists(key_piece, min_size=1, max_size=6).map(lambda p: "fz/" + "".join(p)).filter(
    lambda k: len(k.encode()) <= 512)


def _mutate(key: str, how: str) -> str:
    return {
        "upper": key.upper(), "lower": key.lower(), "swapcase": key.swapcase(),
        "space": key + " ", "lead": " " + key, "nbsp": key + "\u00a0", "pct": key + "%",
        "under": key + "_", "chop": key[:-1], "nfd": unicodedata.normalize("NFD", key),
        "nfc": unicodedata.normalize("NFC", key), "nfkc": unicodedata.normalize("NFKC", key),
        "slash": key + "/", "dslash": key.replace("/", "//"), "dot": key.replace("/", "/./"),
        "enc": key.replace("/", "%2F"), "casefold": key.casefold(), "zwsp": key + "\u200b",
    }[how]


near_miss = st.builds(_mutate, st.sampled_from(sorted(SENTINELS) + ["Homer", "Stan"]),
                      st.sampled_from(["upper", "lower", "swapcase", "space", "lead", "nbsp",
                                       "pct", "under", "chop", "nfd", "nfc", "nfkc", "slash",
                                       "dslash", "dot", "enc", "casefold", "zwsp"]))


def _valid_new_key(svc: Service, key: str) -> bool:
    return (0 < len(key.encode()) <= 512 and not any(c in CONTROL for c in key)
            and key not in SENTINELS and key not in ("Homer", "Jeffrey", "Stan"))


sql_text = st.one_of(st.sampled_from(SQL_META),
                     st.lists(st.sampled_from(SQL_META), min_size=2, max_size=5).map("".join),
                     st.text(st.characters(codec="utf-8"), max_size=20))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                      st.floats(allow_nan=False, allow_infinity=False), sql_text)
json_value = st.recursive(json_leaf, lambda ch: st.one_of(
    st.lists(ch, max_size=4), st.dictionaries(sql_text, ch, max_size=4)), max_leaves=16)


# ---------------------------------------------------------------------------------------------
# Keys


@FUZZ
@given(data=st.data(), key=st.one_of(fuzz_key, near_miss), value=json_value,
       put_enc=st.sampled_from(ENCODINGS), get_enc=st.sampled_from(ENCODINGS),
       ascii_only=st.booleans(), then_delete=st.booleans())
@guarded
def test_valid_keys_are_stored_literally_and_touch_nothing_else(
        verified, data, key, value, put_enc, get_enc, ascii_only, then_delete):
    """Any valid key, spelt any legal way in the path (%2F, lower-case hex, every byte escaped,
    raw UTF-8, dot segments, SQL metacharacters), addresses exactly that key: stored and read
    back byte for byte, ETag/304 consistent, and no other key changes."""
    svc = verified
    assume(_valid_new_key(svc, key))
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=ascii_only)
    svc.put(key, text, target=b"/v1/keys/" + quote_key(key, put_enc))
    r = svc.get(key, target=b"/v1/keys/" + quote_key(key, get_enc))
    etag = r.h("etag")
    h = svc.req("HEAD", b"/v1/keys/" + quote_key(key, get_enc))
    assert h.status == 200 and h.body == b"" and h.h("etag") == etag, h
    nm = svc.req("GET", b"/v1/keys/" + quote_key(key), [("If-None-Match", etag)])
    assert nm.status == 304 and nm.body == b"" and nm.h("etag") == etag, nm
    # A query parameter on a key is refused, and writes nothing.
    q = svc.req("PUT", b"/v1/keys/" + quote_key(key) + b"?x=1", [AUTH], b'{"value":0}')
    assert q.status == 400 and json.loads(q.body)["code"] == "invalid_request", q
    if then_delete:
        svc.delete(key, target=b"/v1/keys/" + quote_key(key, data.draw(st.sampled_from(ENCODINGS))))
        svc.get(key)
    svc.tick()


def _invalid_key_paths():
    ctl = st.sampled_from([chr(c) for c in range(0x20)] + ["\x7f"])
    with_ctl = st.builds(lambda a, c, b: (b"fz/" + quote_key(a) + b"%%%02X" % ord(c) + quote_key(b)),
                         st.text(key_char, max_size=5), ctl, st.text(key_char, max_size=5))
    bad_utf8 = st.builds(lambda a, seq: b"fz/" + quote_key(a) + seq, st.text(key_char, max_size=5),
                         st.sampled_from([b"%FF", b"%C3", b"%C3%28", b"%C0%AF", b"%E0%80%AF",
                                          b"%ED%A0%80", b"%F4%90%80%80", b"%80", b"%F8%88%80%80%80",
                                          b"%EF%BF", b"%fe%ff"]))
    too_long = st.builds(lambda ch, n: quote_key(ch * n).replace(b"/", b"%2F"),
                         st.sampled_from(["k", "\u00e9", "\u20ac", "\U0001f600", "%", "/"]),
                         st.integers(1, 3000)).filter(lambda p: len(urllib.parse.unquote_to_bytes(p)) > 512)
    return st.one_of(with_ctl, bad_utf8, too_long, st.just(b""))


@FUZZ
@given(path=_invalid_key_paths(), method=st.sampled_from(["GET", "HEAD", "PUT", "DELETE"]))
@guarded
def test_invalid_keys_are_refused(verified, path, method):
    """Control characters (percent-encoded), invalid UTF-8 after decoding (overlong, surrogate,
    truncated, > U+10FFFF), keys over 512 bytes and the empty key: 400 invalid_key, nothing
    written."""
    svc = verified
    body = b'{"value":"x"}' if method == "PUT" else None
    r = svc.req(method, b"/v1/keys/" + path, [AUTH], body)
    assert r.status == 400, r
    if method != "HEAD":
        assert json.loads(r.body)["code"] == "invalid_key", r
    # The same key in a POST body (where it can be represented as a JSON string).
    raw = urllib.parse.unquote_to_bytes(path)
    try:
        key = raw.decode("utf-8")
    except UnicodeDecodeError:
        key = None
    if key is not None and method == "PUT":
        p = svc.req("POST", "/v1/keys", [AUTH], json.dumps({"key": key, "value": 1}).encode())
        assert p.status == 400 and json.loads(p.body)["code"] == "invalid_key", p
    svc.tick()


RAW_TARGETS = [
    b"/v1/keys/a\x00b", b"/v1/keys/a\x01b", b"/v1/keys/a\x1fb", b"/v1/keys/a\x7fb", b"/v1/keys/a b",
    b"/v1/keys/a\tb", b"/v1/keys/\xff\xfe", b"/v1/keys/\xc3", b"/v1/keys/\xc3(", b"/v1/keys/\x80",
    b"/v1/keys/\xed\xa0\x80", b"/v1/keys/a<b", b"/v1/keys/a>b", b"/v1/keys/a`b",
    b"/v1/keys/a\rb", b"/v1/keys/" + b"a" * 70000,
]


@pytest.mark.parametrize("target", RAW_TARGETS, ids=lambda t: repr(t[:24]))
def test_raw_bytes_in_the_target(verified, target):
    """Raw NUL/control/invalid-UTF-8 bytes in the request-target, and a 70 KB path: refused
    (by the HTTP layer or as invalid_key), never a write, never a crash."""
    svc = verified
    for method in ("GET", "PUT", "DELETE"):
        body = b'{"value":1}' if method == "PUT" else None
        r = svc.req(method, target, [AUTH], body)
        assert 400 <= r.status < 500, r
        # invalid_request: not valid HTTP (hyper's refusal, made a problem document).
        assert json.loads(r.body)["code"] in ("invalid_key", "not_found", "invalid_request"), r


def test_dot_segments_and_path_tricks_address_the_literal_key(verified):
    """The path is not normalised: `..`, `.`, `//`, a trailing `/`, `;params` are part of the
    key; `%2F` and `/` are the same key; `%252F` is a literal `%2F`. Routes are exact."""
    svc = verified
    cases = [
        (b"/v1/keys/fz/../sentinel/plain", "fz/../sentinel/plain"),
        (b"/v1/keys/../sentinel/plain", "../sentinel/plain"),
        (b"/v1/keys/%2e%2e/sentinel/plain", "../sentinel/plain"),
        (b"/v1/keys/sentinel/./plain/.", "sentinel/./plain/."),
        (b"/v1/keys//sentinel/plain", "/sentinel/plain"),
        (b"/v1/keys/sentinel/plain/", "sentinel/plain/"),
        (b"/v1/keys/sentinel%2Fplain%2F%2E", "sentinel/plain/."),
        (b"/v1/keys/sentinel/a%252Fb/x", "sentinel/a%2Fb/x"),
        (b"/v1/keys/sentinel/a%2fb%2Fc", "sentinel/a/b/c"),
        (b"/v1/keys/sentinel/plain;v=1", "sentinel/plain;v=1"),
        (b"/v1/keys/sentinel/plain+x", "sentinel/plain+x"),
        (b"/v1/keys/%2525", "%25"),
        (b"http://evil.example/v1/keys/fz/absolute-form", "fz/absolute-form"),
    ]
    for target, key in cases:
        svc.put(key, '"via %s"' % target.decode().replace('"', "'"), target=target)
        svc.get(key)
        svc.get(key, target=target)
    for target in (b"/v1/../v1/keys/sentinel/plain", b"/v1/./keys/x", b"//v1/keys/x",
                   b"/V1/keys/x", b"/v1/keys%2Fx", b"/v1%2Fkeys/x", b"/v1/keys/../../healthz",
                   b"*"):
        r = svc.req("PUT", target, [AUTH], b'{"value":"route confusion"}')
        if target.startswith(b"/v1/keys/"):
            svc.expect_written(r, urllib.parse.unquote(target[len(b"/v1/keys/"):].decode()),
                               '"route confusion"')
        else:
            assert r.status in (404, 405), (target, r)
    r = svc.req("PUT", b"/v1/keys/", [AUTH], b'{"value":1}')
    assert r.status == 400 and json.loads(r.body)["code"] == "invalid_key", r


def test_malformed_percent_escapes_are_invalid_keys(verified):
    """`%` not followed by two hex digits is not a percent-encoding: such a path has no decoded
    form, so it is `400 invalid_key` (as Consul/etcd, i.e. Go's net/url, answer), not a key
    containing a literal `%`. Otherwise `/v1/keys/a%A` and `/v1/keys/a%25A` alias one key, and a
    proxy that decodes strictly and this service disagree on which key a path names."""
    svc = verified
    wrong = []
    for tail in (b"fz/pct%A", b"fz/pct%", b"fz/pct%G1", b"fz/pct%%41", b"fz/pct%2", b"fz/pct%zz",
                 b"fz/pct%-1", b"fz/pct%1"):
        for method in ("PUT", "GET", "DELETE"):
            body = b'{"value":"malformed escape"}' if method == "PUT" else None
            r = svc.req(method, b"/v1/keys/" + tail, [AUTH], body)
            code = json.loads(r.body).get("code") if r.body else None
            if (r.status, code) != (400, "invalid_key"):
                wrong.append(f"{method} /v1/keys/{tail.decode()} -> {r.status} {code}"
                             + (f" (key {Entry(r.text).key!r})" if r.status in (200, 201) else ""))
    svc.resync()  # whatever was written (or aliased: fz/pct%%41 is fz/pct%A), the model follows
    assert not wrong, "malformed percent-escapes accepted as literal key text:\n" + "\n".join(wrong)


def test_sql_metacharacters_are_stored_literally(verified):
    """Keys and values made of SQL metacharacters round-trip byte for byte through PUT, POST,
    GET, the listing and the database rows; `%` and `_` in a prefix are not wildcards."""
    svc = verified
    values = ['"\\u0027 OR \\u00271\\u0027=\\u00271"', '"\\\\\'"', '{"\'":"\\"","`":";--"}',
              '["%","_","\\\\%","\\\\_","/*","*/"]', '"\\u0000\\u001f"', '"\'; DROP TABLE kv_entries; --"']
    for i, meta in enumerate(SQL_META):
        key = f"sql/{meta}/{i}"
        svc.put(key, values[i % len(values)])
        svc.get(key)
        key2 = f"sql/post/{meta}"
        v2 = json.dumps({"meta": meta, "i": i}, separators=(",", ":"))
        r = svc.req("POST", "/v1/keys", [AUTH], json.dumps({"key": key2, "value": json.loads(v2)},
                                                             separators=(",", ":")).encode())
        svc.expect_written(r, key2, v2)
        svc.get(key2, no_cache=True)
    # Prefixes with LIKE wildcards and quotes match literally.
    for prefix in ("sql/%", "sql/_", "sql/'", "sql/\\", "sql/\\%", "sentinel/%", "sentinel/_",
                   "%", "_", "'", "sql/post/' OR '1'='1", "sql/post/%%"):
        r = svc.req("GET", "/v1/keys?" + urllib.parse.urlencode({"prefix": prefix, "limit": "1000"}))
        items, cursor = list_page(r.text)
        want = sorted((k for k in svc.model if k.startswith(prefix)), key=lambda k: k.encode())
        assert [e.key for e in items] == want, (prefix, [e.key for e in items][:10], want[:10])
        assert cursor is None
    svc.verify_all(small_pages=True)  # includes the database rows, compared as bytes


# ---------------------------------------------------------------------------------------------
# Bodies


def _strict_body(body: bytes, post: bool):
    """What the contract accepts, decided independently: the body's members, or None."""
    try:
        text = body.decode("utf-8")
        members, end, names = raw_members(text)
        if text[end:].strip(_WS):
            return None
        if len(names) != len(set(names)):
            return None
        for raw in members.values():
            json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (ValueError, AssertionError, IndexError, UnicodeDecodeError):
        return None
    allowed = {"key", "value", "ttl_seconds"} if post else {"value", "ttl_seconds"}
    if not set(members) <= allowed or "value" not in members or (post and "key" not in members):
        return None
    ttl = json.loads(members.get("ttl_seconds", "null"))
    if ttl is not None and (type(ttl) is not int or not 1 <= ttl <= 31536000):
        return None
    if post and not isinstance(json.loads(members["key"]), str):
        return None
    return members


def _mutations(body: bytes) -> st.SearchStrategy[bytes]:
    n = len(body)
    junk = st.sampled_from([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\\",
                            b'"', b",", b"}", b"]", b"{", b"NaN", b"Infinity", b"\n", b"'", b"\x01",
                            b"\\u0000", b"\\ud800", b",\"extra\":1", b",\"value\":2"])
    return st.one_of(
        st.builds(lambda i, j: body[:i] + body[j:], st.integers(0, n), st.integers(0, n)),
        st.builds(lambda i, x: body[:i] + x + body[i:], st.integers(0, n), junk),
        st.builds(lambda i, x: body[:i] + x + body[i + 1:], st.integers(0, n), junk),
        st.builds(lambda i: body[:i], st.integers(0, n)),
        st.binary(max_size=64),
        st.just(b"[" + body + b"]"), st.just(body + body), st.just(b"\xef\xbb\xbf" + body),
    )


@FUZZ
@given(data=st.data(), value=json_value, key=fuzz_key, post=st.booleans(),
       ctype=st.sampled_from([None, "application/json", "text/plain", "application/xml",
                              "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                              "application/json; charset=latin1", "*/*", ""]),
       chunked=st.booleans(), pretty=st.booleans(), mutate=st.booleans())
@guarded
def test_bodies(verified, data, value, key, post, ctype, chunked, pretty, mutate):
    """Valid bodies are accepted whatever the Content-Type, with or without Content-Length,
    and stored compact and literal; invalid ones (invalid UTF-8, NUL, BOM, truncation, unknown
    or duplicate fields, NaN, trailing data, wrong types) are 400 invalid_json/invalid_key."""
    svc = verified
    assume(_valid_new_key(svc, key))
    doc = {"key": key, "value": value} if post else {"value": value}
    body = json.dumps(doc, indent=2 if pretty else None, ensure_ascii=False).encode()
    if mutate:
        body = data.draw(_mutations(body))
    headers = [AUTH] + ([("Content-Type", ctype)] if ctype is not None else [])
    target = "/v1/keys" if post else b"/v1/keys/" + quote_key(key)
    r = svc.req("POST" if post else "PUT", target, headers, body, chunked=chunked)
    members = _strict_body(body, post)
    if not mutate:
        assert members is not None
        svc.expect_written(r, key, compact(value))
    elif 200 <= r.status < 300:
        assert members is not None, f"an invalid body was accepted: {body[:200]!r}"
        stored = Entry(r.text)
        assert json.loads(stored.value) == json.loads(members["value"]) or stored.value == members["value"].strip()
        svc.record_write(r)
    else:
        assert r.status in (400, 413), r
        code = json.loads(r.body)["code"]
        assert code in ("invalid_json", "invalid_key", "value_too_large"), r
        if members is not None:
            # Refusing a body the contract accepts: only for a key the contract refuses (a JSON
            # string with a lone surrogate escape has no UTF-8 form: invalid_json is fair too).
            try:
                json.loads(members.get("key", '""')).encode("utf-8")
                surrogate = False
            except UnicodeEncodeError:
                surrogate = True
            assert code == "invalid_key" or surrogate, (body[:200], r)
    if not mutate:
        svc.get(key, no_cache=True)
    svc.tick()


def _nest(depth: int, kinds: list[bool]) -> str:
    out = "1"
    for i in range(depth):
        out = f"[{out}]" if kinds[i % len(kinds)] else f'{{"k":{out}}}'
    return out


@FUZZ
@given(depth=st.one_of(st.integers(1, 300), st.sampled_from([127, 128, 129, 130, 5000])),
       kinds=st.lists(st.booleans(), min_size=1, max_size=8), spaces=st.booleans())
@guarded
def test_nesting_depth(verified, depth, kinds, spaces):
    """Values nesting up to 128 levels are stored and read back; deeper is 400 invalid_json
    (including 5000 levels: no stack overflow). Brackets inside strings do not count."""
    svc = verified
    value = _nest(depth, kinds)
    sent = value.replace(",", ", ").replace(":", " : ") if spaces else value
    key = f"fz/depth/{depth}"
    r = svc.req("PUT", b"/v1/keys/" + quote_key(key), [AUTH], ('{"value":' + sent + "}").encode())
    if depth <= MAX_DEPTH:
        svc.expect_written(r, key, value)
        svc.get(key, no_cache=True)
        items, _ = list_page(svc.req("GET", "/v1/keys?" + urllib.parse.urlencode({"prefix": key})).text)
        assert [e.value for e in items if e.key == key] == [value]
    else:
        assert r.status == 400 and json.loads(r.body)["code"] == "invalid_json", r
    svc.tick()


def test_bodies_with_nul_escapes_and_strings_of_brackets(verified):
    svc = verified
    svc.put("fz/nul-escaped", '"a\\u0000b"')
    svc.put("fz/escapes", '"\\u0027\\\\\\"\\/\\b\\f\\n\\r\\t\\ud83d\\ude00\\u00e9"')
    svc.put("fz/brackets-in-string", '"' + "[" * 1000 + "{" * 1000 + '"')
    svc.put("fz/big-number", "1e999999")
    svc.put("fz/long-int", "1" + "0" * 400)
    for body in (b'{"value":"a\x00b"}', b'{"value":"a\nb"}', b'{"value":"\xff"}',
                 b'{"value":"\xed\xa0\x80"}', b'{"value":NaN}', b'{"value":Infinity}',
                 b'{"value":01}', b'{"value":.5}', b"{'value':1}", b'{"value":1,}', b'{"value"}',
                 b"\x00", b"", b"null", b"[]", b'"value"', b'{"value":1} {"value":2}',
                 b'{"value":1,"value":2}', b'{"Value":1}', b'{"value":1,"ttl_seconds":0}',
                 b'{"value":1,"ttl_seconds":-1}', b'{"value":1,"ttl_seconds":31536001}',
                 b'{"value":1,"ttl_seconds":1.5}', b'{"value":1,"ttl_seconds":"60"}',
                 b'{"value":1,"ttl_seconds":18446744073709551616}', b'{"value":1,"ttl_seconds":true}',
                 b'{"value":1,"key":"fz/nul"}', b'\xef\xbb\xbf{"value":1}', b'{"value":"\\u12"}',
                 b'{"value":"\\x41"}', b'{"value":[1,2}', b'{"value":' + b"[" * 100000):
        r = svc.req("PUT", b"/v1/keys/fz/nul", [AUTH], body)
        assert r.status == 400 and json.loads(r.body)["code"] == "invalid_json", (body[:60], r)
    svc.get("fz/nul")
    r = svc.req("PUT", b"/v1/keys/fz/ttl", [AUTH], b'{"value":1,"ttl_seconds":31536000}')
    svc.expect_written(r, "fz/ttl", "1")
    assert Entry(r.text).expires_at is not None
    r = svc.req("PUT", b"/v1/keys/fz/ttl", [AUTH], b'{"value":2,"ttl_seconds":null}')
    svc.expect_written(r, "fz/ttl", "2")
    assert Entry(r.text).expires_at is None


def test_body_must_be_a_json_object(verified):
    """The body is `{"value": V, "ttl_seconds": N?}` (POST: with "key"): a JSON array is not that
    object, even when its elements line up with the fields. Accepting `[V, N]` positionally means
    `curl -d '[1,2]'` (a client meaning the value [1,2]) stores 1 that expires in 2 seconds."""
    svc = verified
    wrong = []
    for method, target, body in (("PUT", b"/v1/keys/fz/array-body", b"[1]"),
                                 ("PUT", b"/v1/keys/fz/array-body", b'["x", 60]'),
                                 ("PUT", b"/v1/keys/fz/array-body", b'[{"value": null}]'),
                                 ("POST", b"/v1/keys", b'["fz/array-body", {"a": 1}]'),
                                 ("POST", b"/v1/keys", b'["fz/array-body", 1, 60]')):
        r = svc.req(method, target, [AUTH], body)
        code = json.loads(r.body).get("code")
        if (r.status, code) != (400, "invalid_json"):
            wrong.append(f"{method} {target.decode()} {body.decode()} -> {r.status} {r.text[:160]}")
        # Whatever was written (maybe with a TTL) goes, so the model stays exact.
        http(svc.port, "DELETE", b"/v1/keys/fz/array-body", [AUTH])
    svc.resync()
    assert not wrong, "array bodies accepted as objects:\n" + "\n".join(wrong)


def test_large_bodies(verified):
    """10 MB bodies with Content-Length and chunked without it: 413 value_too_large, answered
    (the service reads and discards them) rather than reset; a declared 1 TB body is refused
    before any of it is sent; a value of exactly KV_MAX_VALUE_BYTES is stored, one byte more is
    413; whitespace does not count toward the value limit."""
    svc = verified
    ten = b'{"value":"' + b"a" * (10 * 1024 * 1024) + b'"}'
    for chunked in (False, True):
        t = time.monotonic()
        r = svc.req("PUT", b"/v1/keys/fz/huge", [AUTH], ten, chunked=chunked, timeout=60)
        assert r.status == 413 and json.loads(r.body)["code"] == "value_too_large", r
        assert time.monotonic() - t < 30
        r = svc.req("POST", "/v1/keys", [AUTH], b'{"key":"fz/huge","value":"' + b"b" * (10 * 1024 * 1024) + b'"}',
                    chunked=chunked, timeout=60)
        assert r.status == 413 and json.loads(r.body)["code"] == "value_too_large", r
    for cl in (b"1000000000000", b"33554433"):
        t = time.monotonic()
        r = svc.req("PUT", b"/v1/keys/fz/huge", [AUTH, ("Content-Length", cl)], b'{"value":',
                    content_length=False)
        assert r.status == 413 and json.loads(r.body)["code"] == "value_too_large", r
        assert time.monotonic() - t < 5
    r = svc.req("PUT", b"/v1/keys/fz/huge", [AUTH, ("Content-Length", b"10485760"),
                                             ("Expect", "100-continue")], b"", content_length=False)
    assert r.status == 413, r
    svc.get("fz/huge")
    exact = '"' + "x" * (MAX_VALUE_BYTES - 2) + '"'
    svc.put("fz/exact-limit", exact)
    svc.get("fz/exact-limit", no_cache=True)
    r = svc.req("PUT", b"/v1/keys/fz/over-limit", [AUTH],
                b'{"value":"' + b"x" * (MAX_VALUE_BYTES - 1) + b'"}')
    assert r.status == 413 and json.loads(r.body)["code"] == "value_too_large", r
    padded = "[" + ",   ".join(["1"] * (MAX_VALUE_BYTES // 4)) + "]"
    svc.put("fz/padded", compact(json.loads(padded)),
            body=('{"value":' + padded + "}").encode(), chunked=True)
    wide = compact({f"k{i}": i for i in range(40000)})
    svc.put("fz/wide", wide)
    svc.delete("fz/exact-limit")
    svc.delete("fz/padded")


# ---------------------------------------------------------------------------------------------
# Framing and the HTTP layer


def test_framing_and_smuggling(verified):
    """Malformed/duplicated Content-Length, CL+TE, bad chunk sizes, obs-fold, bad versions: a
    4xx problem document (the HTTP layer's refusals too), never a 5xx; a request hidden in a
    body is never executed; the service keeps serving."""
    svc = verified
    p = svc.port
    smuggled = (b"PUT /v1/keys/fz/smuggled HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + TOKEN.encode() + b"\r\nContent-Length: 11\r\n\r\n{\"value\":1}")
    auth = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    cases = [
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: abc\r\n\r\n{}",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: -1\r\n\r\n{}",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: +11\r\n\r\n{\"value\":1}",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 1.1\r\n\r\n{\"value\":1}",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 0x0b\r\n\r\n{\"value\":1}",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 99999999999999999999999\r\n\r\n",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 11\r\nContent-Length: 12\r\n\r\n{\"value\":1}",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 11, 12\r\n\r\n{\"value\":1}",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled,
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n" + smuggled,
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + smuggled,
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n{}",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n-1\r\n{}\r\n0\r\n\r\n",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"val\r\n0\r\n\r\n",
        b"PUT /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 11\r\n\r\n{\"val",  # short body, then EOF
        b"GET /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        b"GET /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
        b"GET /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\nX-Cr: a\rb\r\n\r\n",
        b"GET /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
        b"GET /v1/keys/fz/f HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET /v1/keys/fz/f HTTP/1.1\nHost: x\n\n",
        b"GET /v1/keys/fz/f\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
        b"G\xc3\xa9T /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n",
        b"GET /v1/keys/fz/f HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (600 * 1024) + b"\r\n\r\n",
    ]
    for raw in cases:
        sock_closed_early = raw.endswith(b'{"val')
        try:
            if sock_closed_early:
                s = socket.create_connection(("127.0.0.1", p), timeout=15)
                s.sendall(raw)
                s.shutdown(socket.SHUT_WR)
                r = _read_response(s, b"PUT")
                s.close()
            else:
                r = http(p, None, None, raw=raw, timeout=15)
        except ConnectionError:
            svc.alive()  # closing a connection on garbage without an answer is fine
            continue
        check(svc, r, method=raw.split(b" ", 1)[0].decode("latin-1"))
        assert 400 <= r.status < 500 or r.status == 505, (raw[:120], r)
    svc.get("fz/f")
    svc.get("fz/smuggled")
    # Limits of the header block: 90 headers and a 64 KiB header are served by the application.
    r = svc.req("GET", b"/v1/keys/fz/f", [(f"X-H{i}", "v") for i in range(90)])
    assert r.status == 404 and json.loads(r.body)["code"] == "not_found", r
    r = svc.req("GET", b"/v1/keys/fz/f", [("X-Big", "a" * 65536), ("Cookie", "c=" + "b" * 65536)])
    assert r.status == 404, r
    r = svc.req("GET", b"/v1/keys/fz/f", version=b"HTTP/1.0")
    assert r.status == 404, r
    r = svc.req("BREW", b"/v1/keys/fz/f")
    assert r.status == 405 and r.h("allow"), r


# ---------------------------------------------------------------------------------------------
# Headers


def _auth_ok(value: str | None) -> bool:
    if value is None or not value.isascii():
        return False
    v = value.strip(" \t")
    scheme, sep, token = v.partition(" ")
    return bool(sep) and scheme.lower() == "bearer" and token.strip(" \t") in TOKENS


def _etag_list(value: str) -> list[str] | None:
    """RFC 9110's `*` / #entity-tag, as the service parses it (weak markers kept); None when
    the value is not such a list (a write is then refused with 400)."""
    m = re.fullmatch(r'[ \t,]*((?:\*|(?:W/)?"[\x21\x23-\x7e]*")(?:[ \t]*,[ \t,]*(?:\*|(?:W/)?"[\x21\x23-\x7e]*"))*)?[ \t,]*', value)
    if m is None:
        return None
    tags = re.findall(r'\*|(?:W/)?"[\x21\x23-\x7e]*"', value)
    if len(tags) > 1 and "*" in tags:
        return None  # "*" / #entity-tag: `*` stands alone
    return tags


def _tags(value: str) -> list[str] | None:
    """The tags of a well-formed list, weak markers dropped; None when there are none."""
    tags = _etag_list(value) if value.isascii() else None
    tags = [t[2:] if t.startswith("W/") else t for t in tags or []]
    return tags or None


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)
header_value = st.one_of(
    header_text,
    st.text(st.sampled_from("\t !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~aZ09W"), max_size=20),
    st.binary(max_size=12).map(lambda b: bytes(c for c in b if c >= 0x80 or 0x20 <= c < 0x7f or c == 9)
                               .decode("latin-1")),
)


@FUZZ
@given(data=st.data(), method=st.sampled_from(["PUT", "POST", "DELETE", "GET"]),
       key=st.one_of(st.sampled_from(["fz/hdr/a", "fz/hdr/b", "fz/hdr/c"]), near_miss),
       auth=st.one_of(st.none(), st.sampled_from([
           f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} ", f"Bearer {TOKEN2}",
           f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", TOKEN, f"Basic {TOKEN}", "Bearer",
           "Bearer ", f"Bearer {TOKEN},{TOKEN2}", f"Bearer\t{TOKEN}", f"Token {TOKEN}",
           f"Bearer {TOKEN} {TOKEN}", "Bearer " + "A" * 5000,
           "Basic " + base64.b64encode(f"u:{TOKEN}".encode()).decode()]), header_value),
       cond=st.one_of(st.none(), st.tuples(st.sampled_from(["If-Match", "If-None-Match", "both"]),
                                           st.one_of(header_value, st.sampled_from(
                                               ["*", "CURRENT", 'W/CURRENT', "CURRENT, \"x\"",
                                                '"x", CURRENT', " , ", ",", "W/", '"1"', '""'])))),
       rid=st.one_of(st.none(), header_value, st.text(st.sampled_from("abcXYZ019._:-"), min_size=1,
                                                     max_size=140), st.just("a" * 128),
                     st.just("a" * 129)),
       junk_headers=st.lists(st.tuples(st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz-_0123456789!#$%&'*+.^`|~"),
                                               min_size=1, max_size=20), header_value), max_size=10))
@guarded
def test_headers(verified, data, method, key, auth, cond, rid, junk_headers):
    """Garbage/odd Authorization, If-Match/If-None-Match, X-Request-Id, Content-Type and unknown
    headers: a write happens only with a configured bearer token and a precondition that holds;
    a sane X-Request-Id is echoed, any other is replaced; nothing else changes."""
    svc = verified
    assume(_valid_new_key(svc, key) or key.startswith("fz/"))
    if method == "PUT" and key not in svc.model and data.draw(st.booleans()):
        svc.put(key, '"seed"')
    rec = svc.model.get(key)
    cur = rec.etag if rec else '"0"'
    headers: list[tuple[str, bytes]] = [(n, v.encode("latin-1")) for n, v in junk_headers
                                        if n.lower() not in ("content-length", "transfer-encoding",
                                                             "host", "connection", "expect",
                                                             "authorization", "if-match",
                                                             "if-none-match", "x-request-id",
                                                             "cache-control", "pragma")]
    if auth is not None:
        headers.append(("Authorization", auth.encode("latin-1")))
    pre = None
    if cond is not None:
        which, v = cond
        v = v.replace("CURRENT", cur)
        names = ["If-Match", "If-None-Match"] if which == "both" else [which]
        for n in names:
            headers.append((n, v.encode("latin-1")))
        pre = (which, v)
    if rid is not None:
        headers.append(("X-Request-Id", rid.encode("latin-1")))
    body = None
    if method == "PUT":
        body = b'{"value":"header fuzz"}'
    elif method == "POST":
        body = json.dumps({"key": key, "value": "header fuzz"}).encode()
    target = "/v1/keys" if method == "POST" else b"/v1/keys/" + quote_key(key)
    r = svc.req(method, target, headers, body)

    got_rid = r.h("x-request-id")
    if rid is not None and SANE_REQUEST_ID.fullmatch(rid.strip(" \t")):
        assert got_rid == rid.strip(" \t"), (rid, got_rid)
    else:
        assert got_rid != rid and re.fullmatch(r"[0-9a-f]{32}", got_rid), (rid, got_rid)

    if method == "GET":
        # RFC 9110 13.2.2 on a read of an existing entry: a readable If-Match that holds no
        # tag equal to the current ETag (strong comparison) fails it; an unreadable one is
        # ignored.
        listed = _etag_list(pre[1]) if pre and pre[1].isascii() else None
        if pre and pre[0] != "If-None-Match" and rec and listed and not ("*" in listed or cur in listed):
            assert r.status == 412 and json.loads(r.body)["code"] == "precondition_failed", (pre, r)
            return
        if pre and pre[0] != "If-Match" and rec and r.status == 304:
            tags = _tags(pre[1]) or []
            assert cur in tags or "*" in tags, (pre, r)
        else:
            svc.expect_read(r, key)
        return

    exists = rec is not None
    ok_auth = _auth_ok(auth)
    if not ok_auth:
        assert r.status == 401 and json.loads(r.body)["code"] == "unauthorized", (auth, r)
        return
    assert r.status != 401, (auth, r)
    allowed = True
    if pre is not None:
        which, v = pre
        if v.isascii() and _etag_list(v) is None:
            # Not * or a list of entity tags: refused, never ignored.
            assert r.status == 400 and json.loads(r.body)["code"] == "invalid_request", (pre, r)
            return
        tags = _tags(v)
        if tags is None:
            # An empty (or non-ASCII) tag list: refused as malformed today; RFC 9110 reads it as
            # a list that matches nothing (If-Match fails, If-None-Match holds). Either will do.
            if r.status == 400:
                assert json.loads(r.body)["code"] == "invalid_request", (pre, r)
                return
            tags = []
        match = exists and ("*" in tags or cur in tags)
        if which == "If-Match":
            allowed = match
        elif which == "If-None-Match":
            allowed = not match
        else:  # both: refused as a bad request today; RFC 9110 13.2.2 would evaluate both
            if r.status == 400:
                assert json.loads(r.body)["code"] == "invalid_request", r
                return
            allowed = False  # If-Match and If-None-Match with the same tags cannot both hold
        if which == "If-Match" and allowed and f"W/{cur}" in v and cur not in v.replace(f"W/{cur}", ""):
            # Weak comparison for If-Match: see test_if_match_uses_strong_comparison.
            if r.status == 412:
                return
    if method == "DELETE":
        if not allowed:
            assert r.status == (412 if exists or (pre and pre[0] != "If-None-Match") else 404), (pre, r)
            if r.status == 412:
                assert json.loads(r.body)["code"] == "precondition_failed"
        else:
            assert r.status == (204 if exists else 404), (pre, r)
            if exists:
                del svc.model[key]
    else:
        if not allowed:
            assert r.status == 412 and json.loads(r.body)["code"] == "precondition_failed", (pre, r)
        else:
            svc.expect_written(r, key, '"header fuzz"')
    svc.tick()


def test_if_match_uses_strong_comparison(verified):
    """RFC 9110 13.1.1: If-Match uses the strong comparison, so a weak tag never matches; the
    write must be refused with 412 (the service only issues strong ETags)."""
    svc = verified
    svc.put("fz/strong", '"v1"')
    etag = svc.model["fz/strong"].etag
    r = svc.req("PUT", b"/v1/keys/fz/strong", [AUTH, ("If-Match", f"W/{etag}")], b'{"value":"v2"}')
    if 200 <= r.status < 300:
        svc.record_write(r)
    assert r.status == 412, f"If-Match: W/{etag} was applied: {r.status}"


# ---------------------------------------------------------------------------------------------
# Query strings and cursors


def _cursor(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


query_name = st.one_of(st.sampled_from(["prefix", "limit", "cursor"]),
                       st.sampled_from(["LIMIT", "Prefix", "limit[]", "", " limit", "offset",
                                        "after", "p", "a", "prefix%00", "lim%69t", "%ZZ", "q"]))
query_value = st.one_of(
    st.sampled_from(["0", "-1", "1", "1000", "1001", "+5", "5.0", "1e3", "0x10", " 5", "５",
                     "99999999999999999999999", "-99999999999999999999", "", "%", "%ZZ", "%A",
                     "%00", "%FF", "%C3", "sentinel/", "sentinel/%", "sentinel/_", "'", "fz/",
                     "Homer", "k" * 513, "%F0%9F%98%80", "a+b", "a%2Bb", "%2525"]),
    st.text(st.characters(codec="utf-8"), max_size=12),
    st.binary(max_size=24).map(lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()),
    st.binary(max_size=24).map(lambda b: base64.b64encode(b).decode()),
    st.builds(_cursor, st.one_of(
        st.fixed_dictionaries({"p": st.sampled_from(["", "sentinel/", "fz/", "zz"]),
                               "a": st.sampled_from(["", "sentinel/", "sentinel/_", "Homer", "\uffff"])}),
        st.fixed_dictionaries({"p": st.text(max_size=3), "a": st.text(max_size=3), "x": st.integers()}),
        st.fixed_dictionaries({"p": st.integers(), "a": st.text(max_size=3)}),
        st.fixed_dictionaries({"a": st.text(max_size=3)}),
        st.just([]), st.just("p"), st.just(None),
    )),
)


def _enc_q(s: str, raw: bool, unsafe: str) -> str:
    """Raw (invalid escapes like %ZZ kept) when the request-target can carry it, else quoted."""
    if raw and all(0x21 <= ord(c) <= 0x7e and c not in unsafe for c in s):
        return s
    return urllib.parse.quote(s, safe="")


@FUZZ
@given(pairs=st.lists(st.tuples(query_name, query_value, st.booleans()), max_size=4),
       path=st.sampled_from(["/v1/keys", "/v1/keys", "/v1/keys", "/v1/stats", "/", "/healthz",
                             "/readyz", "/openapi.json", "/v1/keys/Homer"]),
       head=st.booleans())
@guarded
def test_query_strings(verified, pairs, path, head):
    """Unknown, repeated, mis-encoded and out-of-range query parameters, huge/negative limits and
    garbage or forged cursors: 200 with exactly the model's page, or 400 invalid_request."""
    svc = verified
    parts = [_enc_q(n, raw, "#&=<>`") + "=" + _enc_q(v, raw, "#&<>`") for n, v, raw in pairs]
    qs = "&".join(parts)
    target = path + ("?" + qs if pairs else "")
    r = svc.req("HEAD" if head else "GET", target.encode())
    assert r.status in (200, 400), r
    if r.status == 400 and not head:
        assert json.loads(r.body)["code"] == "invalid_request", r
    parsed = urllib.parse.parse_qsl(qs, keep_blank_values=True)
    if path != "/v1/keys":
        want = 400 if parsed else 200
        assert r.status == want, (target, r)
        if path == "/v1/keys/Homer" and r.status == 200 and not head:
            svc.expect_read(r, "Homer")
        svc.tick()
        return
    names = [n for n, _ in parsed]
    predictable = all(n in ("prefix", "limit", "cursor") for n in names) and len(set(names)) == len(names)
    if not predictable:
        assert r.status == 400, (target, r)
        svc.tick()
        return
    q = dict(parsed)
    if r.status == 400:
        # Refused: must be for a reason the contract gives.
        lim = q.get("limit")
        reasons = [lim is not None and not (re.fullmatch(r"\+?[0-9]+", lim) and 1 <= int(lim) <= 1000),
                   "cursor" in q, len(q.get("prefix", "").encode()) > 512]
        assert any(reasons), (target, r)
        svc.tick()
        return
    # Accepted: the page must be exactly what the model holds.
    limit = int(q.get("limit", "100"))
    prefix, after = q.get("prefix", ""), None
    if "cursor" in q:
        c = json.loads(base64.urlsafe_b64decode(q["cursor"] + "=" * (-len(q["cursor"]) % 4)))
        assert set(c) == {"p", "a"} and isinstance(c["p"], str) and isinstance(c["a"], str), c
        assert "prefix" not in q or q["prefix"] == c["p"], (q, c)
        prefix, after = c["p"], c["a"]
    assert 1 <= limit <= 1000 and len(prefix.encode()) <= 512
    keys = sorted((k for k in svc.model if k.startswith(prefix)
                   and (after is None or k.encode() > after.encode())), key=lambda k: k.encode())
    if head:
        assert r.body == b"" and (r.h("link") is not None) == (len(keys) > limit), (target, r)
        svc.tick()
        return
    items, cursor = list_page(r.text)
    assert [e.key for e in items] == keys[:limit], (target, [e.key for e in items][:5], keys[:5])
    for e in items:
        assert (e.value, e.version) == (svc.model[e.key].value, svc.model[e.key].version)
    assert (cursor is not None) == (len(keys) > limit), (target, cursor)
    svc.tick()


def test_zz_service_survived(verified):
    """After everything above: still alive, still ready, no panic or internal error logged, and
    the whole store (listing in pages of 7, sentinels, database rows) equals the model."""
    svc = verified
    r = svc.req("GET", "/readyz")
    assert r.status == 200, r
    svc.verify_all(small_pages=True)
    assert svc.ops > 1000, f"only {svc.ops} requests were made"


# ---------------------------------------------------------------------------------------------
# schemathesis against the served /openapi.json

SCHEMATHESIS_CONFIG = """
# Every check is on (`[checks] enabled = true` is `--checks all`; the command line's
# `--checks all` would also override the per-operation exception below, so it goes here).
[checks]
enabled = true

# 412 is a documented answer to schema-valid data: a conditional write (If-Match /
# If-None-Match: *) whose precondition does not hold. Whether it holds depends on the stored
# state, which no schema can express, so it counts as an accepted outcome of valid data.
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "412", "429", "5xx"]

# `cursor` is opaque: only values this service issued in `next_cursor` are valid, and any other
# string is 400 by contract (API.md). A schema cannot describe "a value the server issued", so
# positive_data_acceptance cannot apply to the list operations (every other check still runs
# there, and the stateful phase feeds real cursors through the links).
[[operations]]
include-operation-id = ["listKeys", "headListKeys"]
checks.positive_data_acceptance.enabled = false
"""


def test_schemathesis(database_url, kvstore_bin, tmp_path):
    """schemathesis (all checks, all phases, 30 examples per operation, fixed seed) against the
    /openapi.json a fresh instance serves reports no failure."""
    try:
        import schemathesis
    except ImportError:
        pytest.fail("schemathesis is not installed: pip install -r tests/ops/requirements.txt",
                    pytrace=False)
    db = "kv_schemathesis_" + uuid.uuid4().hex[:10]
    _db_cli(database_url, None, f"CREATE DATABASE `{db}`")
    u = urllib.parse.urlparse(database_url)
    proc, port, lines = start_service(kvstore_bin, {
        "KV_DATABASE_URL": urllib.parse.urlunparse(u._replace(path="/" + db))})
    try:
        base = f"http://127.0.0.1:{port}"
        served = requests.get(base + "/openapi.json", timeout=10)
        assert served.status_code == 200
        assert served.json() == json.loads((REPO / "openapi.json").read_text()), \
            "the served /openapi.json differs from openapi.json in the repository"
        config = tmp_path / "schemathesis.toml"
        config.write_text(SCHEMATHESIS_CONFIG)
        cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
               base + "/openapi.json", "--url", base, "--max-examples", "30", "--seed", "20261122",
               "--workers", "1", "--generation-database", "none", "--request-timeout", "20",
               "--no-color"]
        res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        out = res.stdout + res.stderr
        assert proc.poll() is None, "kvstore died under schemathesis:\n" + "\n".join(lines[-30:])
        assert res.returncode == 0, f"schemathesis {schemathesis.__version__} failed " \
            f"({' '.join(cmd[2:])}):\n{out[-12000:]}"
        # schemathesis's "Schema validation mismatch" warning is a heuristic on the share of
        # 4xx answers; on the conditional writes it counts the 412s that random If-Match values
        # must get (accepted above as valid answers). Any other warning, and any failure, fails.
        benign = re.compile(r"^\s*- (PUT|DELETE) /v1/keys/\{key\}$|^\s*- POST /v1/keys$")
        if "No issues found" not in out:
            assert "Schema validation mismatch" in out and "failures" not in out, out[-3000:]
            listed = [l for l in out.splitlines() if l.strip().startswith("- ")
                      and ("/v1/" in l or l.strip().startswith("- GET") or l.strip().startswith("- HEAD"))]
            assert listed and all(benign.match(l) for l in listed), out[-3000:]
            assert out.count("⚠️") <= 2, out[-3000:]
        panics = [l for l in lines if "panicked" in l or '"msg":"internal error"' in l]
        assert not panics, panics[:5]
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        _db_cli(database_url, None, f"DROP DATABASE IF EXISTS `{db}`")
