//! `/v1/keys/{key}` and `/v1/keys`: the read path (with the cache, see `cache.rs`), the
//! write path (store transaction, then cache update), listing with opaque cursors.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use warp::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use warp::path::Tail;
use warp::reply::Response;

use super::{auth, finish, json_response, route, Body, Req, State};
use crate::cache::CachedEntry;
use crate::error::ApiError;
use crate::store::{Precondition, WriteOutcome};
use crate::time;

pub const MAX_KEY_BYTES: usize = 512;
pub const TTL_MAX_SECONDS: u64 = 31_536_000;
pub const LIST_DEFAULT_LIMIT: usize = 100;
pub const LIST_MAX_LIMIT: usize = 1000;
/// A listing page stops once it holds this many bytes of keys and values (one entry at
/// least): a page of 1000 values of 1 MiB would otherwise be 1 GB in memory, twice.
pub const LIST_MAX_PAGE_BYTES: usize = 4 << 20;
/// Oversized bodies are read and discarded (never buffered) up to this much, so that a
/// client still sending gets the 413 instead of a connection reset.
const DRAIN_MAX_BYTES: usize = 32 * 1024 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
const ALLOW_KEY: &str = "GET, HEAD, PUT, DELETE";
const ALLOW_KEYS: &str = "GET, HEAD, POST";

/// Characters escaped in a key's path segment (`/` stays: keys may contain it).
const KEY_PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `/v1/keys` and `/v1/keys/{key}`, one warp route: a key costs one path match.
pub async fn dispatch(tail: Tail, req: Req, body: Option<Body>, state: Arc<State>) -> Response {
    let path = tail.as_str();
    // Until the migrations have run, the schema may be half there (0001 committed, the seed
    // and the procedures not yet): a write then could take the change-log id the seed
    // migration inserts, and wedge it for every replica.
    if !state
        .health
        .migrated
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        let route = if path.is_empty() {
            req.route
        } else {
            route::KEY
        };
        let e = ApiError::Unavailable(
            "the database schema is not ready yet (migrations pending); retry shortly".into(),
        );
        return finish(&state, &req, route, Err(e));
    }
    if path.is_empty() {
        if req.route == route::KEYS {
            // Boxed, like every path but a key's GET: their state machines are large, and a
            // cached GET would otherwise carry (and copy) their size.
            return Box::pin(collection(req, body, &state)).await;
        }
        // `/v1/keys/` names the empty key, which is not a key.
        let e = ApiError::InvalidKey("the key is empty".into());
        return finish(&state, &req, route::KEY, Err(e));
    }
    let r = match req.method {
        Method::GET | Method::HEAD => match key_from_path(path) {
            Ok(key) => get(&state, &req, &key).await,
            Err(e) => Err(e),
        },
        _ => Box::pin(change(path, &req, body, &state)).await,
    };
    finish(&state, &req, route::KEY, r)
}

/// `/v1/keys/{key}`: PUT, DELETE (and the methods it does not allow).
async fn change(
    path: &str,
    req: &Req,
    body: Option<Body>,
    state: &State,
) -> Result<Response, ApiError> {
    let key = key_from_path(path)?;
    match req.method {
        Method::PUT => {
            auth::check_write(&state.config, req)?;
            req.query_params(&[])?;
            let _memory = hold_body_memory(state, &req.headers).await?;
            let raw = read_body(body, &req.headers, state).await?;
            let parsed: PutBody = parse_json(&raw)?;
            let value = parsed.value;
            write(state, req, key.into_owned(), value, parsed.ttl_seconds).await
        }
        Method::DELETE => delete(state, req, &key).await,
        _ => Err(not_allowed(req, ALLOW_KEY)),
    }
}

/// `/v1/keys`: GET/HEAD list, POST upsert.
async fn collection(req: Req, body: Option<Body>, state: &State) -> Response {
    let r = async {
        match req.method {
            Method::GET | Method::HEAD => list(state, &req).await,
            Method::POST => {
                auth::check_write(&state.config, &req)?;
                req.query_params(&[])?;
                let _memory = hold_body_memory(state, &req.headers).await?;
                let raw = read_body(body, &req.headers, state).await?;
                let parsed: PostBody = parse_json(&raw)?;
                validate_key(&parsed.key)?;
                write(state, &req, parsed.key, parsed.value, parsed.ttl_seconds).await
            }
            _ => Err(not_allowed(&req, ALLOW_KEYS)),
        }
    }
    .await;
    finish(state, &req, route::KEYS, r)
}

