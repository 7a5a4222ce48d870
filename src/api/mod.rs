//! The HTTP API: warp routes, and the per-request envelope (request id, access log,
//! metrics) around them.
//!
//! Handlers never reject: each returns a full response, errors included (one error type,
//! [`ApiError`], rendered as RFC 9457 problem+json with the request id). The only warp
//! rejections left are "no route matched", answered by the fallback as a 404 problem.

pub mod auth;
pub mod health;
pub mod keys;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt as _;
use warp::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request};
use warp::reply::Response;
use warp::Filter;

use crate::cache::Cache;
use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::{self, Metrics};
use crate::store::Store;

/// Route templates: the `route` label of metrics and of the access log (never a raw key).
pub mod route {
    pub const KEY: &str = "/v1/keys/{key}";
    pub const KEYS: &str = "/v1/keys";
    pub const STATS: &str = "/v1/stats";
    pub const ROOT: &str = "/";
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";
    pub const OPENAPI: &str = "/openapi.json";
    pub const UNMATCHED: &str = "unmatched";
    /// The metrics port's one route (access lines only: not a label of the HTTP metrics).
    pub const METRICS: &str = "/metrics";
    /// Every template (`UNMATCHED` last).
    pub const ALL: [&str; 8] = [KEY, KEYS, STATS, ROOT, HEALTHZ, READYZ, OPENAPI, UNMATCHED];
}

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Process-wide health flags, shared by the probes and the background tasks.
#[derive(Default)]
pub struct Health {
    pub migrated: AtomicBool,
    /// The invalidation poller knows where the change log stands (caching is on).
    pub cache_armed: AtomicBool,
    pub db_up: AtomicBool,
    pub shutting_down: AtomicBool,
}

impl Health {
    /// `None` when ready, else the reason it is not.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.shutting_down.load(Ordering::Relaxed) {
            Some("the instance is shutting down")
        } else if !self.migrated.load(Ordering::Relaxed) {
            Some("the database schema is not ready yet (migrations pending)")
        } else if !self.db_up.load(Ordering::Relaxed) {
            Some("the database is unreachable")
        } else if !self.cache_armed.load(Ordering::Relaxed) {
            Some("the cache is not synchronised with the change log yet")
        } else {
            None
        }
    }
}

/// Everything a handler needs.
pub struct State {
    pub config: Config,
    pub store: Store,
    pub cache: Cache,
    pub metrics: Arc<Metrics>,
    pub health: Health,
    pub log: slog::Logger,
    /// The access log (off with `KV_ACCESS_LOG=false`).
    pub access: crate::logging::AccessLog,
    /// Request bodies in memory, all requests together, in KiB (`KV_BODY_MEMORY_BYTES`).
    pub body_memory: tokio::sync::Semaphore,
    pub version: &'static str,
    pub revision: &'static str,
}

/// The request as handlers see it.
pub struct Req {
    pub method: Method,
    pub headers: HeaderMap,
    pub query: String,
    /// The request id (`X-Request-Id`), as sent back.
    pub id: HeaderValue,
    /// The route template of the path ([`route_of`]).
    pub route: &'static str,
}

/// The request body, still unread (only writes read it).
pub type Body = hyper::body::Incoming;

impl Req {
    /// The request id as text (it is always ASCII: see [`request_id`]).
    pub fn id(&self) -> &str {
        self.id.to_str().unwrap_or_default()
    }

    /// Parses the query string (`application/x-www-form-urlencoded`: `+` is a space); every
    /// parameter must be one of `allowed`, at most once, and every name and value must
    /// percent-decode to UTF-8 (a malformed `%` or invalid UTF-8 is refused, not replaced).
    pub fn query_params(&self, allowed: &[&str]) -> Result<HashMap<String, String>, ApiError> {
        let decode = |s: &str| {
            let s = s.replace('+', " ");
            percent_decode(&s).map(|c| c.into_owned()).map_err(|e| {
                ApiError::InvalidRequest(format!("the query string is malformed: {e}"))
            })
        };
        let mut out = HashMap::new();
        for pair in self.query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (decode(k)?, decode(v)?);
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::InvalidRequest(if allowed.is_empty() {
                    format!("unknown query parameter {k:?}: this endpoint takes none")
                } else {
                    format!(
                        "unknown query parameter {k:?}; allowed: {}",
                        allowed.join(", ")
                    )
                }));
            }
            if out.insert(k.clone(), v).is_some() {
                return Err(ApiError::InvalidRequest(format!(
                    "query parameter {k:?} is repeated"
                )));
            }
        }
        Ok(out)
    }

    pub fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Why a percent-encoded string was refused (the key path and the query string share the
/// rule: one spelling per text, nothing replaced).
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("'%' must be followed by two hex digits")]
    MalformedEscape,
    #[error("it is not valid UTF-8 after percent-decoding")]
    NotUtf8,
}

