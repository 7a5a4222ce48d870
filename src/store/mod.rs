//! Everything that speaks SQL: the pool, point reads, listing, the write transaction with its
//! counter and change-log rows, stats, the expiry purge and the change-log poll.
//!
//! Every operation gets a connection within `KV_DB_ACQUIRE_TIMEOUT` and finishes within
//! `KV_DB_QUERY_TIMEOUT`, or fails with [`DbError::Timeout`] (→ 503).

pub mod batch;
pub mod coalesce;
pub mod migrations;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use mysql_async::prelude::*;
use mysql_async::{Conn, Pool, Row, Value};

use crate::config::Config;
use crate::error::DbError;
use crate::metrics::{GaugeGuard, Metrics};
use crate::time::{self, Micros};
use batch::{ServerTx, Sql};
use coalesce::Coalescer;

/// Rows of `kv_write_counter`; a write bumps one at random (see sql/0001_schema.sql).
const COUNTER_SLOTS: u64 = 64;
/// How many times a write is retried after a deadlock or a racing create.
const WRITE_ATTEMPTS: usize = 4;

/// One stored entry, as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    /// Compact JSON text.
    pub value: String,
    pub version: u64,
    /// Id of the change-log row of the last write: unique across all writes ever.
    pub rev: u64,
    pub created_at: Micros,
    pub updated_at: Micros,
    pub expires_at: Option<Micros>,
}

/// Whether something that expires at `expires_at` (never: `None`) is still live at `now`:
/// the one expiry rule of the service (an entry is gone from its `expires_at` on).
pub fn live_at(expires_at: Option<Micros>, now: Micros) -> bool {
    expires_at.is_none_or(|e| e > now)
}

impl Entry {
    /// Not expired at `now`.
    pub fn is_live(&self, now: Micros) -> bool {
        live_at(self.expires_at, now)
    }

    /// Strong validator: the revision is never reused, so no ABA across delete + re-create.
    pub fn etag(&self) -> String {
        etag_of(self.rev)
    }
}

pub fn etag_of(rev: u64) -> String {
    format!("\"{rev}\"")
}

impl Entry {
    /// Appends the entry's JSON document, as every endpoint returns it, to `out`. The stored
    /// value is already validated compact JSON, so it is copied as is.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.reserve(self.key.len() + self.value.len() + 160);
        out.extend_from_slice(b"{\"key\":");
        serde_json::to_writer(&mut *out, &self.key).expect("a string serializes");
        out.extend_from_slice(b",\"value\":");
        out.extend_from_slice(self.value.as_bytes());
        out.extend_from_slice(b",\"version\":");
        out.extend_from_slice(self.version.to_string().as_bytes());
        for (name, ts) in [
            ("created_at", Some(self.created_at)),
            ("updated_at", Some(self.updated_at)),
            ("expires_at", self.expires_at),
        ] {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            match ts {
                Some(t) => {
                    out.push(b'"');
                    out.extend_from_slice(time::Rfc3339Micros::new(t).as_bytes());
                    out.push(b'"');
                }
                None => out.extend_from_slice(b"null"),
            }
        }
        out.push(b'}');
    }
}

/// Conditions of a write (RFC 9110 §13.1): `If-Match` and `If-None-Match`, each a list of
/// entity tags or `*`. Both may be given; both must hold. An empty list matches nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Precondition {
    /// Strong comparison: a weak tag (`W/"…"`) never matches.
    pub if_match: Option<Vec<String>>,
    /// Weak comparison: `W/"7"` matches `"7"`.
    pub if_none_match: Option<Vec<String>>,
}

impl Precondition {
    pub const NONE: Precondition = Precondition {
        if_match: None,
        if_none_match: None,
    };

    fn allows(&self, current: Option<u64>) -> bool {
        let etag = current.map(etag_of);
        let if_match_holds = match (&self.if_match, &etag) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(tags), Some(etag)) => tags.iter().any(|t| t == "*" || t == etag),
        };
        let if_none_match_holds = match (&self.if_none_match, &etag) {
            (None, _) | (Some(_), None) => true,
            (Some(tags), Some(etag)) => !tags
                .iter()
                .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag),
        };
        if_match_holds && if_none_match_holds
    }
}

#[derive(Debug)]
pub enum WriteOutcome {
    Created(Entry),
    Replaced(Entry),
    /// Deleted; carries the revision of the delete (for cache ordering).
    Deleted {
        rev: u64,
    },
    NotFound,
    PreconditionFailed,
}

/// A row of the change log.
#[derive(Debug, Clone)]
pub struct Change {
    pub id: u64,
    pub key: String,
}

/// The database side of the service. Cheap to clone.
///
/// Point reads and plain (unconditional) writes are coalesced (see [`coalesce`]): requests
/// that arrive while earlier ones are at the database go together, as one `SELECT … IN (…)` or
/// one transaction of multi-row statements ([`Db::put_many`]), which is what lets MySQL keep
/// up with many concurrent clients. Everything else runs one operation per connection.
#[derive(Clone)]
pub struct Store {
    db: Arc<Db>,
    reads: Arc<Coalescer<String, Option<Entry>>>,
    writes: Arc<Coalescer<Put, WriteOutcome>>,
}