fn not_allowed(req: &Req, allow: &'static str) -> ApiError {
    ApiError::MethodNotAllowed {
        method: req.method.to_string(),
        allow,
    }
}

async fn get(state: &State, req: &Req, key: &str) -> Result<Response, ApiError> {
    auth::check_read(&state.config, req)?;
    req.query_params(&[])?;
    // One pass over the request's headers (a handful, usually) rather than a lookup for
    // each name: `no-cache` in any Cache-Control or Pragma, and whether any precondition is
    // there at all.
    let (mut bypass, mut conditional) = (false, false);
    for (name, value) in &req.headers {
        if name == header::CACHE_CONTROL || name == header::PRAGMA {
            bypass |= value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
            });
        } else if name == header::IF_NONE_MATCH
            || name == header::IF_MATCH
            || name == header::IF_MODIFIED_SINCE
            || name == header::IF_UNMODIFIED_SINCE
        {
            conditional = true;
        }
    }
    let (item, source) = state
        .cache
        .get(key, bypass, &state.store, time::now_micros())
        .await?;
    let db_unreachable = !state
        .health
        .db_up
        .load(std::sync::atomic::Ordering::Relaxed);
    let cache_status = source.header(db_unreachable);
    let Some(item) = item else {
        let mut resp = ApiError::NotFound(format!("no key {key:?}")).into_response(req.id());
        resp.headers_mut()
            .insert(CACHE_STATUS.clone(), cache_status);
        return Ok(resp);
    };
    let outcome = if conditional {
        read_precondition(&req.headers, &item)
    } else {
        ReadOutcome::Send
    };
    if outcome == ReadOutcome::Failed {
        return Err(ApiError::PreconditionFailed(format!(
            "the precondition (If-Match / If-Unmodified-Since) does not hold for key {key:?}"
        )));
    }
    let mut resp = entry_response(StatusCode::OK, item);
    if outcome == ReadOutcome::NotModified {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        *resp.body_mut() = Bytes::new().into();
        resp.headers_mut().remove(header::CONTENT_TYPE);
    }
    resp.headers_mut()
        .insert(CACHE_STATUS.clone(), cache_status);
    Ok(resp)
}

/// An entry's response: its document with `ETag`, `Last-Modified` and `Cache-Control`.
fn entry_response(status: StatusCode, item: CachedEntry) -> Response {
    let (etag, last_modified, body) = item.into_parts();
    let mut resp = json_response(status, body);
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag);
    h.insert(header::LAST_MODIFIED, last_modified);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

async fn write(
    state: &State,
    req: &Req,
    key: String,
    value: &RawValue,
    ttl_seconds: Option<u64>,
) -> Result<Response, ApiError> {
    let value = compact_json(value.get()).ok_or_else(|| {
        ApiError::InvalidJson(format!(
            "the value nests deeper than {MAX_VALUE_DEPTH} levels"
        ))
    })?;
    if has_lone_surrogate(&value) {
        return Err(ApiError::InvalidJson(
            "the value holds a \\u escape of a lone UTF-16 surrogate (such as \\ud800 without \
             its pair): that is not Unicode text, and strict JSON parsers refuse to read it back"
                .into(),
        ));
    }
    if value.len() > state.config.max_value_bytes {
        return Err(ApiError::ValueTooLarge(format!(
            "the value is {} bytes of JSON; the limit is {} bytes",
            value.len(),
            state.config.max_value_bytes
        )));
    }
    let ttl = match ttl_seconds {
        None => None,
        Some(t @ 1..=TTL_MAX_SECONDS) => Some(t as u32),
        Some(t) => {
            return Err(ApiError::InvalidJson(format!(
                "ttl_seconds must be between 1 and {TTL_MAX_SECONDS}, got {t}"
            )))
        }
    };
    let pre = precondition(req)?;
    let outcome = state.store.upsert(&key, &value, ttl, &pre).await?;
    let (status, entry) = match outcome {
        WriteOutcome::Created(e) => (StatusCode::CREATED, e),
        WriteOutcome::Replaced(e) => (StatusCode::OK, e),
        WriteOutcome::PreconditionFailed => return Err(precondition_failed(&key)),
        WriteOutcome::Deleted { .. } | WriteOutcome::NotFound => {
            return Err(ApiError::Internal(
                "upsert returned a delete outcome".into(),
            ))
        }
    };
    let item = CachedEntry::new(&entry);
    state
        .cache
        .put_written(&key, Some(item.clone()), entry.rev)
        .await;
    state.metrics.writes.with_label_values(&["upsert"]).inc();
    let mut resp = entry_response(status, item);
    if status == StatusCode::CREATED {
        if let Ok(v) = HeaderValue::from_str(&key_location(&key)) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
    }
    Ok(resp)
}