/// Percent-decodes `raw` strictly: a `%` must start an escape (`%A` or `%%41` is refused,
/// not taken literally), and the bytes must be UTF-8 (not replaced by U+FFFD). Borrows when
/// there is nothing to decode.
pub fn percent_decode(raw: &str) -> Result<std::borrow::Cow<'_, str>, DecodeError> {
    let b = raw.as_bytes();
    if !b.contains(&b'%') {
        return Ok(std::borrow::Cow::Borrowed(raw));
    }
    if b.iter().enumerate().any(|(i, c)| {
        *c == b'%'
            && !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    }) {
        return Err(DecodeError::MalformedEscape);
    }
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| DecodeError::NotUtf8)
}

/// The route template of a path (the `route` label), decided the way the routes are.
pub fn route_of(path: &str) -> &'static str {
    match path {
        "/v1/keys" => route::KEYS,
        "/v1/stats" => route::STATS,
        "/" => route::ROOT,
        "/healthz" => route::HEALTHZ,
        "/readyz" => route::READYZ,
        "/openapi.json" => route::OPENAPI,
        p if p.starts_with("/v1/keys/") => route::KEY,
        _ => route::UNMATCHED,
    }
}

/// Turns a handler result into the response. Internal errors are logged here with their
/// cause (the client only sees the request id).
pub fn finish(
    state: &State,
    req: &Req,
    route: &'static str,
    r: Result<Response, ApiError>,
) -> Response {
    match r {
        Ok(resp) => resp,
        Err(e) => {
            if let ApiError::Internal(cause) = &e {
                slog::error!(state.log, "internal error"; "request_id" => req.id(), "route" => route, "cause" => cause);
            }
            e.into_response(req.id())
        }
    }
}

pub fn json_response(status: warp::http::StatusCode, body: impl Into<bytes::Bytes>) -> Response {
    let mut resp = Response::new(body.into().into());
    *resp.status_mut() = status;
    // Room for the six headers an entry gets (content type, ETag, Last-Modified,
    // Cache-Control, Cache-Status, request id), so the map is allocated once. No more: http
    // sizes the map for 4/3 of this rounded up to a power of two, and eight would make it a
    // 1.2 KiB block, past glibc's per-thread cache, at ≈ 700 instructions a malloc.
    resp.headers_mut().reserve(6);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// What the envelope hands to the route that matches: the request as handlers see it, its
/// body, and the state. warp routes on the path alone: its own filters could only clone the
/// headers, every value a filter extracts is moved through each combinator after it, and
/// routes that captured the state would make each clone of the service bump its count.
struct Ctx {
    state: Arc<State>,
    req: std::cell::RefCell<Option<(Req, Body)>>,
}

tokio::task_local! {
    static CTX: Ctx;
}

/// The route's `Req`, body and state, moved out of the envelope's task-local (routes run
/// only inside [`handle`]). Exactly one route takes them: each route's path filters come
/// first and nothing after the take rejects. (Were they taken twice, the second would see no
/// headers, and so no credentials: it fails closed.)
fn take_req() -> (Req, Option<Body>, Arc<State>) {
    CTX.with(|ctx| {
        let taken = ctx.req.borrow_mut().take();
        debug_assert!(taken.is_some(), "the request was taken twice");
        let (req, body) = match taken {
            Some((req, body)) => (req, Some(body)),
            None => (
                Req {
                    method: Method::GET,
                    headers: HeaderMap::new(),
                    query: String::new(),
                    id: HeaderValue::from_static(""),
                    route: route::UNMATCHED,
                },
                None,
            ),
        };
        (req, body, ctx.state.clone())
    })
}

/// A route's handler, called with what [`take_req`] gives. Its future is boxed: boxed, the
/// filter chain moves a pointer around instead of copying a state machine at every step.
fn to<H, F>(handler: H) -> impl Fn() -> std::pin::Pin<Box<F>> + Clone + Send + Sync + 'static
where
    H: Fn(Req, Option<Body>, Arc<State>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    move || {
        let (req, body, state) = take_req();
        Box::pin(handler(req, body, state))
    }
}

/// All routes of the API port. They capture nothing: cloning the service is free.
pub fn routes(
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    // The hot route extracts only the tail. Its future is not boxed: a key's GET keeps it
    // small (≈ 1.6 KiB; every other path it serves is boxed inside), and that would be a
    // malloc per request large enough to make glibc consolidate its fast bins.
    let keys = warp::path("v1")
        .and(warp::path("keys"))
        .and(warp::path::tail())
        .then(|tail: warp::path::Tail| {
            let (req, body, state) = take_req();
            keys::dispatch(tail, req, body, state)
        });
    let stats = warp::path!("v1" / "stats").then(to(|req, _, state| health::stats(req, state)));
    let root = warp::path::end().then(to(|req, _, state| health::root(req, state)));
    let healthz = warp::path!("healthz").then(to(|req, _, state| health::healthz(req, state)));
    let readyz = warp::path!("readyz").then(to(|req, _, state| health::readyz(req, state)));
    let openapi = warp::path!("openapi.json").then(to(|req, _, state| health::openapi(req, state)));
    let fallback = warp::any().then(to(|req, _, state| async move {
        let e = ApiError::NotFound("no such route; see /openapi.json".into());
        finish(&state, &req, route::UNMATCHED, Err(e))
    }));

    keys.or(stats)
        .unify()
        .or(root)
        .unify()
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .or(openapi)
        .unify()
        .or(fallback)
        .unify()
}

/// A request id from the client if it is sane (1–128 of `[A-Za-z0-9._:-]`), else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(c))
        {
            return v.clone();
        }
    }
    new_request_id()
}

