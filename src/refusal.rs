//! hyper's own refusals, answered as problem documents like every other error.
//!
//! hyper refuses a request it cannot parse before the service sees it: not valid HTTP/1.1
//! (request line, header syntax, `Content-Length`), a target over 64 KiB, a head over its
//! buffer (≈ 400 KiB) or with over 100 header fields. It answers `400`, `414` or `431` with an
//! empty body and `connection: close`, and offers no hook to change that response. So each
//! connection's stream is wrapped in [`RefusalIo`]: a write that is exactly such a head is
//! replaced by `400` with a problem document (`invalid_request`, or `invalid_key` for a key
//! too long to be a request target) and a new request id, and the refusal is counted and
//! logged like any other request (`route` "unmatched", or the key route). API.md's table maps
//! `invalid_request` and `invalid_key` to 400, so the status is 400 for all three; the
//! `detail` says which limit was hit.
//!
//! Cost for every other request (≈ 70 instructions of a cached GET's 18 000): the start of the
//! last buffer of each write is compared, and the first bytes of a request (its method and
//! the start of its target) are kept, with the time they arrived, when the read after a
//! response brings them.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::api::route;
use crate::error::ApiError;
use crate::logging::{Access, AccessLog};
use crate::metrics::{Metrics, METHODS};

/// Bytes of a request kept to name its method and route ("DELETE /v1/keys/" is 16).
const START: usize = 16;

/// Where a refusal is recorded: the HTTP metrics and the access log.
pub struct Recorder {
    pub metrics: Arc<Metrics>,
    pub access: AccessLog,
}

/// Where a connection stands between requests, as its stream sees it: for the timer that
/// tells an idle keep-alive connection from a slow request head (`app::ConnectionTimer`), and
/// for the accept loop, which at its connection limit closes idle connections to make room.
///
/// The stream reports bytes read and responses written; the timer reports when hyper begins
/// to wait for a request head. Bytes read before that wait began (the rest of a body hyper
/// drains after answering without reading it, or a pipelined request's start) do not start
/// the next request's header timeout: they leave the connection idle.
pub struct RequestClock {
    base: Instant,
    /// `NEW`, `IDLE`, or `BEGAN` + nanoseconds after `base` when the current request's first
    /// bytes came.
    state: AtomicU64,
    /// Set by [`RequestClock::close_if_idle`]: the stream ends as soon as it is read while
    /// still idle.
    close: AtomicBool,
    /// The task reading the stream while it is idle, to wake when it is to be closed.
    reader: AtomicWaker,
}

const NEW: u64 = 0;
const IDLE: u64 = 1;
const BEGAN: u64 = 2;

/// See [`RequestClock::phase`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing answered and nothing received yet: a new connection.
    New,
    /// Answered, and no byte of another request since hyper began waiting for one.
    Idle,
    /// The current request's first bytes came at this instant.
    Began(Instant),
}

impl RequestClock {
    pub fn new() -> RequestClock {
        RequestClock {
            base: Instant::now(),
            state: AtomicU64::new(NEW),
            close: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.state.load(Ordering::Relaxed) {
            NEW => Phase::New,
            IDLE => Phase::Idle,
            n => Phase::Began(self.base + std::time::Duration::from_nanos(n - BEGAN)),
        }
    }

    fn is_idle(&self) -> bool {
        self.state.load(Ordering::Relaxed) == IDLE
    }

    /// Bytes were read at `at`: on a new or idle connection, a request has begun.
    pub(crate) fn bytes_read(&self, at: Instant) {
        if matches!(self.state.load(Ordering::Relaxed), NEW | IDLE) {
            let nanos = at.saturating_duration_since(self.base).as_nanos();
            let n = u64::try_from(nanos).unwrap_or(u64::MAX - BEGAN);
            self.state.store(BEGAN + n, Ordering::Relaxed);
        }
    }

    /// A response (or part of one) was written.
    pub(crate) fn responded(&self) {
        self.state.store(IDLE, Ordering::Relaxed);
    }

    /// hyper begins to wait for a request head: whatever was read before belongs to no
    /// request whose head is awaited (see the type), so an answered connection is idle.
    pub(crate) fn head_wait_began(&self) {
        if self.state.load(Ordering::Relaxed) >= BEGAN {
            self.state.store(IDLE, Ordering::Relaxed);
        }
    }

    /// Asks an idle connection to close (it reads end-of-stream, which hyper takes as the
    /// client hanging up between requests); false, and nothing done, if it is not idle.
    pub fn close_if_idle(&self) -> bool {
        if !self.is_idle() {
            return false;
        }
        self.close.store(true, Ordering::Relaxed);
        self.reader.wake();
        true
    }

    /// Whether a read of the stream should end it now (idle and asked to close); else
    /// registers the reading task for [`RequestClock::close_if_idle`] while idle.
    fn ends_here(&self, cx: &Context<'_>) -> bool {
        if !self.is_idle() {
            return false;
        }
        self.reader.register(cx.waker());
        self.close.load(Ordering::Relaxed)
    }
}

impl Default for RequestClock {
    fn default() -> Self {
        RequestClock::new()
    }
}

/// A connection's stream, with hyper's automatic refusals rewritten (see the module), and
/// its request boundaries reported to its [`RequestClock`].
pub struct RefusalIo<S> {
    inner: S,
    recorder: Arc<Recorder>,
    clock: Arc<RequestClock>,
    /// The next bytes read start a request (set at accept and by every write), so the
    /// current request's start is not known yet.
    fresh: bool,
    /// The first bytes of the current request, and when they came.
    start: [u8; START],
    start_len: usize,
    started: Instant,
    /// The replacement being written for hyper's refusal.
    swap: Option<Swap>,
}

struct Swap {
    bytes: Vec<u8>,
    written: usize,
    /// Length of hyper's head it stands for (reported written once the swap is).
    replaces: usize,
}

impl<S> RefusalIo<S> {
    pub fn new(inner: S, recorder: Arc<Recorder>, clock: Arc<RequestClock>) -> Self {
        RefusalIo {
            inner,
            recorder,
            clock,
            fresh: true,
            start: [0; START],
            start_len: 0,
            started: Instant::now(),
            swap: None,
        }
    }