/// Pools, timeouts and metrics: what every operation runs with (the coalescing workers hold
/// this, not the [`Store`], so they end when the last `Store` is dropped).
struct Db {
    pool: Pool,
    /// Two connections of their own for the readiness ping and the change-log poll, so a
    /// saturated pool (overload) neither flips readiness nor stalls cross-replica
    /// invalidation.
    side_pool: Pool,
    metrics: Arc<Metrics>,
    acquire_timeout: Duration,
    query_timeout: Duration,
    connect_timeout: Duration,
    /// This process's id, written with its changes to the change log; a batched write finds
    /// the rows it locked by it (see `lock_and_log`).
    origin: u64,
    /// The last change-log timestamp a write of this instance used (`unique_now`).
    batch_clock: AtomicI64,
}

/// A plain write waiting to be coalesced.
struct Put {
    key: String,
    value: String,
    ttl_seconds: Option<u32>,
}

/// Values larger than this are written on their own, as a prepared `CALL kv_put_v2` (a batch
/// carries values as hexadecimal text, twice their size, and must stay far below
/// `max_allowed_packet`).
const COALESCED_VALUE_MAX: usize = 64 * 1024;

impl Store {
    /// Starts the coalescing workers: needs a Tokio runtime.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Store {
        metrics.db_pool_max.set(config.db_pool_max as i64);
        let db =
            Arc::new(Db {
                pool: Pool::new(config.database.opts().clone()),
                side_pool: Pool::new(
                    mysql_async::OptsBuilder::from_opts(config.database.opts().clone()).pool_opts(
                        config.database.opts().pool_opts().clone().with_constraints(
                            mysql_async::PoolConstraints::new(1, 2).expect("1 <= 2"),
                        ),
                    ),
                ),
                metrics,
                acquire_timeout: config.db_acquire_timeout,
                query_timeout: config.db_query_timeout,
                connect_timeout: config.db_connect_timeout,
                origin: uuid::Uuid::new_v4().as_u64_pair().0 >> 1,
                batch_clock: AtomicI64::new(0),
            });
        // Two batches in flight each for coalesced reads and writes (fewer with a pool under
        // 8: at most a quarter of it each), so the rest stays free for listing, deletes,
        // conditional writes and stats. More in flight means smaller batches, and a batch's
        // cost is mostly per statement: with four, reads averaged 7 keys a batch under 64
        // connections and MariaDB and the service together spent ≈ 15 % more CPU per miss
        // (≈ 25 % per write) than with two. Two batches of up to 64 keys a round trip are far
        // more than one replica's CPU can serve, and one slow batch (a write waiting for a
        // row lock) still leaves the other going. The second batch waits to be half full while
        // the first is in flight (`busy_min`, see store::coalesce).
        let limits = coalesce::Limits {
            workers: (config.db_pool_max / 4).clamp(1, 2),
            max_items: READ_BATCH_MAX,
            // Under 64 connections, a half-full batch while the other is in flight gave the
            // efficiency of one worker (≈ 30 writes or 26 reads a batch; with no minimum,
            // a third of the write batches were single writes): +15 % PUTs, +8 % misses.
            // (The bench gave the same rates with any bound from 0.5 ms to unbounded.)
            busy_min: READ_BATCH_MAX / 2,
            max_linger: Duration::from_millis(1),
            max_weight: usize::MAX,
            max_wait: config.db_acquire_timeout,
        };
        let d = db.clone();
        let reads = Coalescer::spawn(
            limits,
            |_| 1,
            move |keys: Vec<String>| {
                let d = d.clone();
                async move { d.get_many(keys).await }
            },
        );
        let d = db.clone();
        let writes = Coalescer::spawn(
            coalesce::Limits {
                max_items: 64,
                max_weight: 256 * 1024,
                ..limits
            },
            |p: &Put| p.key.len() + p.value.len(),
            move |puts: Vec<Put>| {
                let d = d.clone();
                async move { d.put_many(puts).await }
            },
        );
        Store {
            db,
            reads: Arc::new(reads),
            writes: Arc::new(writes),
        }
    }

    /// Closes every pooled connection (after the HTTP drain, at shutdown).
    pub async fn close(self, within: Duration) {
        let _ = tokio::time::timeout(within, async {
            let _ = self.db.side_pool.clone().disconnect().await;
            let _ = self.db.pool.clone().disconnect().await;
        })
        .await;
    }
    /// A cheap round trip, bounded by `KV_DB_CONNECT_TIMEOUT` (readiness, `/`).
    pub async fn ping(&self) -> Result<(), DbError> {
        let _timer = self.db.metrics.db_timer("ping");
        let within = self.db.connect_timeout;
        let r = tokio::time::timeout(within, async {
            let mut conn = self.db.side_pool.get_conn().await?;
            conn.ping().await.map_err(DbError::from)
        })
        .await
        .unwrap_or(Err(DbError::Timeout("ping")));
        if r.is_err() {
            self.db.metrics.db_errors.with_label_values(&["ping"]).inc();
        }
        r
    }

    /// Applies pending migrations under a named lock (see `migrations`).
    pub async fn migrate(&self) -> Result<Vec<u32>, DbError> {
        let _timer = self.db.metrics.db_timer("migrate");
        let mut conn = self
            .db
            .acquire(&self.db.pool, self.db.connect_timeout)
            .await?;
        migrations::apply(&mut conn).await.map_err(DbError::from)
    }

    /// Point read of a live (not expired) entry (coalesced with concurrent reads).
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, DbError> {
        self.reads.submit(key.to_owned()).await
    }

    /// One page of live entries under `prefix`, after the key `after`, in key order: at most
    /// `limit` entries, and no more once `max_bytes` of keys and values are in the page (one
    /// entry at least, whatever its size). The rows are read one at a time and the rest of the
    /// result discarded, so a page holds at most `max_bytes` plus one entry in memory however
    /// large the values. Returns the page and whether entries follow it.
    pub async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Entry>, bool), DbError> {
        let now = time::now_micros();
        let upper = prefix_upper_bound(prefix.as_bytes());
        let mut sql = String::from(
            "SELECT k, v, version, rev, created_at, updated_at, expires_at FROM kv_entries WHERE ",
        );
        let mut params: Vec<Value> = Vec::with_capacity(4);
        match after {
            Some(a) if a.as_bytes() >= prefix.as_bytes() => {
                sql.push_str("k > ?");
                params.push(Value::Bytes(a.as_bytes().to_vec()));
            }
            _ => {
                sql.push_str("k >= ?");
                params.push(Value::Bytes(prefix.as_bytes().to_vec()));
            }
        }
        if let Some(u) = upper {
            sql.push_str(" AND k < ?");
            params.push(Value::Bytes(u));
        }
        sql.push_str(" AND (expires_at IS NULL OR expires_at > ?) ORDER BY k LIMIT ?");
        params.push(time::to_sql(now));
        // One more than the page: it tells whether entries follow.
        params.push(Value::UInt(limit as u64 + 1));
        let (sql, params) = (sql.as_str(), &params);
        self.db
            .run("list", |mut conn: Conn| {
                Box::pin(async move {
                    let mut result = conn.exec_iter(sql, params.clone()).await?;
                    let (mut page, mut bytes, mut more) = (Vec::new(), 0usize, false);
                    while let Some(row) = result.next().await? {
                        if page.len() == limit || (bytes >= max_bytes && !page.is_empty()) {
                            more = true;
                            break;
                        }
                        let e = entry_from_row(row)?;
                        bytes += e.key.len() + e.value.len();
                        page.push(e);
                    }
                    // The rows not taken are read and dropped one by one.
                    result.drop_result().await?;
                    Ok((page, more))
                })
            })
            .await
    }

    /// Upsert in one transaction: log the change, write the entry, count the write, read back
    /// the version. A plain write is coalesced with concurrent ones (one transaction for all,
    /// see [`Db::put_many`]); a conditional write, or one with a large value, runs alone
    /// ([`Db::put_one`]). Returns only after COMMIT.
    pub async fn upsert(
        &self,
        key: &str,
        value: &str,
        ttl_seconds: Option<u32>,
        pre: &Precondition,
    ) -> Result<WriteOutcome, DbError> {
        if *pre != Precondition::NONE || value.len() > COALESCED_VALUE_MAX {
            return self.db.put_one(key, value, ttl_seconds, pre).await;
        }
        self.writes
            .submit(Put {
                key: key.to_owned(),
                value: value.to_owned(),
                ttl_seconds,
            })
            .await
    }

    /// Delete in one transaction: lock and check the row, then log the change and delete
    /// it (two round trips).
    pub async fn delete(&self, key: &str, pre: &Precondition) -> Result<WriteOutcome, DbError> {
        let origin = self.db.origin;
        self.db
            .run("delete", |conn: Conn| {
                Box::pin(async move {
                    // Unique among this instance's changes: a batch finds its own change-log rows
                    // by origin and timestamp (`lock_and_log`).
                    let now = self.db.unique_now(1);
                    let mut tx = ServerTx::new(conn);
                    let Some(current) = lock_row(&mut tx, key, now).await? else {
                        tx.rollback().await;
                        return Ok(if pre.allows(None) {
                            WriteOutcome::NotFound
                        } else {
                            WriteOutcome::PreconditionFailed
                        });
                    };
                    if !pre.allows(current.live_rev) {
                        tx.rollback().await;
                        return Ok(WriteOutcome::PreconditionFailed);
                    }
                    let mut sql = Sql::with_capacity(300 + 4 * key.len());
                    log_change(&mut sql, key, origin, now);
                    sql.raw(";\nSELECT LAST_INSERT_ID();\nDELETE FROM kv_entries WHERE k = ")
                        .bytes(key.as_bytes())
                        .raw(";\nCOMMIT");
                    let row = tx.batch(sql.into_string()).await?.into_iter().next();
                    tx.finish();
                    let rev = row
                        .and_then(|mut r| r.take::<u64, _>(0))
                        .ok_or_else(|| mysql_async::Error::Other("no id for the change".into()))?;
                    // An expired row is removed too, but to the client it was already gone.
                    Ok(match current.live_rev {
                        Some(_) => WriteOutcome::Deleted { rev },
                        None => WriteOutcome::NotFound,
                    })
                })
            })
            .await
    }

    /// `(live keys, writes_total)`.
    pub async fn stats(&self) -> Result<(u64, u64), DbError> {
        let now = time::now_micros();
        self.db.run("stats", |mut conn: Conn| Box::pin(async move {
                let row: Option<(u64, u64)> = conn
                    .exec_first(
                        "SELECT (SELECT COUNT(*) FROM kv_entries \
                                 WHERE expires_at IS NULL OR expires_at > ?), \
                                CAST((SELECT COALESCE(SUM(n), 0) FROM kv_write_counter) AS UNSIGNED)",
                        (time::to_sql(now),),
                    )
                    .await?;
                Ok(row.unwrap_or((0, 0)))
        }))
        .await
    }

    /// Deletes expired entries and change-log rows older than `keep_changes`, each in
    /// batches until none is left (at most 100 batches a call), the one whether or not the
    /// other failed. Returns the expired entries deleted.
    pub async fn purge(&self, keep_changes: Duration) -> Result<u64, DbError> {
        let now = time::now_micros();
        let entries = self
            .delete_in_batches(
                "DELETE FROM kv_entries WHERE expires_at <= ? LIMIT 1000",
                now,
                1000,
            )
            .await;
        // A batch per 10 000 rows: a busy deployment logs more changes per purge interval
        // than one batch holds (at 10 000 writes/s, 300 000 in 30 s).
        let changes = self
            .delete_in_batches(
                "DELETE FROM kv_changes WHERE changed_at < ? LIMIT 10000",
                now - keep_changes.as_micros() as i64,
                10_000,
            )
            .await;
        changes?;
        entries
    }

    /// Runs `sql` (a `DELETE … WHERE … < ? LIMIT batch`) with `before` until it deletes fewer
    /// than `batch` rows, at most 100 times.
    async fn delete_in_batches(
        &self,
        sql: &'static str,
        before: Micros,
        batch: u64,
    ) -> Result<u64, DbError> {
        let mut deleted = 0;
        for _ in 0..100 {
            let n = self
                .db
                .run("purge", |mut conn: Conn| {
                    Box::pin(async move {
                        conn.exec_drop(sql, (time::to_sql(before),)).await?;
                        Ok(conn.affected_rows())
                    })
                })
                .await?;
            deleted += n;
            if n < batch {
                break;
            }
        }
        Ok(deleted)
    }

    /// The newest change-log id (where a new poller starts).
    pub async fn last_change_id(&self) -> Result<u64, DbError> {
        self.db
            .run("poll", |mut conn: Conn| {
                Box::pin(async move {
                    let id: Option<Option<u64>> =
                        conn.query_first("SELECT MAX(id) FROM kv_changes").await?;
                    Ok(id.flatten().unwrap_or(0))
                })
            })
            .await
    }

    /// Change-log rows after `after`, plus any of the `gaps` ids that have committed since.
    pub async fn changes_since(&self, after: u64, gaps: &[u64]) -> Result<Vec<Change>, DbError> {
        let mut sql = String::from("SELECT id, k FROM kv_changes WHERE id > ?");
        let mut params = vec![Value::UInt(after)];
        if !gaps.is_empty() {
            sql.push_str(" OR id IN (");
            for (i, g) in gaps.iter().enumerate() {
                sql.push_str(if i == 0 { "?" } else { ", ?" });
                params.push(Value::UInt(*g));
            }
            sql.push(')');
        }
        sql.push_str(" ORDER BY id LIMIT 10000");
        let (sql, params) = (sql.as_str(), &params);
        self.db
            .run("poll", |mut conn: Conn| {
                Box::pin(async move {
                    let rows: Vec<(u64, Vec<u8>)> = conn.exec(sql, params.clone()).await?;
                    Ok(rows
                        .into_iter()
                        .map(|(id, k)| Change {
                            id,
                            key: String::from_utf8_lossy(&k).into_owned(),
                        })
                        .collect())
                })
            })
            .await
    }
}