async fn delete(state: &State, req: &Req, key: &str) -> Result<Response, ApiError> {
    auth::check_write(&state.config, req)?;
    req.query_params(&[])?;
    let pre = precondition(req)?;
    match state.store.delete(key, &pre).await? {
        WriteOutcome::Deleted { rev } => {
            state.cache.put_written(key, None, rev).await;
            state.metrics.writes.with_label_values(&["delete"]).inc();
            let mut r = Response::new(Bytes::new().into());
            *r.status_mut() = StatusCode::NO_CONTENT;
            Ok(r)
        }
        WriteOutcome::NotFound => Err(ApiError::NotFound(format!("no key {key:?}"))),
        WriteOutcome::PreconditionFailed => Err(precondition_failed(key)),
        WriteOutcome::Created(_) | WriteOutcome::Replaced(_) => Err(ApiError::Internal(
            "delete returned an upsert outcome".into(),
        )),
    }
}

fn precondition_failed(key: &str) -> ApiError {
    ApiError::PreconditionFailed(format!(
        "the precondition (If-Match / If-None-Match) does not hold for key {key:?}"
    ))
}

/// `If-Match` / `If-None-Match` of a write (both may be given; both must hold).
fn precondition(req: &Req) -> Result<Precondition, ApiError> {
    let list = |name: header::HeaderName| -> Result<Option<Vec<String>>, ApiError> {
        let values: Vec<&HeaderValue> = req.headers.get_all(&name).iter().collect();
        if values.is_empty() {
            return Ok(None);
        }
        let mut tags = Vec::new();
        for v in values {
            let text = v.to_str().map_err(|_| {
                ApiError::InvalidRequest(format!("the {name} header is not visible ASCII"))
            })?;
            // A condition the service cannot read is refused, not ignored: an ignored
            // If-None-Match would let the write through unconditionally.
            tags.extend(etag_list(text).ok_or_else(|| {
                ApiError::InvalidRequest(format!(
                    "the {name} header is not * or a list of entity tags (\"…\" or W/\"…\", quotes included)"
                ))
            })?);
        }
        Ok(Some(tags))
    };
    Ok(Precondition {
        if_match: list(header::IF_MATCH)?,
        if_none_match: list(header::IF_NONE_MATCH)?,
    })
}

/// Parses an entity-tag list header (RFC 9110 §8.8.3, §13.1: `*`, or `"a", W/"b"`, commas
/// allowed inside the quotes), keeping weak markers; `None` if it is not one (`*` together
/// with tags included). Empty list elements are skipped, as RFC 9110 §5.6.1 asks of
/// recipients.
fn etag_list(v: &str) -> Option<Vec<String>> {
    let mut tags = Vec::new();
    let mut rest = v.trim_start_matches([' ', '\t', ',']);
    while !rest.is_empty() {
        let len = if rest.starts_with('*') {
            1
        } else {
            let weak = if rest.starts_with("W/") { 2 } else { 0 };
            let quoted = rest[weak..].strip_prefix('"')?;
            // etagc: %x21 / %x23-7E / obs-text, i.e. anything visible but the quote.
            let end = quoted.find('"')?;
            if quoted[..end].bytes().any(|b| b <= b' ' || b == 0x7f) {
                return None;
            }
            weak + end + 2
        };
        tags.push(rest[..len].to_owned());
        rest = rest[len..].trim_start_matches([' ', '\t']);
        if !rest.is_empty() {
            rest = rest.strip_prefix(',')?.trim_start_matches([' ', '\t', ',']);
        }
    }
    // `*` stands alone: `"*" / #entity-tag`, not a list holding both.
    if tags.len() > 1 && tags.iter().any(|t| t == "*") {
        return None;
    }
    Some(tags)
}