    /// The response that stands for hyper's refusal with `status`: counted and
    /// logged here, as `api::handle` does for the requests it answers.
    fn replacement(&self, status: u16, tail: &[u8]) -> Vec<u8> {
        // Nothing read since the last response: the refused request came with an earlier
        // one (pipelined), and its start is unknown.
        let (method, target) = if self.fresh {
            ("OTHER", &b""[..])
        } else {
            request_start(&self.start[..self.start_len])
        };
        let key = target.starts_with(b"/v1/keys/");
        let error = match status {
            414 if key => ApiError::InvalidKey(
                "the key is longer than a request target may be (64 KiB); the limit is 512 bytes"
                    .into(),
            ),
            414 => ApiError::InvalidRequest("the request target is longer than 64 KiB".into()),
            431 => ApiError::InvalidRequest(
                "the request head is too large: over 400 KiB, or over 100 header fields".into(),
            ),
            _ => ApiError::InvalidRequest(
                "the request is not valid HTTP/1.1 (request line, header syntax or framing)".into(),
            ),
        };
        let id = crate::api::new_request_id();
        let id = id.to_str().unwrap_or_default();
        let body = error.problem_json(id);
        let mut out = Vec::with_capacity(256 + body.len());
        out.extend_from_slice(b"HTTP/1.1 400 Bad Request\r\n");
        out.extend_from_slice(b"content-type: application/problem+json\r\n");
        out.extend_from_slice(b"cache-control: no-store\r\n");
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\nconnection: close\r\ncontent-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        // hyper's remaining lines (`date`, then the blank line) close the new head.
        out.extend_from_slice(tail);
        // The answer to a HEAD has the head only (its Content-Length is the GET's).
        let sent = if method == "HEAD" { &[][..] } else { &body[..] };
        out.extend_from_slice(sent);

        let route = if key { route::KEY } else { route::UNMATCHED };
        let elapsed = self.started.elapsed();
        let rec = &self.recorder;
        rec.metrics.observe_http(method, route, 400, elapsed);
        rec.access.line(&Access {
            id: id.as_bytes(),
            method,
            route,
            status: 400,
            elapsed,
            bytes: sent.len() as u64,
        });
        out
    }
}

/// What hyper writes before `date` in its automatic refusals: the status line, then these.
const REFUSAL_HEADERS: &[u8] = b"connection: close\r\ncontent-length: 0\r\n";

/// The status of `head` and its lines after [`REFUSAL_HEADERS`] (`date`, the blank line) if
/// it is one of hyper's automatic refusals, byte for byte as hyper 1.x writes them (the
/// service's own 400s are problem documents, whose first header is `content-type`).
fn automatic_refusal(head: &[u8]) -> Option<(u16, &[u8])> {
    let rest = head.strip_prefix(b"HTTP/1.1 ")?;
    let status = match rest.get(..4)? {
        b"400 " => 400,
        b"414 " => 414,
        b"431 " => 431,
        _ => return None,
    };
    let line = head.windows(2).position(|w| w == b"\r\n")? + 2;
    let tail = head[line..].strip_prefix(REFUSAL_HEADERS)?;
    head.ends_with(b"\r\n\r\n").then_some((status, tail))
}

/// The method label and the start of the target of a request's first bytes.
fn request_start(start: &[u8]) -> (&'static str, &[u8]) {
    let mut parts = start.splitn(2, |b| *b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let label = METHODS[..METHODS.len() - 1]
        .iter()
        .find(|m| m.as_bytes() == method)
        .unwrap_or(&"OTHER");
    (label, target)
}

impl<S: AsyncRead + Unpin> AsyncRead for RefusalIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.clock.ends_here(cx) {
            // Closed to make room at the connection limit: end-of-stream between requests.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if new.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if this.fresh {
            let n = new.len().min(START);
            this.start[..n].copy_from_slice(&new[..n]);
            this.start_len = n;
            this.started = Instant::now();
            this.fresh = false;
            this.clock.bytes_read(this.started);
        } else if this.clock.is_idle() {
            this.clock.bytes_read(Instant::now());
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> RefusalIo<S> {
    /// After a write starting with `first`: the next bytes read start a new request, and
    /// the connection is answered, unless this was an interim `100 Continue` (the request's
    /// body is still to come, so the connection is not idle).
    fn wrote(&mut self, first: &[u8], r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.fresh = true;
                if !first.starts_with(b"HTTP/1.1 1") {
                    self.clock.responded();
                }
            }
        }
        r
    }

    /// Writes the replacement for hyper's refusal `head`; done, it reports `head` written.
    fn poll_swap(&mut self, cx: &mut Context<'_>, head: &[u8]) -> Poll<io::Result<usize>> {
        if self.swap.is_none() {
            let (status, tail) = automatic_refusal(head).unwrap_or((400, b"\r\n"));
            let bytes = self.replacement(status, tail);
            self.swap = Some(Swap {
                bytes,
                written: 0,
                replaces: head.len(),
            });
        }
        let swap = self.swap.as_mut().expect("set above");
        while swap.written < swap.bytes.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &swap.bytes[swap.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            swap.written += n;
        }
        let replaces = swap.replaces;
        self.swap = None;
        Poll::Ready(Ok(replaces))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RefusalIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = if this.swap.is_some() || automatic_refusal(buf).is_some() {
            this.poll_swap(cx, buf)
        } else {
            Pin::new(&mut this.inner).poll_write(cx, buf)
        };
        this.wrote(buf, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // hyper queues nothing after a refusal (it closes the connection): only the last
        // buffer can be one. Anything queued before it goes out first.
        let last = bufs.iter().rposition(|b| !b.is_empty());
        let written = match last {
            Some(i) if this.swap.is_some() || automatic_refusal(&bufs[i]).is_some() => {
                if bufs[..i].iter().all(|b| b.is_empty()) {
                    // (Offered again after a `Pending` while the swap is being written.)
                    this.poll_swap(cx, &bufs[i])
                } else {
                    Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs[..i])
                }
            }
            _ => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
        };
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        this.wrote(first, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &[u8] = b"date: Tue, 01 Dec 2026 00:47:46 GMT\r\n\r\n";

    fn hyper_refusal(status_line: &[u8]) -> Vec<u8> {
        [status_line, REFUSAL_HEADERS, DATE].concat()
    }

    #[test]
    fn only_hypers_own_refusals_are_recognised() {
        for (line, status) in [
            (&b"HTTP/1.1 400 Bad Request\r\n"[..], 400),
            (b"HTTP/1.1 414 URI Too Long\r\n", 414),
            (b"HTTP/1.1 431 Request Header Fields Too Large\r\n", 431),
        ] {
            assert_eq!(
                automatic_refusal(&hyper_refusal(line)),
                Some((status, DATE))
            );
        }
        // The service's own responses, and anything cut short, pass through.
        for other in [
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 0\r\n\r\n".to_vec(),
            hyper_refusal(b"HTTP/1.1 200 OK\r\n"),
            hyper_refusal(b"HTTP/1.1 404 Not Found\r\n"),
            hyper_refusal(b"HTTP/1.1 400 Bad Request\r\n")[..60].to_vec(),
            b"HTTP/1.1 400".to_vec(),
            b"{\"HTTP/1.1 400 \"}".to_vec(),
            Vec::new(),
        ] {
            assert_eq!(automatic_refusal(&other), None, "{}", String::from_utf8_lossy(&other));
        }
    }

    /// Through a pipe that takes 7 bytes at a time: what went before the refusal arrives
    /// unchanged, then the whole problem document in its place; hyper is told its bytes
    /// were written, and no more. The refusal is counted; nothing was read after the response
    /// before it, so its request came pipelined behind the first and is not named.
    #[tokio::test]
    async fn a_refusal_is_replaced_whole_through_partial_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(7);
        let metrics = Arc::new(Metrics::new("0", "test"));
        let recorder = Arc::new(Recorder {
            metrics: metrics.clone(),
            access: AccessLog::off(),
        });
        let mut io = RefusalIo::new(server, recorder, Arc::default());
        let reader = tokio::spawn(async move {
            // What the pipe holds at once: the server reads it, then nothing more.
            client.write_all(b"GET /v1").await.unwrap();
            let mut out = Vec::new();
            client.read_to_end(&mut out).await.unwrap();
            out
        });
        let mut request = [0u8; 64];
        let n = io.read(&mut request).await.unwrap();
        assert!(n > 0);
        let before = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec();
        let refusal = hyper_refusal(b"HTTP/1.1 400 Bad Request\r\n");
        let (mut a, mut b) = (&before[..], &refusal[..]);
        let mut reported = 0;
        while !a.is_empty() || !b.is_empty() {
            let n = io
                .write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
                .await
                .unwrap();
            assert!(n > 0 && n <= a.len() + b.len());
            reported += n;
            let from_a = n.min(a.len());
            a = &a[from_a..];
            b = &b[n - from_a..];
        }
        assert_eq!(reported, before.len() + refusal.len());
        io.shutdown().await.unwrap();
        let out = reader.await.unwrap();
        let text = String::from_utf8(out).unwrap();
        let (first, rest) = text.split_at(before.len());
        assert_eq!(first.as_bytes(), &before[..]);
        let (head, body) = rest.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\n"
            ),
            "{head}"
        );
        assert!(head.ends_with("\r\nconnection: close\r\ncontent-length: 216\r\ndate: Tue, 01 Dec 2026 00:47:46 GMT"), "{head}");
        let doc: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(doc["code"], "invalid_request");
        assert_eq!(doc["status"], 400);
        assert!(head.contains(&format!(
            "\r\nx-request-id: {}\r\n",
            doc["request_id"].as_str().unwrap()
        )));
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.contains(r#"kvstore_http_requests_total{method="OTHER",route="unmatched",status_class="4xx"} 1"#),
            "{text}"
        );
    }