/// Most keys in one coalesced read.
const READ_BATCH_MAX: usize = 64;

/// SQL of a coalesced point read of `n` keys, `n` rounded up to a power of two (a batch is
/// padded by repeating its last key, so a connection prepares at most seven statements).
///
/// Expired rows are filtered by the caller, not in SQL: with only the primary key's IN list
/// to look at, the optimizer does not also estimate a range on `kv_entries_expires_at` for
/// every execution (an `OR` on a nullable indexed column), which cost MariaDB about a third
/// of its CPU per miss.
fn select_in(n: usize) -> &'static str {
    static SQL: OnceLock<Vec<String>> = OnceLock::new();
    let all = SQL.get_or_init(|| {
        (0..=READ_BATCH_MAX.trailing_zeros())
            .map(|p| {
                let marks = vec!["?"; 1 << p].join(", ");
                format!(
                    "SELECT k, v, version, rev, created_at, updated_at, expires_at FROM kv_entries \
                     WHERE k IN ({marks})"
                )
            })
            .collect()
    });
    &all[n.next_power_of_two().trailing_zeros() as usize]
}

impl Db {
    /// Runs `f` on a pooled connection with the acquire and query timeouts, records the
    /// operation's latency and errors, and retries deadlocks / racing creates.
    async fn run<'a, T, F>(&self, operation: &'static str, mut f: F) -> Result<T, DbError>
    where
        F: FnMut(Conn) -> BoxFuture<'a, Result<T, mysql_async::Error>>,
    {
        let _timer = self.metrics.db_timer(operation);
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let r = self.once(operation, &mut f).await;
            match r {
                Err(e) if e.is_retryable() && attempt < WRITE_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(2 * attempt as u64)).await;
                }
                other => break other,
            }
        };
        if result.is_err() {
            self.metrics.db_errors.with_label_values(&[operation]).inc();
        }
        result
    }

    async fn once<'a, T, F>(&self, operation: &'static str, f: &mut F) -> Result<T, DbError>
    where
        F: FnMut(Conn) -> BoxFuture<'a, Result<T, mysql_async::Error>>,
    {
        // The change-log poll runs on the side pool, which the pool gauges leave out: they
        // describe the pool that `kvstore_db_pool_connections_max` bounds.
        let side = operation == "poll";
        let pool = if side { &self.side_pool } else { &self.pool };
        let conn = self.acquire(pool, self.acquire_timeout).await?;
        let _in_use = (!side).then(|| GaugeGuard::hold(&self.metrics.db_pool_in_use));
        match tokio::time::timeout(self.query_timeout, f(conn)).await {
            Ok(r) => r.map_err(DbError::from),
            Err(_) => Err(DbError::Timeout("query")),
        }
    }

    async fn acquire(&self, pool: &Pool, within: Duration) -> Result<Conn, DbError> {
        let _waiting =
            std::ptr::eq(pool, &self.pool).then(|| GaugeGuard::hold(&self.metrics.db_pool_waiting));
        let r = tokio::time::timeout(within, pool.get_conn()).await;
        match r {
            Err(_) => Err(DbError::Timeout("connection")),
            Ok(r) => r.map_err(DbError::from),
        }
    }

    /// Point reads of live entries, one statement for all keys; `None` for an absent or
    /// expired key, in the order of `keys`.
    async fn get_many(&self, keys: Vec<String>) -> Result<Vec<Option<Entry>>, DbError> {
        self.metrics.db_batch_size("get", keys.len());
        let now = time::now_micros();
        let sql = select_in(keys.len());
        let mut params: Vec<Value> = keys
            .iter()
            .map(|k| Value::Bytes(k.as_bytes().to_vec()))
            .collect();
        let last = params.last().cloned().unwrap_or(Value::NULL);
        params.resize(keys.len().next_power_of_two(), last);
        let params = &params;
        let mut found = self
            .run("get", |mut conn: Conn| {
                Box::pin(async move {
                    let rows: Vec<Row> = conn.exec(sql, params.clone()).await?;
                    rows.into_iter()
                        .map(entry_from_row)
                        .filter(|e| e.as_ref().map_or(true, |e| e.is_live(now)))
                        .map(|e| e.map(|e| (e.key.clone(), e)))
                        .collect::<Result<HashMap<String, Entry>, _>>()
                })
            })
            .await?;
        // Entries are moved out, not copied. A key is in a batch once (one loader per key, see
        // cache.rs), but were it repeated, its first occurrence took the entry: copy that.
        let mut out: Vec<Option<Entry>> = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let entry = match found.remove(k) {
                Some(e) => Some(e),
                None => keys[..i]
                    .iter()
                    .position(|p| p == k)
                    .and_then(|j| out[j].clone()),
            };
            out.push(entry);
        }
        Ok(out)
    }

    /// One write in its own transaction: the stored procedure `kv_put_v2`
    /// (sql/0004_put_lock_first.sql), one round trip as a prepared CALL. With a precondition,
    /// the row is first locked and checked in a round trip of its own.
    async fn put_one(
        &self,
        key: &str,
        value: &str,
        ttl_seconds: Option<u32>,
        pre: &Precondition,
    ) -> Result<WriteOutcome, DbError> {
        let origin = self.origin;
        self.run("upsert", |conn: Conn| {
            Box::pin(async move {
                // Unique among this instance's changes (see `delete`).
                let now = self.unique_now(1);
                let expires_at = expiry(now, ttl_seconds);
                let mut tx = ServerTx::new(conn);
                let conditional = *pre != Precondition::NONE;
                if conditional {
                    let live_rev = claim_row(&mut tx, key, now).await?;
                    if !pre.allows(live_rev) {
                        tx.rollback().await;
                        return Ok(WriteOutcome::PreconditionFailed);
                    }
                }
                let slot = uuid::Uuid::new_v4().as_u64_pair().0 % COUNTER_SLOTS;
                let params = (
                    key.as_bytes(),
                    value.as_bytes(),
                    origin,
                    time::to_sql(now),
                    expires_at.map(time::to_sql).unwrap_or(Value::NULL),
                    slot,
                    !conditional,
                );
                let row = tx
                    .exec("CALL kv_put_v2(?, ?, ?, ?, ?, ?, ?)", params)
                    .await?
                    .into_iter()
                    .next();
                tx.finish();
                let bad = || mysql_async::Error::Other("the upsert read back no entry".into());
                let read_back =
                    mysql_async::from_row_opt(row.ok_or_else(bad)?).map_err(|_| bad())?;
                outcome_of(read_back, key, value, now, expires_at)
            })
        })
        .await
    }

    /// Plain writes in one transaction, with multi-row statements: per round, one round trip
    /// writes the entries (`INSERT … ON DUPLICATE KEY UPDATE`), which locks their rows, then
    /// logs the changes (`INSERT INTO kv_changes … VALUES (…), (…)`) and reads back their ids,
    /// the writes' revisions; a second sets the entries' revisions, reads back their versions
    /// and, after the last round, bumps one counter row by the number of writes and commits.
    /// The n-th write of a key in the batch goes in round n, so a key written twice gets two
    /// versions, in queue order. Results in the order of `puts`.
    ///
    /// The ids are read back, not computed from `LAST_INSERT_ID()`: MySQL 8's default
    /// `innodb_autoinc_lock_mode = 2` does not promise consecutive ids to a multi-row insert.
    /// The read is non-locking, and the rows are told apart by this instance's `origin` and a
    /// `changed_at` no other batch of this instance has (`unique_now`).
    async fn put_many(&self, puts: Vec<Put>) -> Result<Vec<WriteOutcome>, DbError> {
        self.metrics.db_batch_size("upsert", puts.len());
        if let [p] = puts.as_slice() {
            return Ok(vec![
                self.put_one(&p.key, &p.value, p.ttl_seconds, &Precondition::NONE)
                    .await?,
            ]);
        }
        let mut rounds: Vec<Vec<usize>> = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(puts.len());
        for (i, p) in puts.iter().enumerate() {
            let r = seen.entry(p.key.as_str()).or_insert(0);
            if rounds.len() <= *r {
                rounds.push(Vec::new());
            }
            rounds[*r].push(i);
            *r += 1;
        }
        for round in &mut rounds {
            round.sort_by(|&a, &b| puts[a].key.cmp(&puts[b].key));
        }
        let (rounds, puts) = (&rounds, &puts);
        self.run("upsert", |conn: Conn| {
            Box::pin(async move {
                let first_now = self.unique_now(rounds.len());
                let mut tx = ServerTx::new(conn);
                let mut out: Vec<Option<WriteOutcome>> = (0..puts.len()).map(|_| None).collect();
                for (r, round) in rounds.iter().enumerate() {
                    let now = first_now + r as Micros;
                    let revs = lock_and_log(&mut tx, r == 0, round, puts, self.origin, now).await?;
                    let last = r + 1 == rounds.len();
                    let mut rows = set_revisions(&mut tx, round, puts, &revs, last).await?;
                    for &i in round {
                        let p = &puts[i];
                        let read_back = rows.remove(p.key.as_bytes()).ok_or_else(|| {
                            mysql_async::Error::Other("a batched write read back no entry".into())
                        })?;
                        out[i] = Some(outcome_of(read_back, &p.key, &p.value, now, p.expiry(now))?);
                    }
                }
                tx.finish();
                Ok(out.into_iter().flatten().collect())
            })
        })
        .await
    }

    /// A timestamp no other write of this instance has had, and the `n - 1` microseconds
    /// after it (the clock, or just after the last one handed out).
    fn unique_now(&self, n: usize) -> Micros {
        let now = time::now_micros();
        let mut start = now;
        let _ = self
            .batch_clock
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                start = now.max(last + 1);
                Some(start + n as Micros - 1)
            });
        start
    }
}