/// A new request id: a random UUID, 32 lower-case hex digits.
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    let id = uuid::Uuid::new_v4().simple().encode_lower(&mut buf);
    HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(id.as_bytes()))
        .expect("uuid is ASCII")
}

/// What warp sees of a request: its head (headers moved out), no body.
pub type Routed = Request<http_body_util::Empty<bytes::Bytes>>;

/// The envelope around every API request: request id in and out, a time budget, the
/// HTTP metrics and the access-log line.
pub async fn handle<S>(state: Arc<State>, mut svc: S, req: Request<Body>) -> Response
where
    S: tower_service::Service<Routed, Response = Response, Error = Infallible>,
{
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let id = request_id(&parts.headers);
    let verb = parts.method.clone();
    let method = metrics::method_label(&verb);
    let route = route_of(parts.uri.path());
    let _in_flight = metrics::GaugeGuard::hold(&state.metrics.http_in_flight);
    // Head and body go to the handlers through `CTX`; warp routes on the path alone.
    let head = Req {
        method: parts.method.clone(),
        headers: std::mem::take(&mut parts.headers),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        id: id.clone(),
        route,
    };
    let req = Request::from_parts(parts, http_body_util::Empty::new());

    let budget = state.config.request_timeout
        + state.config.db_acquire_timeout
        + state.config.db_query_timeout;
    let ctx = Ctx {
        state: state.clone(),
        req: std::cell::RefCell::new(Some((head, body))),
    };
    let call = svc.call(req);
    let answered = run_bounded(CTX.scope(ctx, call), budget).await;
    let id_text = id.to_str().unwrap_or_default();
    let mut resp = match answered {
        Ok(Ok(Ok(resp))) => resp,
        Ok(Ok(Err(never))) => match never {},
        Ok(Err(panic)) => {
            let cause = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            slog::error!(state.log, "internal error: a handler panicked"; "request_id" => id_text, "route" => route, "cause" => cause);
            ApiError::Internal("a handler panicked".into()).into_response(id_text)
        }
        Err(_) => ApiError::Unavailable("the request took too long; retry shortly".into())
            .into_response(id_text),
    };
    let elapsed = start.elapsed();
    let status = stamp(&state.access, &mut resp, &id, &verb, route, elapsed);
    state.metrics.observe_http(method, route, status, elapsed);
    resp
}