/// What the preconditions of a read of an existing entry decide.
#[derive(Debug, PartialEq, Eq)]
enum ReadOutcome {
    Send,
    /// `304 Not Modified`.
    NotModified,
    /// `412 Precondition Failed`.
    Failed,
}

/// RFC 9110 §13.2.2 for a `GET`/`HEAD` of an entry that exists (a read that would be a 404
/// ignores its preconditions): `If-Match`, else `If-Unmodified-Since`, may fail it (412);
/// then `If-None-Match`, else `If-Modified-Since`, may make it a 304. A header the service
/// cannot read is ignored on a read (RFC 9110 lets a recipient ignore an invalid date; a
/// malformed entity-tag list is treated the same way), so the full answer is sent.
fn read_precondition(headers: &HeaderMap, item: &CachedEntry) -> ReadOutcome {
    let tags = |name: header::HeaderName| -> Option<Vec<String>> {
        let mut tags = Vec::new();
        for v in headers.get_all(name) {
            tags.extend(etag_list(v.to_str().ok()?)?);
        }
        // An empty list (`If-Match: ,`) is read as no header.
        (!tags.is_empty()).then_some(tags)
    };
    let date = |name: header::HeaderName| {
        // A date sent twice is not a date (RFC 9110 §13.1.3, §13.1.4).
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => httpdate::parse_http_date(v.to_str().ok()?).ok(),
            _ => None,
        }
    };
    // Last-Modified has whole seconds, and so do the dates compared with it.
    let modified = std::str::from_utf8(item.last_modified())
        .ok()
        .and_then(|v| httpdate::parse_http_date(v).ok());
    if let Some(tags) = tags(header::IF_MATCH) {
        // Strong comparison: a weak tag never matches.
        if !tags.iter().any(|t| t == "*" || t.as_bytes() == item.etag()) {
            return ReadOutcome::Failed;
        }
    } else if let (Some(since), Some(modified)) = (date(header::IF_UNMODIFIED_SINCE), modified) {
        if modified > since {
            return ReadOutcome::Failed;
        }
    }
    if headers.contains_key(header::IF_NONE_MATCH) {
        if tags(header::IF_NONE_MATCH).is_some_and(|tags| none_match(&tags, item.etag())) {
            return ReadOutcome::NotModified;
        }
    } else if let (Some(since), Some(modified)) = (date(header::IF_MODIFIED_SINCE), modified) {
        if modified <= since {
            return ReadOutcome::NotModified;
        }
    }
    ReadOutcome::Send
}

/// `If-None-Match` on a read: weak comparison.
fn none_match(tags: &[String], etag: &[u8]) -> bool {
    tags.iter()
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t).as_bytes() == etag)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cursor {
    p: String,
    a: String,
}

fn encode_cursor(prefix: &str, after: &str) -> String {
    let json = serde_json::to_vec(&Cursor {
        p: prefix.into(),
        a: after.into(),
    })
    .expect("cursor");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn decode_cursor(c: &str) -> Result<Cursor, ApiError> {
    let bad = || ApiError::InvalidRequest("cursor is not one this service issued".into());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| bad())?;
    serde_json::from_slice(&raw).map_err(|_| bad())
}

