//! Issue 5, fault 1: `kill -9` the service mid-write, several times; nothing acknowledged is
//! lost, and `writes_total` counts every write that committed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use serde_json::{json, Value};

use crate::support::*;

const WRITERS: usize = 6;
const CRASHES: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_of_the_service() {
    let _serial = serial().await;
    let db = fresh_db().await;
    let vars = [
        ("KV_DATABASE_URL", db.url.as_str()),
        ("KV_SHUTDOWN_DELAY", "0s"),
        ("KV_ACCESS_LOG", "false"),
    ];
    let mut svc = Service::start(&vars).await;
    svc.wait_ready(Duration::from_secs(20)).await;

    let base = Arc::new(RwLock::new(svc.http.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    // key -> value of every write the service acknowledged (2xx).
    let acked: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (base, stop, acked, failed, client) = (
            base.clone(),
            stop.clone(),
            acked.clone(),
            failed.clone(),
            client.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Every attempt writes a key of its own: a key is written at most once, so
                // each committed write is exactly one row (checked against the counter).
                n += 1;
                let key = format!("crash/{w}/{n}");
                let value = json!({"writer": w, "n": n, "text": format!("v-{w}-{n}")});
                let url = format!("{}/v1/keys/{key}", base.read().unwrap());
                let r = client
                    .put(url)
                    .json(&json!({ "value": value }))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        assert_eq!(r.status(), 201, "{key}: a new key is created");
                        acked.lock().unwrap().insert(key, value);
                    }
                    Ok(r) => {
                        // Only "unavailable" may come back while a new process starts.
                        assert_eq!(r.status(), 503, "{key}: {:?}", r.text().await);
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }

    let mut restart_times = Vec::new();
    for round in 0..CRASHES {
        // Let a good number of writes through this process, then crash it mid-stream.
        let before = acked.lock().unwrap().len();
        let deadline = Instant::now() + Duration::from_secs(10);
        while acked.lock().unwrap().len() < before + 80 {
            assert!(
                Instant::now() < deadline,
                "round {round}: writes do not get through"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        svc.kill9();
        let restarted = Instant::now();
        svc = Service::start(&vars).await;
        svc.wait_ready(Duration::from_secs(20)).await;
        restart_times.push(restarted.elapsed());
        *base.write().unwrap() = svc.http.clone();
    }
    // Some load on the last process too, then stop the writers.
    let before = acked.lock().unwrap().len();
    while acked.lock().unwrap().len() < before + 30 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    // Every acknowledged write is there, with its value, as served by the last process...
    let check = reqwest::Client::new();
    for (key, value) in &acked {
        let r = check
            .get(svc.url(&format!("/v1/keys/{key}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged write {key} is lost");
        let e: Value = r.json().await.unwrap();
        assert_eq!(&e["value"], value, "{key}");
        assert_eq!(e["version"], 1, "{key}");
    }
    // ...and the counter committed with each write agrees with the rows: at least every
    // acknowledged write, and exactly the writes that committed (acknowledged or not).
    let total = writes_total(&svc.http).await;
    let mut conn = db.conn().await;
    let rows: u64 = conn
        .query_first("SELECT COUNT(*) FROM kv_entries WHERE k LIKE 'crash/%'")
        .await
        .unwrap()
        .unwrap();
    let _ = conn.disconnect().await;
    assert!(
        total >= acked.len() as u64,
        "writes_total {total} < {} acknowledged",
        acked.len()
    );
    assert_eq!(
        total, rows,
        "writes_total must count exactly the committed writes"
    );
    report(
        "crash",
        format!(
            "{} crashes: {} writes acknowledged, {} failed attempts, {} committed \
             (writes_total {total}); restart-to-ready {:?}",
            CRASHES,
            acked.len(),
            failed.load(Ordering::Relaxed),
            rows,
            restart_times.iter().map(|d| ms(*d)).collect::<Vec<_>>()
        ),
    );
}
