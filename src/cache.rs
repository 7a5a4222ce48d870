//! The read-through cache in front of MySQL (moka), and the invariants that need care.
//!
//! - Size is bounded in **bytes** (a weigher), not entries.
//! - Concurrent misses on one key make one query: every insert goes through moka's
//!   `and_compute_with`, which runs one closure per key at a time; a reader that waited finds
//!   the entry the first one loaded.
//! - Absent keys are cached too, for `KV_CACHE_NEGATIVE_TTL`.
//! - An entry never outlives the key's own `expires_at` (per-entry expiry).
//! - **A slow loader never overwrites a newer write.** A loader holds the key's compute lock
//!   while it reads the database, and a write updates the cache only after COMMIT and through
//!   the same lock, so the write's put always lands after the loader's. Two writes of one key
//!   racing to the cache are ordered by revision (the change-log id, which grows with commit
//!   order for one key), so an older write never replaces a newer one.
//! - Cross-replica invalidations remove an entry only if it is older than the change.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::Expiry;
use warp::http::HeaderValue;

use crate::error::DbError;
use crate::metrics::Metrics;
use crate::store::{Entry, Store};
use crate::time::{self, Micros};

/// Per-entry memory beyond key and body, added by the weigher so that the budget is memory:
/// moka's own bookkeeping (hash-table bucket, access and write deques, timer-wheel node,
/// key copies), the `CachedEntry` with its header values, and the allocator's share.
/// Measured: 113 744 small entries (≈ 276 B of key + body each) took ≈ 1 040 B of RSS each.
const ENTRY_OVERHEAD: usize = 768;

/// An entry ready to be served, rendered once at insert: its `ETag`, its `Last-Modified` and
/// its JSON document, three views of one buffer. A hit clones three references to one
/// allocation and checks nothing: the header values were validated here. (An `Arc` around
/// three separately allocated values was five cold cache lines per hit, measured with
/// `perf`; one buffer split per hit revalidated both header values, ≈ 300 instructions.)
#[derive(Clone, Debug)]
pub struct CachedEntry {
    etag: HeaderValue,
    last_modified: HeaderValue,
    body: Bytes,
    pub expires_at: Option<Micros>,
    pub rev: u64,
}

impl CachedEntry {
    pub fn new(e: &Entry) -> CachedEntry {
        let mut buf = e.etag().into_bytes();
        let etag_end = buf.len();
        buf.extend_from_slice(time::http_date(e.updated_at).as_bytes());
        let last_modified_end = buf.len();
        e.write_json(&mut buf);
        let buf = Bytes::from(buf);
        let header = |b: Bytes| HeaderValue::from_maybe_shared(b).expect("ASCII header value");
        CachedEntry {
            etag: header(buf.slice(..etag_end)),
            last_modified: header(buf.slice(etag_end..last_modified_end)),
            body: buf.slice(last_modified_end..),
            expires_at: e.expires_at,
            rev: e.rev,
        }
    }

    /// Bytes of the rendered entry: header values and document.
    pub fn rendered_len(&self) -> usize {
        self.etag.len() + self.last_modified.len() + self.body.len()
    }

    /// The entry's JSON document.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The `ETag` value (quotes included).
    pub fn etag(&self) -> &[u8] {
        self.etag.as_bytes()
    }

    /// The `Last-Modified` value (an HTTP date).
    pub fn last_modified(&self) -> &[u8] {
        self.last_modified.as_bytes()
    }

    /// `ETag`, `Last-Modified` and body as the response takes them.
    pub fn into_parts(self) -> (HeaderValue, HeaderValue, Bytes) {
        (self.etag, self.last_modified, self.body)
    }

    pub fn is_expired(&self, now: Micros) -> bool {
        !crate::store::live_at(self.expires_at, now)
    }
}

/// What the cache holds for a key: the entry, or "absent" (`item: None`).
#[derive(Clone, Debug)]
struct Slot {
    item: Option<CachedEntry>,
    /// Revision this slot reflects (0 for "absent" read from the database).
    rev: u64,
    deadline: Instant,
}

impl Slot {
    /// Neither past its deadline nor holding an entry expired by the wall clock (`now_us`).
    fn fresh(&self, now: Instant, now_us: Micros) -> bool {
        self.deadline > now && self.live(now_us)
    }

    /// Not holding an entry expired at `now_us` ("absent" is live).
    fn live(&self, now_us: Micros) -> bool {
        self.item.as_ref().is_none_or(|i| !i.is_expired(now_us))
    }
}

struct ByDeadline;

impl Expiry<String, Slot> for ByDeadline {
    fn expire_after_create(&self, _: &String, v: &Slot, now: Instant) -> Option<Duration> {
        Some(v.deadline.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        v: &Slot,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.deadline.saturating_duration_since(now))
    }
}

