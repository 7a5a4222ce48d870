//! Migrations and the initial dataset (applied once, ever), and the exact `writes_total`.

use mysql_async::prelude::*;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn the_seed_is_applied_once_ever() {
    let db = TestDb::new().await;
    let mut app = spawn_app_on(&db.url, &[]).await;
    assert_eq!(app.delete("Homer").await.status(), 204);
    assert_eq!(
        app.put_value("Jeffrey", json!("The Dude")).await.status(),
        200
    );
    app.stop().await;
    // Restart on the same database: the user's changes stand.
    let app = spawn_app_on(&db.url, &[]).await;
    assert_problem(app.get("/v1/keys/Homer").await, 404, "not_found").await;
    let e: Value = app.get("/v1/keys/Jeffrey").await.json().await.unwrap();
    assert_eq!(e["value"], "The Dude");
    assert_eq!(app.get("/v1/keys/Stan").await.status(), 200);
    let mut conn = db.conn().await;
    let versions: Vec<u32> = conn
        .query("SELECT version FROM kv_schema_migrations ORDER BY version")
        .await
        .unwrap();
    let all: Vec<u32> = kvstore::store::migrations::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(versions, all);
}

#[tokio::test]
async fn replicas_starting_together_migrate_once() {
    let db = TestDb::new().await;
    let (a, b, c) = tokio::join!(
        spawn_app_on(&db.url, &[]),
        spawn_app_on(&db.url, &[]),
        spawn_app_on(&db.url, &[])
    );
    for app in [&a, &b, &c] {
        assert_eq!(app.get("/v1/keys/Homer").await.status(), 200);
    }
    let mut conn = db.conn().await;
    let n: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM kv_entries WHERE k = 'Homer'")
        .await
        .unwrap();
    assert_eq!(n, Some(1));
    let m: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM kv_schema_migrations")
        .await
        .unwrap();
    assert_eq!(m, Some(kvstore::store::migrations::MIGRATIONS.len() as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_total_is_exact_across_instances_and_restarts() {
    let db = TestDb::new().await;
    let a = spawn_app_on(&db.url, &[("KV_DB_POOL_MAX", "16")]).await;
    let b = spawn_app_on(&db.url, &[("KV_DB_POOL_MAX", "16")]).await;
    assert_eq!(a.stats().await["writes_total"], 0);
    let mut tasks = Vec::new();
    for w in 0..10 {
        let target = if w % 2 == 0 {
            a.base.clone()
        } else {
            b.base.clone()
        };
        let c = a.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            for i in 0..20 {
                let url = format!("{target}/v1/keys/w{w}-{}", i % 7);
                let r = c.put(url).json(&json!({"value": i})).send().await.unwrap();
                assert!(r.status().is_success(), "{}", r.status());
                ok += 1;
            }
            ok
        }));
    }
    let mut acknowledged = 0;
    for t in tasks {
        acknowledged += t.await.unwrap();
    }
    assert_eq!(acknowledged, 200);
    // Refused writes, deletes and reads do not count.
    let r = a
        .client
        .put(a.url("/v1/keys/w0-0"))
        .header("if-match", "\"1\"")
        .json(&json!({"value": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    assert_eq!(a.put_value("%00", json!(1)).await.status(), 400);
    assert_eq!(a.delete("w0-0").await.status(), 204);
    a.get("/v1/keys/w0-1").await;
    assert_eq!(a.stats().await["writes_total"], 200);
    assert_eq!(b.stats().await["writes_total"], 200);
    // POST counts like PUT.
    a.client
        .post(a.url("/v1/keys"))
        .json(&json!({"key": "p", "value": 1}))
        .send()
        .await
        .unwrap();
    drop((a, b));
    // Durable: a new instance on the same database sees the same total.
    let c = spawn_app_on(&db.url, &[]).await;
    assert_eq!(c.stats().await["writes_total"], 201);
    // Counting does not use one hot row: the writes were spread over the counter rows.
    let mut conn = db.conn().await;
    let used: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM kv_write_counter WHERE n > 0")
        .await
        .unwrap();
    assert!(used.unwrap() > 10, "writes landed on {used:?} counter rows");
}