impl Put {
    fn expiry(&self, now: Micros) -> Option<Micros> {
        expiry(now, self.ttl_seconds)
    }
}

/// When an entry written at `now` with `ttl_seconds` expires.
fn expiry(now: Micros, ttl_seconds: Option<u32>) -> Option<Micros> {
    ttl_seconds.map(|t| now + i64::from(t) * 1_000_000)
}

/// Round trip 1 of a batched write: begins the transaction (`begin`), writes the entries of
/// `round` (`INSERT … ON DUPLICATE KEY UPDATE`, rows in key order, so concurrent batches lock
/// rows in the same order) with a placeholder revision, *then* logs one change per write and
/// returns their ids by key. The row locks come first so that, for one key, change ids are
/// handed out in the order the writes commit: a revision is newer exactly when its write is.
async fn lock_and_log(
    tx: &mut ServerTx,
    begin: bool,
    round: &[usize],
    puts: &[Put],
    origin: u64,
    now: Micros,
) -> Result<HashMap<Vec<u8>, u64>, mysql_async::Error> {
    let bytes: usize = round
        .iter()
        .map(|&i| 6 * puts[i].key.len() + 2 * puts[i].value.len())
        .sum();
    let mut sql = Sql::with_capacity(bytes + 180 * round.len() + 800);
    if begin {
        sql.raw("START TRANSACTION;\n");
    }
    sql.raw(
        "INSERT INTO kv_entries (k, v, version, rev, created_at, updated_at, expires_at) VALUES ",
    );
    for (n, &i) in round.iter().enumerate() {
        let p = &puts[i];
        sql.raw(if n == 0 { "(" } else { ", (" })
            .bytes(p.key.as_bytes())
            .raw(", ")
            .bytes(p.value.as_bytes())
            .raw(", 1, 0, ")
            .datetime(Some(now))
            .raw(", ")
            .datetime(Some(now))
            .raw(", ")
            .datetime(p.expiry(now))
            .raw(")");
    }
    // As in kv_put (sql/0004): version + 1 over a live row, 1 over none or an expired one.
    // Assignments run left to right: the IFs read the old expires_at.
    sql.raw(
        " ON DUPLICATE KEY UPDATE \
         version = IF(expires_at IS NULL OR expires_at > VALUES(updated_at), version + 1, 1), \
         created_at = IF(expires_at IS NULL OR expires_at > VALUES(updated_at), created_at, \
         VALUES(created_at)), v = VALUES(v), rev = VALUES(rev), \
         updated_at = VALUES(updated_at), expires_at = VALUES(expires_at);\n\
         INSERT INTO kv_changes (k, origin, changed_at) VALUES ",
    );
    for (n, &i) in round.iter().enumerate() {
        sql.raw(if n == 0 { "(" } else { ", (" })
            .bytes(puts[i].key.as_bytes())
            .raw(", ")
            .uint(origin)
            .raw(", ")
            .datetime(Some(now))
            .raw(")");
    }
    sql.raw(";\nSELECT k, id FROM kv_changes WHERE id >= LAST_INSERT_ID() AND origin = ")
        .uint(origin)
        .raw(" AND changed_at = ")
        .datetime(Some(now));
    let rows = tx.batch(sql.into_string()).await?;
    let revs: HashMap<Vec<u8>, u64> = rows
        .into_iter()
        .filter_map(|mut row| Some((row.take::<Vec<u8>, _>(0)?, row.take::<u64, _>(1)?)))
        .collect();
    if revs.len() != round.len() {
        return Err(mysql_async::Error::Other(
            format!(
                "{} changes logged, {} ids read back",
                round.len(),
                revs.len()
            )
            .into(),
        ));
    }
    Ok(revs)
}