async fn list(state: &State, req: &Req) -> Result<Response, ApiError> {
    auth::check_read(&state.config, req)?;
    let q = req.query_params(&["prefix", "limit", "cursor"])?;
    let limit = match q.get("limit") {
        None => LIST_DEFAULT_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=LIST_MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::InvalidRequest(format!(
                    "limit must be an integer between 1 and {LIST_MAX_LIMIT}, got {l:?}"
                ))
            })?,
    };
    let (prefix, after) = match q.get("cursor") {
        Some(c) => {
            let cur = decode_cursor(c)?;
            if q.get("prefix").is_some_and(|p| *p != cur.p) {
                return Err(ApiError::InvalidRequest(
                    "prefix differs from the one the cursor was issued for".into(),
                ));
            }
            (cur.p, Some(cur.a))
        }
        None => (q.get("prefix").cloned().unwrap_or_default(), None),
    };
    if prefix.len() > MAX_KEY_BYTES {
        return Err(ApiError::InvalidRequest(format!(
            "prefix is longer than {MAX_KEY_BYTES} bytes"
        )));
    }
    if prefix.bytes().any(|b| b <= 0x1f || b == 0x7f) {
        return Err(ApiError::InvalidRequest(
            "prefix contains a control character (no key can)".into(),
        ));
    }
    let (rows, more) = state
        .store
        .list(&prefix, after.as_deref(), limit, LIST_MAX_PAGE_BYTES)
        .await?;
    let next = if more {
        rows.last().map(|e| encode_cursor(&prefix, &e.key))
    } else {
        None
    };

    let mut body = Vec::with_capacity(64 + rows.iter().map(|e| e.value.len() + 200).sum::<usize>());
    body.extend_from_slice(b"{\"items\":[");
    for (i, e) in rows.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        e.write_json(&mut body);
    }
    body.extend_from_slice(b"],\"next_cursor\":");
    serde_json::to_writer(&mut body, &next).expect("cursor json");
    body.push(b'}');
    let mut resp = json_response(StatusCode::OK, body);
    if let Some(c) = next {
        let link = format!("</v1/keys?cursor={c}&limit={limit}>; rel=\"next\"");
        resp.headers_mut()
            .insert(header::LINK, HeaderValue::from_str(&link).expect("ASCII"));
    }
    Ok(resp)
}

/// The path of a key's URL. Segments `.` and `..` are spelled `%2E` and `%2E%2E`: a client
/// that resolves dot segments (RFC 3986 §5.2.4, as curl does) would otherwise follow
/// `Location: /v1/keys/a/..` to `/v1/keys/`, another resource.
pub fn key_location(key: &str) -> String {
    let mut path = String::with_capacity(9 + key.len());
    path.push_str("/v1/keys");
    for segment in key.split('/') {
        path.push('/');
        match segment {
            "." => path.push_str("%2E"),
            ".." => path.push_str("%2E%2E"),
            s => path.extend(utf8_percent_encode(s, KEY_PATH)),
        }
    }
    path
}

/// The key of `/v1/keys/{key}`: percent-decoded (borrowed when it has no escapes), then
/// validated.
pub fn key_from_path(raw: &str) -> Result<std::borrow::Cow<'_, str>, ApiError> {
    let key = super::percent_decode(raw).map_err(|e| match e {
        super::DecodeError::MalformedEscape => ApiError::InvalidKey(
            "the key has a malformed percent-escape ('%' must be followed by two hex digits)"
                .into(),
        ),
        super::DecodeError::NotUtf8 => {
            ApiError::InvalidKey("the key is not valid UTF-8 after percent-decoding".into())
        }
    })?;
    validate_key(&key)?;
    Ok(key)
}

