//! Issue 5, fault 5: far more concurrent requests than database connections. The pool has 2
//! connections and every database round trip takes 5 ms more (a slow link), so 300 requests
//! at once cannot all be served: the excess waits at most `KV_DB_ACQUIRE_TIMEOUT` (500 ms)
//! and gets 503 with `Retry-After`; nothing hangs, nothing else fails, memory stays bounded,
//! and the service is healthy afterwards.
//!
//! The requests are listing reads and conditional writes (`If-None-Match: *`), which each need
//! a connection of their own: point reads and plain writes are coalesced (`store::coalesce`),
//! and 2 connections serve 300 of those at once within the timeout, which is the point of
//! coalescing (`tests/it/coalescing.rs`) but no overload.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

const CONCURRENT: usize = 300;
/// Acquire (0.5 s) + query (2 s) + slack for a 2-core machine running 300 clients.
const ANSWER_BOUND: Duration = Duration::from_secs(5);
/// A debug build serving this burst stays far below; a leak per request would not.
const RSS_CEILING_KIB: u64 = 128 * 1024;

async fn burst(base: &str, round: usize) -> Vec<Rec> {
    // One connection per request (no pooling): 300 sockets at once.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let reqs = (0..CONCURRENT).map(|i| {
        let client = client.clone();
        let base = base.to_string();
        tokio::spawn(async move {
            if i % 2 == 0 {
                let key = format!("ov/{round}/r/{i}");
                let list = format!("{base}/v1/keys?prefix=ov/{round}/r/{i}&limit=10");
                record("read", &key, client.get(list)).await
            } else {
                let key = format!("ov/{round}/w/{i}");
                record(
                    "write",
                    &key,
                    client
                        .put(format!("{base}/v1/keys/{key}"))
                        .header("If-None-Match", "*")
                        .json(&json!({"value": {"round": round, "i": i, "pad": "p".repeat(1000)}})),
                )
                .await
            }
        })
    });
    let mut recs = Vec::new();
    for h in futures_util::future::join_all(reqs).await {
        recs.push(h.unwrap());
    }
    recs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_sheds_with_503_in_bounded_time_and_memory() {
    let _serial = serial().await;
    let db = fresh_db().await;
    let link = SlowLink::start(db.server_addr(), Duration::from_millis(5)).await;
    let url = db.url_via(link.addr);
    let svc = Service::start(&[
        ("KV_DATABASE_URL", url.as_str()),
        ("KV_DB_POOL_MAX", "2"),
        ("KV_DB_POOL_MIN", "1"),
        ("KV_DB_ACQUIRE_TIMEOUT", "500ms"),
        ("KV_DB_QUERY_TIMEOUT", "2s"),
        ("KV_DB_CONNECT_TIMEOUT", "2s"),
        ("KV_ACCESS_LOG", "false"),
    ])
    .await;
    svc.wait_ready(Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    for i in 0..20 {
        let r = client
            .put(svc.url(&format!("/v1/keys/warm/{i}")))
            .json(&json!({"value": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let rss_before = svc.rss_kib();

    let mut rss_after = Vec::new();
    let mut all = Vec::new();
    let mut burst_times = Vec::new();
    for round in 0..2 {
        let started = Instant::now();
        let recs = burst(&svc.http, round).await;
        burst_times.push(started.elapsed());
        rss_after.push(svc.rss_kib());
        all.extend(recs);
    }

    let mut problems = Vec::new();
    for r in &all {
        if r.took() > ANSWER_BOUND {
            problems.push(format!("{} {} took {:?}", r.kind, r.key, r.took()));
        }
        match r.status {
            Ok(200 | 201 | 404) => {}
            Ok(503) => {
                if !r.retry_after || !r.body.contains("\"unavailable\"") {
                    problems.push(format!(
                        "{}: 503 without Retry-After/code: {}",
                        r.key, r.body
                    ));
                }
            }
            _ => problems.push(format!(
                "{} {}: {:?} {:.200}",
                r.kind, r.key, r.status, r.body
            )),
        }
    }
    assert!(
        problems.is_empty(),
        "{} bad answers:\n{}",
        problems.len(),
        problems.join("\n")
    );

    let shed: Vec<&Rec> = all.iter().filter(|r| r.status == Ok(503)).collect();
    let served: Vec<&Rec> = all.iter().filter(|r| r.status != Ok(503)).collect();
    assert!(
        shed.len() >= all.len() / 3,
        "2 connections at 5 ms per round trip cannot serve {CONCURRENT} requests at once, \
         yet only {} of {} were refused",
        shed.len(),
        all.len()
    );
    assert!(
        served.len() >= 10,
        "the pool served almost nothing: {}",
        served.len()
    );
    let shed_times: Vec<Duration> = shed.iter().map(|r| r.took()).collect();
    let served_times: Vec<Duration> = served.iter().map(|r| r.took()).collect();

    // Memory: bounded, and a second identical burst does not add to it.
    let peak = *rss_after.iter().max().unwrap();
    assert!(
        peak < RSS_CEILING_KIB,
        "RSS {peak} KiB after the bursts (ceiling {RSS_CEILING_KIB} KiB)"
    );
    assert!(
        rss_after[1] < rss_after[0] + 16 * 1024,
        "RSS grew from {} to {} KiB between two identical bursts",
        rss_after[0],
        rss_after[1]
    );

    // Healthy afterwards: ready, pool not waiting, a write and a read work.
    svc.wait_ready(Duration::from_secs(5)).await;
    let r = client
        .put(svc.url("/v1/keys/after-overload"))
        .json(&json!({"value": "fine"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = client
        .get(svc.url("/v1/keys/after-overload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Nothing stays queued for a connection or in flight (background tasks may take a
    // connection for a moment: poll).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let metrics = client
            .get(format!("{}/metrics", svc.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let idle = metrics.lines().any(|l| l == "kvstore_db_pool_waiting 0")
            && metrics
                .lines()
                .any(|l| l == "kvstore_http_requests_in_flight 0");
        if idle {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "requests still waiting for a connection or in flight after the bursts:\n{}",
            metrics
                .lines()
                .filter(|l| l.starts_with("kvstore_db_pool")
                    || l.starts_with("kvstore_http_requests_in_flight"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    report(
        "overload",
        format!(
            "{} requests in 2 bursts of {CONCURRENT} (pool 2, +5 ms per DB round trip): \
             {} refused with 503 ({:.0} %), {} served; 503 latency p50 {} p99 {} max {}; \
             served p50 {} max {}; bursts took {:?}; RSS {} KiB before, {:?} KiB after",
            all.len(),
            shed.len(),
            100.0 * shed.len() as f64 / all.len() as f64,
            served.len(),
            ms(percentile(&shed_times, 50.0)),
            ms(percentile(&shed_times, 99.0)),
            ms(percentile(&shed_times, 100.0)),
            ms(percentile(&served_times, 50.0)),
            ms(percentile(&served_times, 100.0)),
            burst_times.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            rss_before,
            rss_after
        ),
    );
}