/// Round trip 2 of a batched write: gives the entries of `round` their revisions and returns
/// their `(version, rev, created_at)` rows by key; after the last round also counts the
/// writes and commits.
async fn set_revisions(
    tx: &mut ServerTx,
    round: &[usize],
    puts: &[Put],
    revs: &HashMap<Vec<u8>, u64>,
    last: bool,
) -> Result<HashMap<Vec<u8>, ReadBack>, mysql_async::Error> {
    let bytes: usize = round.iter().map(|&i| 6 * puts[i].key.len()).sum();
    let mut sql = Sql::with_capacity(bytes + 60 * round.len() + 400);
    sql.raw("UPDATE kv_entries SET rev = CASE k");
    for &i in round {
        let key = puts[i].key.as_bytes();
        sql.raw(" WHEN ").bytes(key).raw(" THEN ").uint(revs[key]);
    }
    let keys = |sql: &mut Sql| {
        for (n, &i) in round.iter().enumerate() {
            if n > 0 {
                sql.raw(", ");
            }
            sql.bytes(puts[i].key.as_bytes());
        }
    };
    sql.raw(" END WHERE k IN (");
    keys(&mut sql);
    sql.raw(");\nSELECT k, version, rev, created_at FROM kv_entries WHERE k IN (");
    keys(&mut sql);
    sql.raw(")");
    if last {
        let slot = uuid::Uuid::new_v4().as_u64_pair().0 % COUNTER_SLOTS;
        sql.raw(";\nUPDATE kv_write_counter SET n = n + ")
            .uint(puts.len() as u64)
            .raw(" WHERE slot = ")
            .uint(slot)
            .raw(";\nCOMMIT");
    }
    let rows = tx.batch(sql.into_string()).await?;
    rows.into_iter()
        .map(|row| {
            let (k, version, rev, created): (Vec<u8>, u64, u64, Value) =
                mysql_async::from_row_opt(row).map_err(|_| {
                    mysql_async::Error::Other("a batched write read back a bad row".into())
                })?;
            Ok((k, (version, rev, created)))
        })
        .collect()
}

