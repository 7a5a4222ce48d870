//! The read-through cache: Cache-Status, bypass, negative caching, coalescing, byte budget,
//! serving while the database is down, and the slow-loader invariant.

use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use serde_json::{json, Value};

use crate::common::proxy::{Mode, Proxy};
use crate::common::*;
use kvstore::time::now_micros;

fn cache_status(r: &reqwest::Response) -> String {
    r.headers()["cache-status"].to_str().unwrap().to_string()
}

/// `no-cache` bypasses the cache in any of the forms HTTP allows: as one directive of a list,
/// in a second Cache-Control header, any case, or as HTTP/1.0's `Pragma: no-cache`; other
/// directives do not.
#[tokio::test]
async fn no_cache_in_any_form_bypasses() {
    let (app, _db) = spawn_app(&[]).await;
    app.get("/v1/keys/Homer").await;
    let read = |headers: &'static [(&'static str, &'static str)]| {
        let mut rb = app.client.get(app.url("/v1/keys/Homer"));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        async move { cache_status(&rb.send().await.unwrap()) }
    };
    let bypassed = "kvstore; fwd=request; stored";
    assert_eq!(
        read(&[("cache-control", "max-age=0, No-Cache")]).await,
        bypassed
    );
    assert_eq!(
        read(&[
            ("cache-control", "max-age=0"),
            ("cache-control", "no-cache")
        ])
        .await,
        bypassed
    );
    assert_eq!(read(&[("pragma", "no-cache")]).await, bypassed);
    assert_eq!(
        read(&[("cache-control", "max-age=0, no-store")]).await,
        "kvstore; hit"
    );
    assert_eq!(read(&[("pragma", "no-cache-please")]).await, "kvstore; hit");
    assert_eq!(read(&[]).await, "kvstore; hit");
}

#[tokio::test]
async fn cache_status_and_no_cache_bypass() {
    let (app, db) = spawn_app(&[]).await;
    let r = app.get("/v1/keys/Homer").await;
    assert_eq!(cache_status(&r), "kvstore; fwd=miss; stored");
    let r = app.get("/v1/keys/Homer").await;
    assert_eq!(cache_status(&r), "kvstore; hit");
    // Change the row behind the service's back: the cache still answers the old value...
    let mut conn = db.conn().await;
    conn.query_drop("UPDATE kv_entries SET v = '\"Flanders\"' WHERE k = 'Homer'")
        .await
        .unwrap();
    let e: Value = app.get("/v1/keys/Homer").await.json().await.unwrap();
    assert_eq!(e["value"], "Simpson");
    // ...no-cache reads the database and refreshes the cache.
    let r = app
        .client
        .get(app.url("/v1/keys/Homer"))
        .header("cache-control", "no-cache")
        .send()
        .await
        .unwrap();
    assert_eq!(cache_status(&r), "kvstore; fwd=request; stored");
    assert_eq!(r.json::<Value>().await.unwrap()["value"], "Flanders");
    let r = app.get("/v1/keys/Homer").await;
    assert_eq!(cache_status(&r), "kvstore; hit");
    assert_eq!(r.json::<Value>().await.unwrap()["value"], "Flanders");
}

#[tokio::test]
async fn absent_keys_are_cached_and_a_create_replaces_them_at_once() {
    let (app, _db) = spawn_app(&[("KV_CACHE_NEGATIVE_TTL", "1h")]).await;
    let before = app.db_ops("get");
    let r = app.get("/v1/keys/later").await;
    assert_eq!(cache_status(&r), "kvstore; fwd=miss; stored");
    assert_problem(r, 404, "not_found").await;
    let r = app.get("/v1/keys/later").await;
    assert_eq!(cache_status(&r), "kvstore; hit");
    assert_problem(r, 404, "not_found").await;
    assert_eq!(
        app.db_ops("get") - before,
        1,
        "the second 404 came from the cache"
    );
    app.put_value("later", json!("now")).await;
    let r = app.get("/v1/keys/later").await;
    assert_eq!(r.status(), 200);
    assert_eq!(cache_status(&r), "kvstore; hit");
    // And a delete caches the absence on this instance.
    app.delete("later").await;
    assert_eq!(app.get("/v1/keys/later").await.status(), 404);
}

