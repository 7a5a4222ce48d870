//! Issue 5, item 7: slow clients do not starve others. 200 connections that never send a
//! byte and 20 that trickle their headers one byte a second are closed after
//! `KV_HEADER_READ_TIMEOUT` (1 s here), meanwhile normal clients get fast answers; a body
//! trickled slower than `KV_REQUEST_TIMEOUT` (2 s here) gets 408, not a hang.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const IDLE: usize = 200;
const TRICKLING: usize = 20;
/// A normal request must never wait anywhere near the slow clients' timeouts.
const NORMAL_BOUND: Duration = Duration::from_millis(750);

/// Reads until the server closes the connection; returns when, and what it sent.
async fn until_closed(mut s: TcpStream, limit: Duration) -> Option<(Instant, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((Instant::now(), got)),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_connections_do_not_starve_others() {
    let _serial = serial().await;
    let db = fresh_db().await;
    let svc = Service::start(&[
        ("KV_DATABASE_URL", db.url.as_str()),
        ("KV_HEADER_READ_TIMEOUT", "1s"),
        ("KV_REQUEST_TIMEOUT", "2s"),
        ("KV_ACCESS_LOG", "false"),
    ])
    .await;
    svc.wait_ready(Duration::from_secs(20)).await;
    let fds_before = svc.open_fds();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    assert_eq!(
        client
            .get(svc.url("/v1/keys/Homer"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // 200 connections that never send a byte.
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(svc.http_addr).await.unwrap());
    }
    let idle_waits: Vec<_> = idle
        .into_iter()
        .map(|s| tokio::spawn(until_closed(s, Duration::from_secs(6))))
        .collect();
    // 20 connections that send their request line one byte a second.
    let trickle_waits: Vec<_> = (0..TRICKLING)
        .map(|_| {
            let addr = svc.http_addr;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let started = Instant::now();
                let line = b"GET /v1/keys/Homer HTTP/1.1\r\nHost: kvstore\r\n\r\n";
                for b in line {
                    if s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    // Has the server closed it?
                    let mut probe = [0u8; 1];
                    match tokio::time::timeout(Duration::from_secs(1), s.read(&mut probe)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                        Ok(Ok(_)) => panic!("the server answered a request it never got whole"),
                        Err(_) => {}
                    }
                    if started.elapsed() > Duration::from_secs(6) {
                        return None;
                    }
                }
                None
            })
        })
        .collect();

    // Meanwhile, normal clients: keep-alive and fresh connections, reads and writes.
    let fresh = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut normal = Vec::new();
    let until = Instant::now() + Duration::from_millis(2500);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let c = if n % 2 == 0 { &client } else { &fresh };
        let rec = if n % 3 == 0 {
            record(
                "write",
                "slow/normal",
                c.put(svc.url(&format!("/v1/keys/slow/normal/{n}")))
                    .json(&serde_json::json!({"value": n})),
            )
            .await
        } else {
            record("read", "Homer", c.get(svc.url("/v1/keys/Homer"))).await
        };
        normal.push(rec);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Idle connections were closed after the header timeout (1 s), not left open.
    let mut idle_closed = Vec::new();
    for w in idle_waits {
        let (at, sent) = w
            .await
            .unwrap()
            .expect("an idle connection was still open 6 s later (header read timeout 1 s)");
        assert!(
            sent.is_empty() || sent.starts_with(b"HTTP/1.1 408"),
            "unexpected answer to an idle connection: {:?}",
            String::from_utf8_lossy(&sent)
        );
        idle_closed.push(at - opened);
    }
    let mut trickle_closed = Vec::new();
    for w in trickle_waits {
        trickle_closed.push(
            w.await
                .unwrap()
                .expect("a trickling connection was still open after 6 s"),
        );
    }
    let idle_max = percentile(&idle_closed, 100.0);
    let trickle_max = percentile(&trickle_closed, 100.0);
    assert!(
        idle_max < Duration::from_secs(3),
        "idle connections closed after up to {idle_max:?}"
    );
    assert!(
        percentile(&idle_closed, 0.0) >= Duration::from_millis(900),
        "idle connections closed before the header timeout"
    );
    assert!(
        trickle_max < Duration::from_secs(3),
        "trickling connections closed after up to {trickle_max:?}"
    );

    // Normal clients were served, fast.
    assert!(normal.len() >= 30, "only {} normal requests", normal.len());
    for r in &normal {
        assert!(r.ok(), "{r:?}");
        assert!(
            r.took() < NORMAL_BOUND,
            "normal {} took {:?}",
            r.kind,
            r.took()
        );
    }
    let normal_times: Vec<Duration> = normal.iter().map(Rec::took).collect();

    // A body trickled slower than the request timeout (2 s): 408, and the key is not written.
    let body = b"{\"value\": \"trickled-body-0123456789\"}";
    let mut s = TcpStream::connect(svc.http_addr).await.unwrap();
    s.write_all(
        format!(
            "PUT /v1/keys/slow/body HTTP/1.1\r\nHost: kvstore\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let (reader, mut writer) = s.into_split();
    let feeder = tokio::spawn(async move {
        for b in body {
            if writer.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let _ = writer; // keeps the write half open until the body is done
    });
    let answer = {
        let mut reader = reader;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(6), reader.read(&mut buf)).await {
                Err(_) => panic!("a trickled body hung the request for 6 s (request timeout 2 s)"),
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                        break;
                    }
                }
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    let body_answered = started.elapsed();
    feeder.abort();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "trickled body: {answer:.300}"
    );
    if !answer.is_empty() {
        assert!(answer.contains("\"request_timeout\""), "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "a 408 must close the connection: {answer}"
        );
    }
    assert!(
        body_answered >= Duration::from_millis(1900) && body_answered < Duration::from_secs(4),
        "trickled body answered after {body_answered:?} (request timeout 2 s)"
    );
    let r = client
        .get(svc.url("/v1/keys/slow/body"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "a body that never arrived whole was stored"
    );

    // The slow connections' sockets are gone from the service.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fds_after = svc.open_fds();
    assert!(
        fds_after <= fds_before + 20,
        "file descriptors: {fds_before} before, {fds_after} after the slow clients"
    );
    report(
        "slow_clients",
        format!(
            "{IDLE} idle connections closed after {}..{}; {TRICKLING} trickling closed after up to {}; \
             {} normal requests meanwhile, p50 {} p99 {} max {}; trickled body: {} after {}; \
             fds {fds_before} -> {fds_after}",
            ms(percentile(&idle_closed, 0.0)),
            ms(idle_max),
            ms(trickle_max),
            normal.len(),
            ms(percentile(&normal_times, 50.0)),
            ms(percentile(&normal_times, 99.0)),
            ms(percentile(&normal_times, 100.0)),
            answer.lines().next().unwrap_or("connection closed"),
            ms(body_answered)
        ),
    );
}

/// Clients that ask for large answers and never read them: each pipelines requests for 4 MiB
/// listing pages through a 4 KiB receive buffer. Once the socket buffers are full the
/// service's writes stall; after `KV_REQUEST_TIMEOUT` (1 s here) it closes the connection
/// (the client sees the end of the stream long before the answers it asked for) and lets go
/// of what it held; others are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_their_answers_are_let_go() {
    const CLIENTS: usize = 10;
    const PIPELINED: usize = 8;
    let _serial = serial().await;
    let db = fresh_db().await;
    let svc = Service::start(&[
        ("KV_DATABASE_URL", db.url.as_str()),
        ("KV_REQUEST_TIMEOUT", "1s"),
        ("KV_ACCESS_LOG", "false"),
    ])
    .await;
    svc.wait_ready(Duration::from_secs(20)).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let big = "x".repeat(1_000_000);
    for i in 0..5 {
        let r = client
            .put(svc.url(&format!("/v1/keys/big/{i}")))
            .json(&serde_json::json!({ "value": big }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let fds_before = svc.open_fds();
    let rss_before = svc.rss_kib();
    let request = "GET /v1/keys?prefix=big/ HTTP/1.1\r\nHost: x\r\n\r\n".repeat(PIPELINED);
    let mut stalled = Vec::new();
    for _ in 0..CLIENTS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(svc.http_addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        stalled.push(s);
    }
    // Others are served meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let r = client.get(svc.url("/v1/keys/Homer")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let normal = t.elapsed();
    assert!(normal < NORMAL_BOUND, "{normal:?}");
    // Past the timeout, every stalled connection has been closed: reading it now ends well
    // before the 8 × ≈ 5 MB it asked for.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let full = PIPELINED * 5_000_000;
    for s in stalled {
        let (_, got) = until_closed(s, Duration::from_secs(10))
            .await
            .expect("the stalled connection was never closed");
        assert!(got.len() < full / 2, "received {} bytes", got.len());
    }
    // (Descriptors are reported, not asserted: the listings also grew the database pool.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fds_after = svc.open_fds();
    let rss_after = svc.rss_kib();
    report(
        "stalled_readers",
        format!(
            "{CLIENTS} clients × {PIPELINED} pipelined 5 MB pages, never read: closed after the \
             1 s request timeout; a normal GET meanwhile in {}; fds {fds_before} -> {fds_after}; \
             RSS {} -> {} MiB",
            ms(normal),
            rss_before / 1024,
            rss_after / 1024
        ),
    );
}