/// What a write reads back: `(version, rev, created_at)`.
type ReadBack = (u64, u64, Value);

/// The outcome of a write from what it read back.
fn outcome_of(
    (version, rev, created): ReadBack,
    key: &str,
    value: &str,
    now: Micros,
    expires_at: Option<Micros>,
) -> Result<WriteOutcome, mysql_async::Error> {
    let bad = || mysql_async::Error::Other("the upsert read back no entry".into());
    let entry = Entry {
        key: key.to_owned(),
        value: value.to_owned(),
        version,
        rev,
        created_at: time::from_sql(&created).ok_or_else(bad)?,
        updated_at: now,
        expires_at,
    };
    // An expired row is replaced at version 1: to the client it is a create.
    Ok(if version == 1 {
        WriteOutcome::Created(entry)
    } else {
        WriteOutcome::Replaced(entry)
    })
}

/// The locked row of a conditional write.
struct Current {
    /// Its revision, if it is live (not expired).
    live_rev: Option<u64>,
}

/// Begins the transaction of a conditional write and locks the key's row (one round trip).
async fn lock_row(
    tx: &mut ServerTx,
    key: &str,
    now: Micros,
) -> Result<Option<Current>, mysql_async::Error> {
    let mut sql = Sql::with_capacity(120 + 2 * key.len());
    sql.raw("START TRANSACTION;\nSELECT rev, expires_at FROM kv_entries WHERE k = ")
        .bytes(key.as_bytes())
        .raw(" FOR UPDATE");
    let row = tx.batch(sql.into_string()).await?.into_iter().next();
    Ok(row.map(|row| Current {
        live_rev: live_rev(row, now),
    }))
}