/// How a read was answered (the `Cache-Status` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Hit,
    /// Read from the database; `stored`: the answer went into the cache (not when the
    /// cache is off, or the entry is too large for it).
    Miss {
        stored: bool,
    },
    /// `Cache-Control: no-cache`: read from the database, likewise.
    Bypass {
        stored: bool,
    },
}

impl Source {
    /// The `Cache-Status` value (RFC 9211); a hit served while the database is unreachable
    /// says so.
    pub fn header(self, db_unreachable: bool) -> HeaderValue {
        HeaderValue::from_static(match (self, db_unreachable) {
            (Source::Hit, false) => "kvstore; hit",
            (Source::Hit, true) => "kvstore; hit; detail=db-unreachable",
            (Source::Miss { stored: true }, _) => "kvstore; fwd=miss; stored",
            (Source::Miss { stored: false }, _) => "kvstore; fwd=miss",
            (Source::Bypass { stored: true }, _) => "kvstore; fwd=request; stored",
            (Source::Bypass { stored: false }, _) => "kvstore; fwd=request",
        })
    }
}

pub struct Cache {
    inner: moka::future::Cache<String, Slot>,
    ttl: Duration,
    negative_ttl: Duration,
    /// Entries heavier than this are served but not cached.
    max_entry_weight: usize,
    /// Longest a read may wait for its key's loader plus its own load.
    load_budget: Duration,
    /// When a load last failed: readers that queued behind it fail fast instead of each
    /// waiting its own timeout against a hung database.
    last_failure: Mutex<Option<Instant>>,
    /// False until the cross-replica invalidation poller knows where the change log
    /// stands; until then nothing is cached (a change it cannot see yet could be missed).
    armed: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Cache {
    pub fn new(
        max_bytes: u64,
        ttl: Duration,
        negative_ttl: Duration,
        load_budget: Duration,
        metrics: Arc<Metrics>,
    ) -> Cache {
        let by_size = metrics.cache_evictions.with_label_values(&["size"]);
        let by_expiry = metrics.cache_evictions.with_label_values(&["expired"]);
        let inner = moka::future::Cache::builder()
            .name("kvstore")
            .max_capacity(max_bytes)
            // Room for the entries the budget holds at ≈ 1 KiB each: moka's hash table probes
            // linearly and compares keys through pointers, and by default it grows only at 70 %
            // load, where a hit derefs ≈ 1.8 buckets (cached GETs +2 to +4 % in interleaved
            // runs). Costs ≈ 3 % of the budget in bucket pointers, paged in as they are used.
            .initial_capacity((max_bytes / 1024).min(1 << 20) as usize)
            .weigher(|k: &String, v: &Slot| weight(k, v).try_into().unwrap_or(u32::MAX))
            .expire_after(ByDeadline)
            .eviction_listener(move |_k, _v, cause| match cause {
                RemovalCause::Size => by_size.inc(),
                RemovalCause::Expired => by_expiry.inc(),
                RemovalCause::Explicit | RemovalCause::Replaced => {}
            })
            .build();
        metrics.cache_capacity_bytes.set(max_bytes as i64);
        Cache {
            inner,
            ttl,
            negative_ttl,
            max_entry_weight: (max_bytes / 8) as usize,
            load_budget,
            last_failure: Mutex::new(None),
            armed: AtomicBool::new(false),
            metrics,
        }
    }

    /// Starts caching (called once the invalidation poller has its starting point).
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn is_armed(&self) -> bool {
        self.armed.load(Ordering::SeqCst)
    }

    fn failed_since(&self, t: Instant) -> bool {
        self.last_failure
            .lock()
            .expect("not poisoned")
            .is_some_and(|f| f >= t)
    }

    fn note_failure(&self) {
        *self.last_failure.lock().expect("not poisoned") = Some(Instant::now());
    }

    fn slot(&self, item: Option<CachedEntry>, rev: u64) -> Slot {
        let now = Instant::now();
        let mut deadline = now
            + if item.is_some() {
                self.ttl
            } else {
                self.negative_ttl
            };
        if let Some(exp) = item.as_ref().and_then(|i| i.expires_at) {
            let left = (exp - time::now_micros()).max(0) as u64;
            deadline = deadline.min(now + Duration::from_micros(left));
        }
        Slot {
            item,
            rev,
            deadline,
        }
    }

    /// Reads `key` through the cache: the entry if it is live at `now` (wall clock), else
    /// `None`. `bypass` (`Cache-Control: no-cache`) always queries the database and refreshes
    /// the cache with the answer.
    pub async fn get(
        &self,
        key: &str,
        bypass: bool,
        store: &Store,
        now: Micros,
    ) -> Result<(Option<CachedEntry>, Source), DbError> {
        if !bypass {
            // moka returns no slot past its deadline (it expires entries by the same
            // instant, see `ByDeadline`); the key's own expiry is the wall clock's.
            if let Some(slot) = self.inner.get(key).await {
                if slot.live(now) {
                    self.metrics.cache_hits.inc();
                    return Ok((slot.item, Source::Hit));
                }
            }
        }
        // Boxed: the load is a large state machine, and every future that awaits this one
        // would otherwise carry (and move) its size on the hit path too.
        let (item, source) = Box::pin(self.load(key, bypass, store)).await?;
        Ok((item.filter(|i| !i.is_expired(now)), source))
    }

    /// The miss path of [`Cache::get`]: one load per key at a time.
    async fn load(
        &self,
        key: &str,
        bypass: bool,
        store: &Store,
    ) -> Result<(Option<CachedEntry>, Source), DbError> {
        let started = Instant::now();
        let mut loaded: Option<Option<CachedEntry>> = None;
        let mut failed: Option<DbError> = None;
        let mut stored = false;
        let (loaded_ref, failed_ref, stored_ref) = (&mut loaded, &mut failed, &mut stored);
        let compute = self
            .inner
            .entry_by_ref(key)
            .and_compute_with(|existing| async move {
                let fresh = |s: &Slot| s.fresh(Instant::now(), time::now_micros());
                if !bypass && existing.as_ref().is_some_and(|e| fresh(e.value())) {
                    // Another reader loaded it while we waited for the key's lock.
                    return Op::Nop;
                }
                if self.failed_since(started) {
                    // The load we queued behind failed: do not wait out another timeout.
                    *failed_ref =
                        Some(DbError::Unreachable("a concurrent load just failed".into()));
                    return Op::Nop;
                }
                match store.get(key).await {
                    Err(e) => {
                        // Only a database that does not answer makes the loads queued
                        // behind fail fast; an error of this read alone (a row that does
                        // not decode, say) is this read's.
                        if e.is_unavailable() {
                            self.note_failure();
                        }
                        *failed_ref = Some(e);
                        Op::Nop
                    }
                    Ok(row) => {
                        let item = row.as_ref().map(CachedEntry::new);
                        let rev = item.as_ref().map_or(0, |i| i.rev);
                        *loaded_ref = Some(item.clone());
                        let slot = self.slot(item, rev);
                        if !self.is_armed() || weight(key, &slot) > self.max_entry_weight {
                            Op::Remove
                        } else {
                            *stored_ref = true;
                            Op::Put(slot)
                        }
                    }
                }
            });
        let Ok(result) = tokio::time::timeout(self.load_budget, compute).await else {
            self.metrics.cache_misses.inc();
            return Err(DbError::Timeout("read"));
        };
        if let Some(e) = failed {
            self.metrics.cache_misses.inc();
            return Err(e);
        }
        if let Some(item) = loaded {
            self.metrics.cache_misses.inc();
            let source = if bypass {
                Source::Bypass { stored }
            } else {
                Source::Miss { stored }
            };
            return Ok((item, source));
        }
        self.metrics.cache_hits.inc();
        let item = result.into_entry().and_then(|e| e.into_value().item);
        Ok((item, Source::Hit))
    }

    /// After a committed write on this instance: cache its result (`None` for a delete),
    /// unless the cache already reflects a newer revision.
    pub async fn put_written(&self, key: &str, item: Option<CachedEntry>, rev: u64) {
        let slot = self.slot(item, rev);
        let too_heavy = !self.is_armed() || weight(key, &slot) > self.max_entry_weight;
        self.inner
            .entry_by_ref(key)
            .and_compute_with(|existing| {
                let op = match existing {
                    Some(e) if e.value().rev > rev => Op::Nop,
                    _ if too_heavy => Op::Remove,
                    _ => Op::Put(slot),
                };
                std::future::ready(op)
            })
            .await;
    }

    /// Drops every entry (the change log could not be followed).
    pub fn clear(&self) {
        self.inner.invalidate_all();
    }

    /// Another replica changed `key` at revision `rev`: drop our copy if it is older.
    pub async fn invalidate(&self, key: &str, rev: u64) {
        let r = self
            .inner
            .entry_by_ref(key)
            .and_compute_with(|existing| {
                std::future::ready(match existing {
                    Some(e) if e.value().rev < rev => Op::Remove,
                    _ => Op::Nop,
                })
            })
            .await;
        if matches!(r, moka::ops::compute::CompResult::Removed(_)) {
            self.metrics.cache_invalidations.inc();
        }
    }

    /// Refreshes the cache gauges (called on each scrape).
    pub async fn update_gauges(&self) {
        self.inner.run_pending_tasks().await;
        self.metrics
            .cache_entries
            .set(self.inner.entry_count() as i64);
        self.metrics
            .cache_size_bytes
            .set(self.inner.weighted_size() as i64);
    }

    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    pub fn weighted_size(&self) -> u64 {
        self.inner.weighted_size()
    }

    pub async fn run_pending_tasks(&self) {
        self.inner.run_pending_tasks().await;
    }
}

fn weight(key: &str, slot: &Slot) -> usize {
    key.len() + slot.item.as_ref().map_or(0, CachedEntry::rendered_len) + ENTRY_OVERHEAD
}
