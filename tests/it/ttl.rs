//! TTL: expiry is immediate everywhere (cache included), purge is in the background.

use std::time::Duration;

use mysql_async::prelude::*;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn expired_entry_is_absent_at_once_even_when_cached() {
    let (app, _db) = spawn_app(&[("KV_CACHE_TTL", "1h")]).await;
    let r = app
        .put("t", json!({"value": "soon gone", "ttl_seconds": 1}))
        .await;
    assert_eq!(r.status(), 201);
    let e: Value = r.json().await.unwrap();
    let exp = e["expires_at"].as_str().expect("expires_at set");
    assert!(exp > e["updated_at"].as_str().unwrap());
    // Served from the cache while alive...
    let r = app.get("/v1/keys/t").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-status"], "kvstore; hit");
    let keys_before = app.stats().await["keys"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // ...and absent the moment it expires, from the cache, the listing and the stats.
    assert_problem(app.get("/v1/keys/t").await, 404, "not_found").await;
    let r = app
        .client
        .get(app.url("/v1/keys/t"))
        .header("cache-control", "no-cache")
        .send()
        .await
        .unwrap();
    assert_problem(r, 404, "not_found").await;
    assert_eq!(app.stats().await["keys"].as_u64().unwrap(), keys_before - 1);
    // HEAD and DELETE see it absent too.
    let r = app.client.head(app.url("/v1/keys/t")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_problem(app.delete("t").await, 404, "not_found").await;
    // If-Match against the expired entry fails; a plain PUT re-creates it at version 1.
    let r = app
        .client
        .put(app.url("/v1/keys/t"))
        .header("if-match", "*")
        .json(&json!({"value": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    let r = app.put_value("t", json!("back")).await;
    assert_eq!(r.status(), 201);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["version"], 1);
    assert_eq!(e["expires_at"], Value::Null);
    assert_problem(app.delete("never-there").await, 404, "not_found").await;
    // A create-only write (If-None-Match: *) of an expired key succeeds: it is absent.
    app.put("u", json!({"value": 1, "ttl_seconds": 1})).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = app
        .client
        .put(app.url("/v1/keys/u"))
        .header("if-none-match", "*")
        .json(&json!({"value": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 1);
}

#[tokio::test]
async fn a_write_without_ttl_clears_the_expiry() {
    let (app, _db) = spawn_app(&[]).await;
    app.put("k", json!({"value": 1, "ttl_seconds": 1})).await;
    let e: Value = app.put_value("k", json!(2)).await.json().await.unwrap();
    assert_eq!(e["expires_at"], Value::Null);
    assert_eq!(e["version"], 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.get("/v1/keys/k").await.status(), 200);
    // And a later TTL sets it again.
    let e: Value = app
        .put("k", json!({"value": 3, "ttl_seconds": 100}))
        .await
        .json()
        .await
        .unwrap();
    assert!(e["expires_at"].is_string());
}

#[tokio::test]
async fn expired_rows_are_purged_in_the_background() {
    let (app, db) = spawn_app(&[("KV_PURGE_INTERVAL", "200ms")]).await;
    for i in 0..5 {
        app.put(&format!("p{i}"), json!({"value": i, "ttl_seconds": 1}))
            .await;
    }
    app.put_value("stays", json!(1)).await;
    let mut conn = db.conn().await;
    const COUNT: &str = "SELECT COUNT(*) FROM kv_entries WHERE k LIKE 'p%' OR k = 'stays'";
    assert_eq!(conn.query_first::<u64, _>(COUNT).await.unwrap(), Some(6));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if conn.query_first::<u64, _>(COUNT).await.unwrap() == Some(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expired rows were not purged"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(app
        .metrics_text()
        .await
        .contains("kvstore_expired_purged_total 5"));
}

/// The change log is purged in batches until nothing older than 10 minutes is left, not one
/// batch of 10 000 rows a purge interval (which a busy deployment outgrows).
#[tokio::test]
async fn old_change_log_rows_are_purged_in_batches() {
    // One purge in the 7 s the test waits (3 were needed, one batch each, before).
    let (app, db) = spawn_app(&[("KV_PURGE_INTERVAL", "5s")]).await;
    let mut conn = db.conn().await;
    // 25 000 rows an hour old, and one recent row that must stay.
    conn.query_drop(
        "INSERT INTO kv_changes (k, origin, changed_at) \
         SELECT 'old', 0, NOW(6) - INTERVAL 1 HOUR FROM \
         (SELECT 0 UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4) a, \
         (SELECT 0 UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4) b, \
         (SELECT 0 UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4) c, \
         (SELECT 0 UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4) d, \
         (SELECT 0 UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4) e, \
         (SELECT 0 UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3) f, \
         (SELECT 0 UNION ALL SELECT 1) g",
    )
    .await
    .unwrap();
    app.put_value("recent", json!(1)).await;
    const OLD: &str = "SELECT COUNT(*) FROM kv_changes WHERE k = 'old'";
    assert_eq!(conn.query_first::<u64, _>(OLD).await.unwrap(), Some(25_000));
    let deadline = std::time::Instant::now() + Duration::from_secs(7);
    while conn.query_first::<u64, _>(OLD).await.unwrap() != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "old change-log rows were not purged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recent: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM kv_changes WHERE k = 'recent'")
        .await
        .unwrap();
    assert_eq!(recent, Some(1), "a recent change is kept");
}
