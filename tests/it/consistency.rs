//! Read-your-writes on one instance while many readers hammer the same key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_under_concurrent_readers() {
    let (app, _db) = spawn_app(&[("KV_DB_POOL_MAX", "16"), ("KV_CACHE_TTL", "1h")]).await;
    app.put_value("hot", json!(0)).await;
    let stop = Arc::new(AtomicBool::new(false));
    // (read started at, version seen)
    let reads: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let mut readers = Vec::new();
    for i in 0..16 {
        let (c, url, stop, reads) = (
            app.client.clone(),
            app.url("/v1/keys/hot"),
            stop.clone(),
            reads.clone(),
        );
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let mut req = c.get(&url);
                if i % 4 == 0 {
                    req = req.header("cache-control", "no-cache");
                }
                let r = req.send().await.unwrap();
                assert_eq!(r.status(), 200);
                let v: Value = r.json().await.unwrap();
                reads
                    .lock()
                    .unwrap()
                    .push((started, v["version"].as_u64().unwrap()));
            }
        }));
    }
    // (acknowledged at, version written)
    let mut acks = Vec::new();
    for n in 1..=60u64 {
        let r = app.put_value("hot", json!(n)).await;
        assert!(r.status().is_success());
        let v: Value = r.json().await.unwrap();
        let acked = Instant::now();
        acks.push((acked, v["version"].as_u64().unwrap()));
        // The writer's own read right after the ack.
        let own: Value = app.get("/v1/keys/hot").await.json().await.unwrap();
        assert!(own["version"].as_u64().unwrap() >= v["version"].as_u64().unwrap());
        assert_eq!(own["value"], json!(n));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let reads = reads.lock().unwrap();
    assert!(reads.len() > 200, "readers made {} reads", reads.len());
    let mut checked = 0;
    for (acked, version) in &acks {
        for (started, seen) in reads.iter() {
            if started > acked {
                assert!(
                    seen >= version,
                    "a read started after version {version} was acknowledged returned {seen}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "only {checked} reads followed an ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_one_key_leave_the_cache_at_the_newest_version() {
    let (app, _db) = spawn_app(&[("KV_DB_POOL_MAX", "16"), ("KV_CACHE_TTL", "1h")]).await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (c, url) = (app.client.clone(), app.url("/v1/keys/contended"));
        tasks.push(tokio::spawn(async move {
            for i in 0..15 {
                let r = c
                    .put(&url)
                    .json(&json!({"value": format!("{w}-{i}")}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{}", r.status());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let cached: Value = app.get("/v1/keys/contended").await.json().await.unwrap();
    let fresh: Value = app
        .client
        .get(app.url("/v1/keys/contended"))
        .header("cache-control", "no-cache")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fresh["version"], 120);
    assert_eq!(cached, fresh, "the cache holds the last committed write");
}