/// The revision of a locked `(rev, expires_at)` row, if the entry is live at `now`.
fn live_rev(mut row: Row, now: Micros) -> Option<u64> {
    let rev: Option<u64> = row.take(0);
    let expires: Option<Value> = row.take(1);
    let live = expires.is_some_and(|e| live_at(time::from_sql(&e), now));
    rev.filter(|_| live)
}

/// Starts a conditional write's transaction and locks `key`'s row whether or not it
/// exists; returns its revision if it is live. An absent key gets a placeholder row, expired
/// from birth (invisible to every read, gone if the transaction rolls back): under READ
/// COMMITTED a `SELECT … FOR UPDATE` that finds no row locks nothing, so two
/// `If-None-Match: *` writes could both see "absent" and the second overwrite the first.
/// With the placeholder the second's INSERT waits for the first to commit, then finds the
/// key live and fails its precondition (found by a black-box review; tested in
/// `tests/it/conditional.rs`).
async fn claim_row(
    tx: &mut ServerTx,
    key: &str,
    now: Micros,
) -> Result<Option<u64>, mysql_async::Error> {
    let mut sql = Sql::with_capacity(400 + 4 * key.len());
    sql.raw(
        "START TRANSACTION;\nINSERT INTO kv_entries (k, v, version, rev, created_at, updated_at, expires_at) VALUES (",
    )
    .bytes(key.as_bytes())
    .raw(", '', 0, 0, ")
    .datetime(Some(now))
    .raw(", ")
    .datetime(Some(now))
    .raw(", ")
    .datetime(Some(now))
    .raw(") ON DUPLICATE KEY UPDATE k = k;\nSELECT rev, expires_at FROM kv_entries WHERE k = ")
    .bytes(key.as_bytes())
    .raw(" FOR UPDATE");
    let row = tx.batch(sql.into_string()).await?.into_iter().next();
    let bad = || mysql_async::Error::Other("the claimed row is missing".into());
    Ok(live_rev(row.ok_or_else(bad)?, now))
}