/// Runs a request's future for at most `budget` (`Err` past it), catching a panic (`Ok(Err)`).
/// Most requests (cache hits, refusals) are answered by the first poll: they need no timer.
/// A panic in a handler (a bug) is then answered with a 500 problem like any internal error,
/// instead of a connection closed without an answer.
async fn run_bounded<F: Future>(
    routed: F,
    budget: std::time::Duration,
) -> Result<std::thread::Result<F::Output>, tokio::time::error::Elapsed> {
    let mut routed = std::pin::pin!(routed);
    let first = std::future::poll_fn(|cx| {
        let poll = std::panic::catch_unwind(AssertUnwindSafe(|| routed.as_mut().poll(cx)));
        std::task::Poll::Ready(poll)
    })
    .await;
    match first {
        Ok(std::task::Poll::Ready(r)) => Ok(Ok(r)),
        Ok(std::task::Poll::Pending) => {
            tokio::time::timeout(budget, AssertUnwindSafe(routed).catch_unwind()).await
        }
        Err(panic) => Ok(Err(panic)),
    }
}

/// Gives an answered request's response its request id and writes its access line (both
/// ports); returns the status.
pub fn stamp(
    access: &crate::logging::AccessLog,
    resp: &mut Response,
    id: &HeaderValue,
    method: &Method,
    route: &'static str,
    elapsed: std::time::Duration,
) -> u16 {
    resp.headers_mut().insert(REQUEST_ID.clone(), id.clone());
    let status = resp.status().as_u16();
    // The body bytes sent: hyper sends none in answer to a HEAD.
    let bytes = if method == Method::HEAD {
        0
    } else {
        http_body::Body::size_hint(resp.body()).exact().unwrap_or(0)
    };
    access.line(&crate::logging::Access {
        id: id.as_bytes(),
        method: method.as_str(),
        route,
        status,
        elapsed,
        bytes,
    });
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(q: &str) -> Result<HashMap<String, String>, ApiError> {
        Req {
            method: Method::GET,
            headers: HeaderMap::new(),
            query: q.into(),
            id: HeaderValue::from_static("t"),
            route: route::KEYS,
        }
        .query_params(&["prefix", "limit"])
    }

    #[test]
    fn query_strings_decode_strictly() {
        let ok = |q: &str, k: &str, v: &str| {
            assert_eq!(query(q).unwrap().get(k).map(String::as_str), Some(v), "{q}")
        };
        ok("prefix=a%2Fb&limit=3", "prefix", "a/b");
        ok("prefix=%C3%A9t%C3%A9", "prefix", "été");
        ok("prefix=a+b", "prefix", "a b");
        ok("prefix=a%2Bb", "prefix", "a+b");
        ok("prefix=&limit=1", "prefix", "");
        ok("prefix", "prefix", "");
        ok("&&prefix=x&", "prefix", "x");
        assert!(query("").unwrap().is_empty());
        for (q, why) in [
            ("prefix=%FF", "not valid UTF-8"),
            ("prefix=%C3", "not valid UTF-8"),
            ("prefix=%G1", "two hex digits"),
            ("prefix=100%", "two hex digits"),
            ("pre%ZZfix=a", "two hex digits"),
            ("prefix=a&prefix=b", "repeated"),
            ("limit=1&limit=1", "repeated"),
            ("other=1", "unknown query parameter"),
            ("Prefix=a", "unknown query parameter"),
        ] {
            let e = query(q).unwrap_err();
            assert_eq!(e.code(), "invalid_request", "{q}");
            assert!(e.to_string().contains(why), "{q}: {e}");
        }
    }

    #[tokio::test]
    async fn requests_are_bounded_and_their_panics_caught() {
        let budget = std::time::Duration::from_millis(50);
        assert_eq!(run_bounded(async { 7 }, budget).await.unwrap().unwrap(), 7);
        let later = async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            8
        };
        assert_eq!(run_bounded(later, budget).await.unwrap().unwrap(), 8);
        assert!(run_bounded(std::future::pending::<()>(), budget)
            .await
            .is_err());
        // A panic in the first poll, and in a later one.
        let now = async { panic!("in the first poll") };
        assert!(run_bounded(now, budget).await.unwrap().is_err());
        let after = async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            panic!("in a later poll")
        };
        assert!(run_bounded(after, budget).await.unwrap().is_err());
    }

    #[test]
    fn percent_decoding_borrows_or_refuses() {
        assert!(matches!(
            percent_decode("plain/key"),
            Ok(std::borrow::Cow::Borrowed("plain/key"))
        ));
        assert_eq!(percent_decode("100%25").unwrap(), "100%");
        assert_eq!(percent_decode("%41%42").unwrap(), "AB");
        assert_eq!(percent_decode("%A"), Err(DecodeError::MalformedEscape));
        assert_eq!(percent_decode("%%41"), Err(DecodeError::MalformedEscape));
        assert_eq!(percent_decode("%80"), Err(DecodeError::NotUtf8));
    }
}