    /// The clock follows the stream: new, a request begun when its first bytes are read,
    /// idle once anything is written, begun again with the next request's bytes.
    #[tokio::test]
    async fn the_request_clock_follows_reads_and_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(4096);
        let recorder = Arc::new(Recorder {
            metrics: Arc::new(Metrics::new("0", "test")),
            access: AccessLog::off(),
        });
        let clock = Arc::new(RequestClock::new());
        let mut io = RefusalIo::new(server, recorder, clock.clone());
        let mut buf = [0u8; 64];
        assert_eq!(clock.phase(), Phase::New);
        let before = Instant::now();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(io.read(&mut buf).await.unwrap() > 0);
        let Phase::Began(first) = clock.phase() else {
            panic!("{:?}", clock.phase())
        };
        assert!(first >= before && first <= Instant::now());
        // More of the same head: still the same request.
        client.write_all(b"Host: x\r\n\r\n").await.unwrap();
        assert!(io.read(&mut buf).await.unwrap() > 0);
        assert_eq!(clock.phase(), Phase::Began(first));
        // An interim 100 Continue is not the answer: the body is still to come.
        io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(clock.phase(), Phase::Began(first));
        assert!(
            !clock.close_if_idle(),
            "a connection with a request under way is not idle"
        );
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(clock.phase(), Phase::Idle);
        client
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        assert!(io.read(&mut buf).await.unwrap() > 0);
        assert!(matches!(clock.phase(), Phase::Began(t) if t >= first));
        // Answered and idle: asked to close, the stream ends at its next read.
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert!(clock.close_if_idle());
        client.write_all(b"GET /late HTTP/1.1\r\n").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 0, "read end-of-stream");
    }

    #[test]
    fn the_request_start_names_method_and_target() {
        for (start, method, target) in [
            (&b"DELETE /v1/keys/"[..], "DELETE", &b"/v1/keys/"[..]),
            (b"GET /v1/keys/aaaa", "GET", b"/v1/keys/aaaa"),
            (b"BREW /pot", "OTHER", b"/pot"),
            (b"GARBAGE\r\n\r\n", "OTHER", b""),
        ] {
            let got = request_start(start);
            assert_eq!(got, (method, target), "{}", String::from_utf8_lossy(start));
        }
    }
}