#[tokio::test]
async fn concurrent_misses_make_one_query() {
    let (app, _db) = spawn_app(&[("KV_DB_POOL_MAX", "16")]).await;
    // "Stan" is seeded and was never read by this instance: not in its cache.
    let before = app.db_ops("get");
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let c = app.client.clone();
        let url = app.url("/v1/keys/Stan");
        tasks.push(tokio::spawn(async move {
            c.get(url).send().await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        app.db_ops("get") - before,
        1,
        "64 concurrent misses, one SELECT"
    );
}

#[tokio::test]
async fn cache_stays_within_its_byte_budget() {
    let budget: u64 = 256 * 1024;
    let (app, _db) = spawn_app(&[("KV_CACHE_MAX_BYTES", "262144")]).await;
    let value = "v".repeat(10_000);
    for i in 0..100 {
        app.put_value(&format!("big{i}"), json!(value)).await;
        app.get(&format!("/v1/keys/big{i}")).await;
    }
    // A value larger than an eighth of the budget is served but never cached.
    app.put_value("huge", json!("h".repeat(100_000))).await;
    let r = app.get("/v1/keys/huge").await;
    assert_eq!(r.status(), 200);
    let r = app.get("/v1/keys/huge").await;
    assert_eq!(
        cache_status(&r),
        "kvstore; fwd=miss",
        "read from the database again, and not stored"
    );
    let text = app.metrics_text().await;
    let size: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("kvstore_cache_size_bytes "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(size <= budget, "cache holds {size} bytes, budget {budget}");
    assert!(size > budget / 2, "cache is used: {size}");
    assert!(text.contains("kvstore_cache_evictions_total{cause=\"size\"}"));
}

#[tokio::test]
async fn cached_keys_are_served_while_the_database_is_down() {
    let db = TestDb::new().await;
    let proxy = Proxy::start(db.server_addr()).await;
    let app = spawn_app_on(
        &db.url_via(proxy.addr),
        &[
            ("KV_DB_QUERY_TIMEOUT", "1s"),
            ("KV_DB_ACQUIRE_TIMEOUT", "1s"),
            ("KV_CACHE_TTL", "1h"),
        ],
    )
    .await;
    app.put_value("warm", json!("cached")).await;
    assert_eq!(app.get("/v1/keys/warm").await.status(), 200);

    for mode in [Mode::Refuse, Mode::Hang] {
        proxy.set(mode);
        let start = Instant::now();
        let r = app.get("/v1/keys/warm").await;
        assert_eq!(r.status(), 200, "{mode:?}");
        assert!(cache_status(&r).starts_with("kvstore; hit"));
        // Uncached reads and writes answer 503 with Retry-After, within the timeouts.
        let cold = format!("cold-{mode:?}");
        let r = app.get(&format!("/v1/keys/{cold}")).await;
        assert!(r.headers().contains_key("retry-after"), "{mode:?}: {r:?}");
        assert_problem(r, 503, "unavailable").await;
        let r = app.put_value(&cold, json!(1)).await;
        assert_problem(r, 503, "unavailable").await;
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "{mode:?}: took {:?}",
            start.elapsed()
        );
        // So does everything else that needs the database: delete, POST, listing, stats.
        let start = Instant::now();
        let (del, post, list, stats) = tokio::join!(
            app.client.delete(app.url("/v1/keys/warm")).send(),
            app.client
                .post(app.url("/v1/keys"))
                .json(&json!({"key": cold, "value": 1}))
                .send(),
            app.client.get(app.url("/v1/keys?prefix=w")).send(),
            app.client.get(app.url("/v1/stats")).send(),
        );
        for r in [del, post, list, stats] {
            let r = r.unwrap();
            assert!(r.headers().contains_key("retry-after"), "{mode:?}: {r:?}");
            assert_problem(r, 503, "unavailable").await;
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "{mode:?}: took {:?}",
            start.elapsed()
        );
        // The failed delete left the cached entry alone.
        assert_eq!(app.get("/v1/keys/warm").await.status(), 200, "{mode:?}");
        // Readiness fails (and says why), liveness does not.
        let deadline = Instant::now() + Duration::from_secs(5);
        while app.get("/readyz").await.status() != 503 {
            assert!(
                Instant::now() < deadline,
                "readyz stayed 200 with the database {mode:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let doc: Value = app.get("/readyz").await.json().await.unwrap();
        assert!(
            doc["detail"]
                .as_str()
                .unwrap()
                .contains("database is unreachable"),
            "{doc}"
        );
        assert_eq!(app.get("/healthz").await.status(), 200);
        let root: Value = app.get("/").await.json().await.unwrap();
        assert_eq!(root["database"]["reachable"], false);
        // The database comes back: the service recovers by itself.
        proxy.set(Mode::Pass);
        wait_ready(&app, Duration::from_secs(10)).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if app
                .put_value(&cold, json!(mode as u8))
                .await
                .status()
                .is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "writes did not recover");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(app.get(&format!("/v1/keys/{cold}")).await.status(), 200);
    }
}

/// DESIGN.md "Write path": a loader that read the old row must not overwrite the entry a
/// newer write put in the cache.
#[tokio::test]
async fn a_slow_loader_never_overwrites_a_newer_write() {
    let db = TestDb::new().await;
    let direct = spawn_app_on(&db.url, &[]).await;
    let proxy = Proxy::start(db.server_addr()).await;
    // One connection, so the loader's statement is already prepared on it.
    let slow_app = spawn_app_on(
        &db.url_via(proxy.addr),
        &[("KV_DB_POOL_MAX", "1"), ("KV_DB_POOL_MIN", "1")],
    )
    .await;
    direct.put_value("race", json!("old")).await;

    let state = slow_app.state();
    let slow_store = state.store.clone();
    let cache = &state.cache;
    cache
        .get("race", true, &slow_store, now_micros())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The loader's SELECT runs now (reads "old"), but its answer is held back.
    proxy.set(Mode::HoldResponses);
    let loader = async {
        let (item, _) = cache
            .get("race", true, &slow_store, now_micros())
            .await
            .unwrap();
        item
    };
    let writer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A newer write commits (through the direct instance's store), then this instance
        // updates its cache as the write path does.
        let e = match direct
            .state()
            .store
            .upsert("race", "\"new\"", None, &kvstore::store::Precondition::NONE)
            .await
            .unwrap()
        {
            kvstore::store::WriteOutcome::Replaced(e) => e,
            other => panic!("{other:?}"),
        };
        let item = kvstore::cache::CachedEntry::new(&e);
        let put = cache.put_written("race", Some(item), e.rev);
        let release = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            proxy.set(Mode::Pass);
        };
        tokio::join!(put, release);
    };
    let (loaded, ()) = tokio::join!(loader, writer);
    let loaded = loaded.unwrap();
    assert!(
        std::str::from_utf8(loaded.body())
            .unwrap()
            .contains("\"old\""),
        "the loader did read the old row"
    );
    let (now, source) = cache
        .get("race", false, &slow_store, now_micros())
        .await
        .unwrap();
    assert_eq!(source, kvstore::cache::Source::Hit);
    let body = String::from_utf8(now.unwrap().body().to_vec()).unwrap();
    assert!(
        body.contains("\"new\""),
        "cache must hold the newer write, holds {body}"
    );
}

/// A write whose request is cancelled after it reached the database (the client gave up while
/// the row was locked) still commits, and never updated this instance's cache: the change-log
/// poll drops the stale entry, as it does for other replicas' writes, instead of leaving it
/// for a whole `KV_CACHE_TTL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cancelled_after_reaching_the_database_does_not_leave_the_cache_stale() {
    let (app, db) = spawn_app(&[("KV_CACHE_TTL", "1h")]).await;
    app.put_value("abandoned", json!("old")).await;
    let r = app.get("/v1/keys/abandoned").await;
    assert_eq!(cache_status(&r), "kvstore; hit");
    // Hold the row: the write waits on its lock.
    let mut holder = db.conn().await;
    holder.query_drop("START TRANSACTION").await.unwrap();
    holder
        .query_drop("SELECT v FROM kv_entries WHERE k = 'abandoned' FOR UPDATE")
        .await
        .unwrap();
    let gave_up = app
        .client
        .put(app.url("/v1/keys/abandoned"))
        .timeout(Duration::from_millis(300))
        .json(&json!({"value": "new"}))
        .send()
        .await;
    assert!(
        gave_up.is_err(),
        "the write should still be waiting: {gave_up:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.query_drop("COMMIT").await.unwrap();
    // The write commits now; within a few poll intervals the instance serves it.
    let mut conn = db.conn().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stored: Option<Vec<u8>> = conn
            .query_first("SELECT v FROM kv_entries WHERE k = 'abandoned'")
            .await
            .unwrap();
        let served: Value = app.get("/v1/keys/abandoned").await.json().await.unwrap();
        if stored.as_deref() == Some(&b"\"new\""[..]) && served["value"] == "new" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stored {:?}, served {served}",
            stored.map(|v| String::from_utf8_lossy(&v).into_owned())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// RFC 9211's `stored` only when the answer went into the cache: not with the cache off
/// (`KV_CACHE_MAX_BYTES=0`), where every read goes to the database.
#[tokio::test]
async fn cache_status_says_stored_only_when_it_was() {
    async fn bypassed(app: &TestApp) -> String {
        let r = app
            .client
            .get(app.url("/v1/keys/k"))
            .header("cache-control", "no-cache")
            .send()
            .await
            .unwrap();
        cache_status(&r)
    }
    let (app, _db) = spawn_app(&[("KV_CACHE_MAX_BYTES", "0")]).await;
    assert_eq!(app.put_value("k", json!(1)).await.status(), 201);
    for path in ["/v1/keys/k", "/v1/keys/k", "/v1/keys/absent"] {
        let r = app.get(path).await;
        assert_eq!(r.headers()["cache-status"], "kvstore; fwd=miss", "{path}");
    }
    assert_eq!(bypassed(&app).await, "kvstore; fwd=request");
    // With the cache on, the same reads are stored, then hits.
    let (app, _db) = spawn_app(&[]).await;
    assert_eq!(app.put_value("k", json!(1)).await.status(), 201);
    assert_eq!(bypassed(&app).await, "kvstore; fwd=request; stored");
    assert_eq!(
        app.get("/v1/keys/k").await.headers()["cache-status"],
        "kvstore; hit"
    );
}

/// After the change-log poll was out of action for longer than it watches skipped ids (15 s),
/// the cache is cleared: what happened meanwhile may no longer be in the log (trimmed by the
/// purge, here deleted by hand), so a cached entry could otherwise stay stale for the TTL.
#[tokio::test]
async fn the_cache_is_cleared_after_the_change_log_poll_was_out_of_action() {
    use mysql_async::prelude::Queryable;
    let db = TestDb::new().await;
    let direct = spawn_app_on(&db.url, &[]).await;
    let proxy = Proxy::start(db.server_addr()).await;
    let behind = spawn_app_on(
        &db.url_via(proxy.addr),
        &[
            ("KV_CACHE_TTL", "1h"),
            ("KV_DB_QUERY_TIMEOUT", "1s"),
            ("KV_DB_ACQUIRE_TIMEOUT", "1s"),
        ],
    )
    .await;
    direct.put_value("k", json!("old")).await;
    let r = behind.get("/v1/keys/k").await;
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["value"], "old");
    proxy.set(Mode::Refuse);
    direct.put_value("k", json!("new")).await;
    // The change leaves the log before `behind` can poll it.
    let mut conn = db.conn().await;
    conn.query_drop("DELETE FROM kv_changes").await.unwrap();
    tokio::time::sleep(Duration::from_secs(16)).await;
    proxy.set(Mode::Pass);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = behind.get("/v1/keys/k").await;
        if r.status() == 200 && r.json::<serde_json::Value>().await.unwrap()["value"] == "new" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stale entry kept after the poll came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
