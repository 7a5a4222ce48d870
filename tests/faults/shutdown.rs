//! Issue 5, fault 3: SIGTERM under load. Readiness fails first, the listener stays open for
//! `KV_SHUTDOWN_DELAY`, requests already accepted complete (a slow upload included), no
//! request sent before the signal fails, and the process exits 0 within the grace period.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const DELAY: Duration = Duration::from_secs(1);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_request_and_exits_0() {
    let _serial = serial().await;
    let db = fresh_db().await;
    let mut svc = Service::start(&[
        ("KV_DATABASE_URL", db.url.as_str()),
        ("KV_SHUTDOWN_DELAY", "1s"),
        ("KV_SHUTDOWN_TIMEOUT", "5s"),
    ])
    .await;
    svc.wait_ready(Duration::from_secs(20)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let recs: Arc<Mutex<Vec<Rec>>> = Arc::default();
    let keep_alive = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // No idle connection is kept: every request opens a new one.
    let fresh = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..6usize {
        let client = if t < 4 {
            keep_alive.clone()
        } else {
            fresh.clone()
        };
        let (stop, recs, base) = (stop.clone(), recs.clone(), svc.http.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let rec = if n.is_multiple_of(2) {
                    let key = format!("sd/{t}/{n}");
                    record(
                        "write",
                        &key,
                        client
                            .put(format!("{base}/v1/keys/{key}"))
                            .json(&json!({"value": n})),
                    )
                    .await
                } else {
                    record("read", "Homer", client.get(format!("{base}/v1/keys/Homer"))).await
                };
                let failed = rec.status.is_err();
                recs.lock().unwrap().push(rec);
                if failed {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    // The readiness probe, as the kubelet would poll it (faster).
    {
        let (stop, recs, base) = (stop.clone(), recs.clone(), svc.http.clone());
        let client = fresh.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let rec = record("readyz", "", client.get(format!("{base}/readyz"))).await;
                recs.lock().unwrap().push(rec);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;

    // A slow upload: headers now, the body trickled over 2 s, so it is still arriving when
    // the listener closes (after the 1 s delay) and the drain begins.
    let body = format!("{{\"value\": \"{}\"}}", "s".repeat(4000));
    let mut slow = TcpStream::connect(svc.http_addr).await.unwrap();
    slow.write_all(
        format!(
            "PUT /v1/keys/sd-slow-upload HTTP/1.1\r\nHost: kvstore\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let chunks: Vec<Vec<u8>> = body
        .as_bytes()
        .chunks(body.len() / 10 + 1)
        .map(<[u8]>::to_vec)
        .collect();
    slow.write_all(&chunks[0]).await.unwrap();
    let slow_upload = tokio::spawn(async move {
        for c in &chunks[1..] {
            tokio::time::sleep(Duration::from_millis(220)).await;
            slow.write_all(c).await.unwrap();
        }
        let mut answer = Vec::new();
        slow.read_to_end(&mut answer).await.unwrap();
        (
            Instant::now(),
            String::from_utf8_lossy(&answer).into_owned(),
        )
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let term_at = Instant::now();
    svc.signal("TERM");
    let status = svc
        .wait_exit(DELAY + DRAIN_TIMEOUT + Duration::from_secs(3))
        .await;
    let exited = term_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (slow_done, slow_answer) = slow_upload.await.unwrap();
    let recs = recs.lock().unwrap().clone();

    // Exit: code 0, after the delay, within delay + drain timeout.
    let status = status.unwrap_or_else(|| panic!("still running {exited:?} after SIGTERM"));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        exited >= DELAY,
        "exited after {exited:?}, before the shutdown delay"
    );
    assert!(exited <= DELAY + DRAIN_TIMEOUT, "exited after {exited:?}");
    svc.settle_logs().await;
    let logs = svc.stdout_lines();
    assert!(
        logs.iter()
            .any(|l| l.contains("in-flight requests drained")),
        "the drain did not complete: {logs:?}"
    );

    // The slow upload that was in flight completed and is stored.
    assert!(
        slow_answer.starts_with("HTTP/1.1 201"),
        "slow upload: {slow_answer:.300}"
    );
    assert!(
        slow_done > term_at + DELAY,
        "the upload ended after the listener closed"
    );
    let mut conn = db.conn().await;
    let n: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM kv_entries WHERE k = 'sd-slow-upload'")
        .await
        .unwrap();
    assert_eq!(n, Some(1));
    let _ = conn.disconnect().await;

    // Readiness failed first: a 503 from /readyz while the listener still served.
    let readyz: Vec<&Rec> = recs.iter().filter(|r| r.kind == "readyz").collect();
    assert!(
        readyz
            .iter()
            .filter(|r| r.end < term_at)
            .all(|r| r.status == Ok(200)),
        "readyz failed before the signal"
    );
    let first_503 = readyz
        .iter()
        .filter(|r| r.status == Ok(503))
        .map(|r| r.end)
        .min()
        .expect("/readyz never answered 503 during the shutdown delay");
    let not_ready_after = first_503 - term_at;
    assert!(
        not_ready_after < DELAY,
        "readyz turned 503 only after {not_ready_after:?}"
    );
    let data: Vec<&Rec> = recs.iter().filter(|r| r.kind != "readyz").collect();
    if let Some(first_failure) = data.iter().filter(|r| !r.ok()).map(|r| r.start).min() {
        assert!(
            first_failure > first_503,
            "a request failed before readiness did"
        );
    }

    // No request sent before the signal failed, nor any sent during the delay (with a
    // margin for the listener closing at its end).
    let before: Vec<&&Rec> = data.iter().filter(|r| r.start < term_at).collect();
    let in_delay: Vec<&&Rec> = data
        .iter()
        .filter(|r| r.start >= term_at && r.start < term_at + DELAY - Duration::from_millis(400))
        .collect();
    assert!(
        before.len() >= 20,
        "too little load before the signal: {}",
        before.len()
    );
    assert!(
        in_delay.len() >= 5,
        "too little load during the delay: {}",
        in_delay.len()
    );
    let failed: Vec<String> = before
        .iter()
        .chain(&in_delay)
        .filter(|r| !r.ok())
        .map(|r| {
            format!(
                "{} {} at {:?} vs signal: {:?}",
                r.kind,
                r.key,
                r.start.checked_duration_since(term_at),
                r.status
            )
        })
        .collect();
    assert!(failed.is_empty(), "requests failed:\n{}", failed.join("\n"));
    report(
        "shutdown",
        format!(
            "readyz 503 {} after SIGTERM; {} requests before the signal and {} during the delay, none failed; \
             slow upload completed {} after SIGTERM; exit 0 after {}",
            ms(not_ready_after),
            before.len(),
            in_delay.len(),
            ms(slow_done - term_at),
            ms(exited)
        ),
    );
}