/// The change-log row of a write; its id (LAST_INSERT_ID()) is the write's revision.
fn log_change(sql: &mut Sql, key: &str, origin: u64, now: Micros) {
    sql.raw("INSERT INTO kv_changes (k, origin, changed_at) VALUES (")
        .bytes(key.as_bytes())
        .raw(", ")
        .uint(origin)
        .raw(", ")
        .datetime(Some(now))
        .raw(")");
}

fn entry_from_row(mut row: Row) -> Result<Entry, mysql_async::Error> {
    let bad =
        |what: &str| mysql_async::Error::Other(format!("unexpected {what} in kv_entries").into());
    let key: Vec<u8> = row.take(0).ok_or_else(|| bad("key"))?;
    let value: Vec<u8> = row.take(1).ok_or_else(|| bad("value"))?;
    let version: u64 = row.take(2).ok_or_else(|| bad("version"))?;
    let rev: u64 = row.take(3).ok_or_else(|| bad("rev"))?;
    let created: Value = row.take(4).ok_or_else(|| bad("created_at"))?;
    let updated: Value = row.take(5).ok_or_else(|| bad("updated_at"))?;
    let expires: Value = row.take(6).ok_or_else(|| bad("expires_at"))?;
    Ok(Entry {
        key: String::from_utf8(key).map_err(|_| bad("non-UTF-8 key"))?,
        value: String::from_utf8(value).map_err(|_| bad("non-UTF-8 value"))?,
        version,
        rev,
        created_at: time::from_sql(&created).ok_or_else(|| bad("created_at"))?,
        updated_at: time::from_sql(&updated).ok_or_else(|| bad("updated_at"))?,
        expires_at: time::from_sql(&expires),
    })
}

/// The smallest byte string greater than every string starting with `prefix`
/// (`None` when there is none: empty prefix, or all 0xFF).
pub fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < 0xFF {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_bound() {
        assert_eq!(prefix_upper_bound(b""), None);
        assert_eq!(prefix_upper_bound(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_upper_bound(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_upper_bound(b"\xff\xff"), None);
    }

    fn tags(t: &[&str]) -> Option<Vec<String>> {
        Some(t.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn preconditions() {
        let m = Precondition {
            if_match: tags(&["\"7\""]),
            ..Default::default()
        };
        assert!(m.allows(Some(7)));
        assert!(!m.allows(Some(8)));
        assert!(!m.allows(None));
        let weak = Precondition {
            if_match: tags(&["W/\"7\""]),
            ..Default::default()
        };
        assert!(!weak.allows(Some(7)), "If-Match uses strong comparison");
        let star = Precondition {
            if_match: tags(&["*"]),
            ..Default::default()
        };
        assert!(star.allows(Some(1)) && !star.allows(None));
        let empty = Precondition {
            if_match: tags(&[]),
            ..Default::default()
        };
        assert!(!empty.allows(Some(1)) && !empty.allows(None));
        let any = Precondition {
            if_none_match: tags(&["*"]),
            ..Default::default()
        };
        assert!(any.allows(None));
        assert!(!any.allows(Some(1)));
        let not7 = Precondition {
            if_none_match: tags(&["W/\"7\""]),
            ..Default::default()
        };
        assert!(not7.allows(Some(8)));
        assert!(!not7.allows(Some(7)), "If-None-Match uses weak comparison");
        assert!(Precondition {
            if_none_match: tags(&[]),
            ..Default::default()
        }
        .allows(Some(1)));
        let both = Precondition {
            if_match: tags(&["\"7\""]),
            if_none_match: tags(&["\"7\""]),
        };
        assert!(!both.allows(Some(7)));
        assert!(Precondition::NONE.allows(None) && Precondition::NONE.allows(Some(3)));
    }
}