/// 1 to 512 bytes of UTF-8, no control characters (U+0000–U+001F, U+007F).
pub fn validate_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::InvalidKey("the key is empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::InvalidKey(format!(
            "the key is {} bytes long; the limit is {MAX_KEY_BYTES} bytes",
            key.len()
        )));
    }
    // Bytes, not chars: control characters are ASCII, and UTF-8 never uses ASCII bytes inside
    // a longer character.
    if key.bytes().any(|b| b <= 0x1f || b == 0x7f) {
        return Err(ApiError::InvalidKey(
            "the key contains a control character".into(),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody<'a> {
    #[serde(borrow)]
    value: &'a RawValue,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostBody<'a> {
    key: String,
    #[serde(borrow)]
    value: &'a RawValue,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

fn parse_json<'a, T: Deserialize<'a>>(raw: &'a [u8]) -> Result<T, ApiError> {
    if raw.starts_with("\u{feff}".as_bytes()) {
        return Err(ApiError::InvalidJson(
            "the body starts with a byte order mark (U+FEFF): send the JSON without it".into(),
        ));
    }
    // serde's derive would also take a JSON array as the fields in order: refuse it.
    if raw.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidJson(
            "the body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(raw).map_err(|e| {
        ApiError::InvalidJson(format!(
            "the body is not the JSON this endpoint expects: {e}"
        ))
    })
}

/// Deepest nesting of arrays/objects accepted in a value (serde_json's own parse limit),
/// so that no client reading it back trips over its parser's recursion limit.
pub const MAX_VALUE_DEPTH: usize = 128;

/// Removes the whitespace outside strings: the value is stored as compact JSON text, byte
/// for byte what the client sent otherwise (key order, number spelling, escapes).
/// `json` must be valid JSON; `None` when it nests deeper than [`MAX_VALUE_DEPTH`].
pub fn compact_json(json: &str) -> Option<String> {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut depth = 0usize;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            match c {
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_VALUE_DEPTH {
                        return None;
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            out.push(c);
        }
    }
    Some(out)
}

/// Whether valid JSON text holds a `\u` escape of a UTF-16 surrogate outside a pair
/// (`"\ud800"` alone): the JSON grammar allows it, but it is no Unicode text, and strict
/// parsers (serde_json among them, so also this service's own key field) refuse it. In
/// valid JSON every backslash is in a string and starts an escape, so a scan of the
/// backslashes finds every `\u`.
pub fn has_lone_surrogate(json: &str) -> bool {
    let b = json.as_bytes();
    let hex = |at: usize| {
        json.get(at..at + 4)
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    let mut i = 0;
    while let Some(off) = b.get(i..).and_then(|r| r.iter().position(|&c| c == b'\\')) {
        let at = i + off;
        if b.get(at + 1) != Some(&b'u') {
            i = at + 2; // \" \\ \/ \b \f \n \r \t
            continue;
        }
        match hex(at + 2) {
            Some(0xD800..=0xDBFF) => {
                let low = b.get(at + 6..at + 8) == Some(&b"\\u"[..])
                    && matches!(hex(at + 8), Some(0xDC00..=0xDFFF));
                if !low {
                    return true;
                }
                i = at + 12;
            }
            Some(0xDC00..=0xDFFF) => return true,
            _ => i = at + 6,
        }
    }
    false
}

/// The largest request body accepted: room for a value at the limit written with
/// generous whitespace, plus the key and the other fields.
pub fn body_limit(max_value_bytes: usize) -> usize {
    max_value_bytes * 2 + 64 * 1024
}

/// The request's `Content-Length`, if it declares a readable one.
fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Reserves memory for a write's request body, until the write is done: its declared
/// `Content-Length`, or the largest body allowed when it declares none (chunked), so that
/// all bodies in memory at once stay within `KV_BODY_MEMORY_BYTES`. Without it, a few dozen
/// concurrent writes of large values could take a pod past its memory limit (≈ 2 MiB of
/// body each, and as much again for the value taken out of it). Waits at most
/// `KV_DB_ACQUIRE_TIMEOUT`, like a write waiting for a database connection, then `503`.
/// A body declared over the limit reserves nothing: `read_body` refuses it.
async fn hold_body_memory<'a>(
    state: &'a State,
    headers: &HeaderMap,
) -> Result<Option<tokio::sync::SemaphorePermit<'a>>, ApiError> {
    let limit = body_limit(state.config.max_value_bytes);
    let declared = content_length(headers).unwrap_or(limit);
    if declared > limit {
        return Ok(None);
    }
    let kib = u32::try_from(declared.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let wait = state.config.db_acquire_timeout;
    match tokio::time::timeout(wait, state.body_memory.acquire_many(kib)).await {
        Ok(Ok(permit)) => Ok(Some(permit)),
        _ => Err(ApiError::Unavailable(
            "too many request bodies in memory at once (KV_BODY_MEMORY_BYTES); retry shortly"
                .into(),
        )),
    }
}

/// Reads the whole body within the request timeout, refusing it (413) as soon as it is
/// known to exceed the limit: by its Content-Length, or while streaming.
async fn read_body(
    body: Option<Body>,
    headers: &HeaderMap,
    state: &State,
) -> Result<Bytes, ApiError> {
    let Some(body) = body else {
        return Ok(Bytes::new());
    };
    let body = body.into_data_stream();
    let limit = body_limit(state.config.max_value_bytes);
    let too_large = || {
        ApiError::ValueTooLarge(format!(
            "the request body exceeds the limit of {limit} bytes"
        ))
    };
    let declared = content_length(headers);
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut body = std::pin::pin!(body);
    if declared.is_some_and(|n| n > limit) {
        if !expects_continue && declared.is_some_and(|n| n <= DRAIN_MAX_BYTES) {
            drain(&mut body, 0).await;
        }
        return Err(too_large());
    }
    let read = async {
        let mut buf = BytesMut::with_capacity(declared.unwrap_or(8 * 1024).min(limit));
        while let Some(chunk) = body.next().await {
            let mut chunk = chunk.map_err(|_| {
                ApiError::InvalidRequest("the request body could not be read".into())
            })?;
            if buf.len() + chunk.remaining() > limit {
                let seen = buf.len() + chunk.remaining();
                drop(buf);
                drain(&mut body, seen).await;
                return Err(too_large());
            }
            while chunk.has_remaining() {
                let part = chunk.chunk();
                buf.put_slice(part);
                let n = part.len();
                chunk.advance(n);
            }
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(state.config.request_timeout, read)
        .await
        .unwrap_or(Err(ApiError::RequestTimeout))
}

/// Reads and discards the rest of an oversized body (bounded in bytes and time).
async fn drain<S, B, E>(body: &mut std::pin::Pin<&mut S>, mut seen: usize)
where
    S: Stream<Item = Result<B, E>>,
    B: Buf,
{
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while seen <= DRAIN_MAX_BYTES {
            match body.next().await {
                Some(Ok(chunk)) => seen += chunk.remaining(),
                _ => break,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(
            key_from_path("app/config/color").unwrap(),
            "app/config/color"
        );
        assert_eq!(key_from_path("a%2Fb%20c").unwrap(), "a/b c");
        assert_eq!(key_from_path("%C3%A9t%C3%A9").unwrap(), "été");
        assert_eq!(key_from_path("").unwrap_err().code(), "invalid_key");
        assert_eq!(key_from_path("%FF").unwrap_err().code(), "invalid_key");
        assert_eq!(key_from_path("a%00b").unwrap_err().code(), "invalid_key");
        assert_eq!(key_from_path("a%7Fb").unwrap_err().code(), "invalid_key");
        assert_eq!(key_from_path("a%0Ab").unwrap_err().code(), "invalid_key");
        assert_eq!(key_from_path("pct%A").unwrap_err().code(), "invalid_key");
        assert_eq!(key_from_path("pct%%41").unwrap_err().code(), "invalid_key");
        assert_eq!(key_from_path("100%25").unwrap(), "100%");
        // Without escapes the path is the key, checked the same way.
        assert_eq!(key_from_path("été/∑").unwrap(), "été/∑");
        assert_eq!(
            key_from_path("a\u{85}b").unwrap(),
            "a\u{85}b",
            "U+0085 is allowed"
        );
        for bad in ["a\u{1}b", "a\u{7f}b", "\t"] {
            assert_eq!(
                key_from_path(bad).unwrap_err().code(),
                "invalid_key",
                "{bad:?}"
            );
        }
        assert!(key_from_path(&"k".repeat(512)).is_ok());
        assert_eq!(
            key_from_path(&"k".repeat(513)).unwrap_err().code(),
            "invalid_key"
        );
        assert!(validate_key(&"k".repeat(512)).is_ok());
        assert!(validate_key(&"k".repeat(513)).is_err());
        // 512 bytes is counted in bytes: 256 two-byte characters fit, 257 do not.
        assert!(validate_key(&"é".repeat(256)).is_ok());
        assert!(validate_key(&"é".repeat(257)).is_err());
    }

    #[test]
    fn locations_name_the_key_and_survive_dot_segment_removal() {
        for (key, path) in [
            ("app/config/color", "/v1/keys/app/config/color"),
            ("a b/é?#%", "/v1/keys/a%20b/%C3%A9%3F%23%25"),
            ("fresh/..", "/v1/keys/fresh/%2E%2E"),
            ("x/../y/./z", "/v1/keys/x/%2E%2E/y/%2E/z"),
            ("..", "/v1/keys/%2E%2E"),
            ("a..b/.c/...", "/v1/keys/a..b/.c/..."),
            ("a//b/", "/v1/keys/a//b/"),
        ] {
            assert_eq!(key_location(key), path, "{key:?}");
            // What the service reads back from that path is the key again.
            let tail = path.strip_prefix("/v1/keys/").unwrap();
            assert_eq!(key_from_path(tail).unwrap(), key, "{key:?}");
            // No segment a client would resolve away is left.
            assert!(!path.split('/').any(|s| s == "." || s == ".."), "{path}");
        }
    }

    #[test]
    fn bodies_must_be_one_json_object() {
        assert!(parse_json::<PutBody>(b" {\"value\": [1]}").is_ok());
        for (body, why) in [
            (&b"\xef\xbb\xbf{\"value\": 1}"[..], "byte order mark"),
            (b"[1]", "must be a JSON object"),
            (b"", "must be a JSON object"),
            (b"{\"value\": 1} x", "not the JSON"),
            (b"{\"value\": 1, \"other\": 2}", "unknown field"),
        ] {
            let Err(e) = parse_json::<PutBody>(body) else {
                panic!("{body:?} was accepted")
            };
            assert_eq!(e.code(), "invalid_json");
            assert!(e.to_string().contains(why), "{body:?}: {e}");
        }
    }

    #[test]
    fn compacts_outside_strings_only() {
        let c = |s: &str| compact_json(s).unwrap();
        assert_eq!(
            c(" { \"a b\" : [1, 2.50 ,\n\"x \\\" y\"] } "),
            "{\"a b\":[1,2.50,\"x \\\" y\"]}"
        );
        assert_eq!(c("\"\\\\\"  "), "\"\\\\\"");
        assert_eq!(c("{\"z\":1,\"a\":2}"), "{\"z\":1,\"a\":2}");
        assert_eq!(c("\"[[[{{{\""), "\"[[[{{{\"");
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(compact_json(&deep(MAX_VALUE_DEPTH)).is_some());
        assert!(compact_json(&deep(MAX_VALUE_DEPTH + 1)).is_none());
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = encode_cursor("app/", "app/x");
        let d = decode_cursor(&c).unwrap();
        assert_eq!((d.p.as_str(), d.a.as_str()), ("app/", "app/x"));
        assert!(decode_cursor("not-a-cursor!").is_err());
        assert!(
            decode_cursor(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("{}")).is_err()
        );
    }

    #[test]
    fn lone_surrogates() {
        for ok in [
            r#""plain""#,
            r#""\ud83d\ude00""#,
            r#""\u00e9\n\\u""#,
            r#"{"\\ud800":1}"#,
            r#"["\uD83D\uDE00x"]"#,
        ] {
            assert!(!has_lone_surrogate(ok), "{ok}");
        }
        for bad in [
            r#""\ud800""#,
            r#""\udc00""#,
            r#""a\uDBFFb""#,
            r#""\ud83d\u0041""#,
            r#"["ok","\ude00"]"#,
            r#""\ud800\ud800""#,
        ] {
            assert!(has_lone_surrogate(bad), "{bad}");
        }
    }

    #[test]
    fn etag_lists() {
        assert_eq!(
            etag_list("\"1\", W/\"2\" ,\"3\"").unwrap(),
            vec!["\"1\"", "W/\"2\"", "\"3\""]
        );
        assert_eq!(etag_list(" * ").unwrap(), vec!["*"]);
        // Commas inside quotes are part of the tag; empty elements are skipped.
        assert_eq!(
            etag_list(" ,\"a,b\",, \t\"\" ,").unwrap(),
            vec!["\"a,b\"", "\"\""]
        );
        assert_eq!(etag_list("").unwrap(), Vec::<String>::new());
        // Not entity tags: unquoted, unterminated, a weak marker alone, two tags without a
        // comma, a space inside the quotes.
        for bad in [
            "71",
            "\"unterminated",
            "W/",
            "\"a\" \"b\"",
            "\"a b\"",
            "W/7",
            "*x",
            "*, \"zzz\"",
            "\"zzz\", *",
            "*, *",
        ] {
            assert_eq!(etag_list(bad), None, "{bad}");
        }
        let matches = |header: &str, etag: &[u8]| none_match(&etag_list(header).unwrap(), etag);
        assert!(matches("W/\"2\"", b"\"2\""));
        assert!(matches("\"1\", \"2\"", b"\"2\""));
        assert!(matches("*", b"\"2\""));
        assert!(!matches("\"1\"", b"\"2\""));
    }
}
