//! The HTTP stack's ceiling for `just bench`: a minimal warp 0.4 server (same warp, hyper and
//! tokio multi-thread runtime as the service) answering `GET /v1/keys/{key}` from an in-memory
//! map, with a JSON body shaped and sized like the service's entry document. No database, no
//! cache bookkeeping, no access log, no metrics: what is left is the cost of HTTP itself.
//!
//!   warp_ceiling [ADDR]        # ADDR defaults to $BENCH_ADDR, else 127.0.0.1:0
//!
//! Env: BENCH_KEYS (default 20000) keys `hot/000000`.. are served; others get 404.
//! Prints `listening <addr>` once bound, then serves until killed.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use warp::http::{header, HeaderValue, StatusCode};
use warp::path::Tail;
use warp::reply::Response;
use warp::Filter;

/// The value the bench loads into the service for every hot key (see scripts/bench.sh).
fn bench_value(i: usize) -> String {
    format!("{{\"n\":{i},\"s\":\"{}\"}}", "x".repeat(64))
}

/// The service's entry document for that value (same fields, same lengths).
fn entry_json(key: &str, i: usize) -> Bytes {
    let ts = "2026-01-01T00:00:00.000000Z";
    Bytes::from(format!(
        "{{\"key\":\"{key}\",\"value\":{},\"version\":1,\"created_at\":\"{ts}\",\"updated_at\":\"{ts}\",\"expires_at\":null}}",
        bench_value(i)
    ))
}

fn main() {
    let addr = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("BENCH_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let keys: usize = std::env::var("BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let map: HashMap<String, Bytes> = (0..keys)
        .map(|i| {
            let k = format!("hot/{i:06}");
            let body = entry_json(&k, i);
            (k, body)
        })
        .collect();
    let map = Arc::new(RwLock::new(map));

    // Same runtime flavour as the service (src/main.rs): multi-thread, default worker count
    // (= the CPUs this process may run on, so `taskset -c 0` gives one worker, as for kvstore).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("warp-ceiling")
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .unwrap_or_else(|e| panic!("cannot bind {addr}: {e}"));
        let bound = listener.local_addr().expect("local addr");
        println!("listening {bound}");
        let _ = std::io::stdout().flush();

        let route = warp::get()
            .and(warp::path("v1"))
            .and(warp::path("keys"))
            .and(warp::path::tail())
            .map(move |tail: Tail| {
                let body = map.read().expect("map lock").get(tail.as_str()).cloned();
                let mut resp = match body {
                    Some(b) => Response::new(b.into()),
                    None => {
                        let mut r =
                            Response::new(Bytes::from_static(b"{\"code\":\"not_found\"}").into());
                        *r.status_mut() = StatusCode::NOT_FOUND;
                        r
                    }
                };
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                resp
            });
        warp::serve(route).incoming(listener).run().await;
    });
}
