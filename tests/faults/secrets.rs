//! Issue 5, item 8: no log line contains the database password, an API token or a stored
//! value. The real binary runs at debug level with a password-protected database user and
//! auth on, serves traffic that includes every kind of error (401, 404, 412, 413, 400, 503
//! with the database cut off), shuts down; then its whole stdout and stderr are searched.
//! The password is also given through `KV_DATABASE_PASSWORD`, and a wrong one is tried.

use std::time::Duration;

use mysql_async::prelude::*;
use serde_json::{json, Value};

use crate::common::proxy::{Mode, Proxy};
use crate::common::TestDb;
use crate::support::*;

/// A MySQL user with a password, on the test server, removed on drop.
struct DbUser {
    name: String,
    admin_url: String,
}

impl DbUser {
    async fn create(db: &TestDb, password: &str) -> DbUser {
        let name = format!("kvpw_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let mut c = db.conn().await;
        c.query_drop(format!(
            "CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'"
        ))
        .await
        .unwrap();
        c.query_drop(format!("GRANT ALL ON `{}`.* TO '{name}'@'%'", db.name))
            .await
            .unwrap();
        let _ = c.disconnect().await;
        DbUser {
            name,
            admin_url: db.url.clone(),
        }
    }
}

impl Drop for DbUser {
    fn drop(&mut self) {
        let (name, url) = (self.name.clone(), self.admin_url.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let opts = mysql_async::Opts::from_url(&url).unwrap();
                if let Ok(mut c) = mysql_async::Conn::new(opts).await {
                    let _ = c
                        .query_drop(format!("DROP USER IF EXISTS '{name}'@'%'"))
                        .await;
                    let _ = c.disconnect().await;
                }
            });
        })
        .join();
    }
}

fn hex(n: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string()[..n].to_string()
}

/// Every log line (stdout and stderr) of `svc`, after asking what leaked.
fn leaks(svc: &Service, secrets: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for line in svc.stdout_lines().iter().chain(&svc.stderr_lines()) {
        for s in secrets {
            if line.contains(s.as_str()) {
                found.push(format!("{s:?} in: {line}"));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_holds_a_password_a_token_or_a_value() {
    let _serial = serial().await;
    let db = fresh_db().await;
    let password = format!("S3cretPass-xyz-{}", hex(10));
    let wrong_password = format!("Wr0ngPass-{}", hex(10));
    let token = format!("tok-{}", hex(24));
    let other_token = format!("tok2-{}", hex(24));
    let wrong_token = format!("wrongtok-{}", hex(20));
    let marker = hex(12);
    let value = |n: u32| format!("VAL-{marker}-{n}");
    let user = DbUser::create(&db, &password).await;
    let proxy = Proxy::start(db.server_addr()).await;
    let url = format!(
        "mysql://{}:{password}@{}/{}?prefer_socket=false",
        user.name, proxy.addr, db.name
    );
    let tokens = format!("{token},{other_token}");
    let mut svc = Service::start(&[
        ("KV_DATABASE_URL", url.as_str()),
        ("KV_API_TOKENS", tokens.as_str()),
        ("KV_LOG_LEVEL", "debug"),
        ("KV_MAX_VALUE_BYTES", "2048"),
        ("KV_DB_QUERY_TIMEOUT", "1s"),
        ("KV_DB_ACQUIRE_TIMEOUT", "1s"),
        ("KV_DB_CONNECT_TIMEOUT", "1s"),
        ("KV_SHUTDOWN_DELAY", "0s"),
    ])
    .await;
    svc.wait_ready(Duration::from_secs(20)).await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let key_url = |k: &str| svc.url(&format!("/v1/keys/{k}"));
    let mut statuses = Vec::new();
    macro_rules! send {
        ($req:expr) => {{
            let r = $req.send().await.unwrap();
            statuses.push(r.status().as_u16());
            r
        }};
    }

    // Writes with a token: created, replaced, through PUT and POST, nested values.
    let r = send!(c
        .put(key_url("sec/a"))
        .bearer_auth(&token)
        .json(&json!({"value": value(1)})));
    assert_eq!(r.status(), 201);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let r = send!(c
        .put(key_url("sec/a"))
        .bearer_auth(&other_token)
        .json(&json!({"value": {"nested": [value(2), {"deep": value(3)}]}, "ttl_seconds": 600})));
    assert_eq!(r.status(), 200);
    let r = send!(c
        .post(svc.url("/v1/keys"))
        .bearer_auth(&token)
        .json(&json!({"key": "sec/b", "value": value(4)})));
    assert_eq!(r.status(), 201);
    // Reads: single, HEAD, list, bypass, conditional.
    let r = send!(c.get(key_url("sec/b")));
    assert_eq!(r.json::<Value>().await.unwrap()["value"], value(4));
    send!(c.head(key_url("sec/a")));
    let r = send!(c.get(svc.url("/v1/keys?prefix=sec/")));
    assert_eq!(r.status(), 200);
    send!(c.get(key_url("sec/a")).header("cache-control", "no-cache"));
    // Errors: 401 (no token, wrong token), 404, 412, 413, 400.
    let r = send!(c.put(key_url("sec/c")).json(&json!({"value": value(5)})));
    assert_eq!(r.status(), 401);
    let r = send!(c
        .put(key_url("sec/c"))
        .bearer_auth(&wrong_token)
        .json(&json!({"value": value(6)})));
    assert_eq!(r.status(), 401);
    let r = send!(c.delete(key_url("sec/b")).bearer_auth(&wrong_token));
    assert_eq!(r.status(), 401);
    let r = send!(c.get(key_url("sec/missing")));
    assert_eq!(r.status(), 404);
    let r = send!(c
        .put(key_url("sec/a"))
        .bearer_auth(&token)
        .header("if-match", &etag)
        .json(&json!({"value": value(7)})));
    assert_eq!(r.status(), 412);
    let r = send!(c
        .put(key_url("sec/big"))
        .bearer_auth(&token)
        .json(&json!({"value": format!("{}{}", value(8), "x".repeat(3000))})));
    assert_eq!(r.status(), 413);
    let r = send!(c
        .put(key_url("sec/bad"))
        .bearer_auth(&token)
        .body(format!("{{\"value\": \"{}\"", value(9))));
    assert_eq!(r.status(), 400);
    let r = send!(c
        .put(key_url("sec/bad"))
        .bearer_auth(&token)
        .body(format!("{{\"value\": 1, \"{}\": 2}}", value(10))));
    assert_eq!(r.status(), 400);

    // 503: the database is cut off; uncached reads and writes fail, the logs say why.
    proxy.set(Mode::Refuse);
    let r = send!(c.get(key_url("sec/uncached")));
    assert_eq!(r.status(), 503);
    let r = send!(c
        .put(key_url("sec/d"))
        .bearer_auth(&token)
        .json(&json!({"value": value(11)})));
    assert_eq!(r.status(), 503);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !svc
        .stdout_lines()
        .iter()
        .any(|l| l.contains("database is unreachable"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the outage was not logged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.set(Mode::Pass);
    svc.wait_ready(Duration::from_secs(10)).await;
    let r = send!(c.delete(key_url("sec/b")).bearer_auth(&token));
    assert_eq!(r.status(), 204);
    svc.signal("TERM");
    assert_eq!(
        svc.wait_exit(Duration::from_secs(10))
            .await
            .and_then(|s| s.code()),
        Some(0)
    );
    svc.settle_logs().await;
    for s in [200, 201, 204, 400, 401, 404, 412, 413, 503] {
        assert!(statuses.contains(&s), "the traffic lacks a {s}");
    }

    // The same password through KV_DATABASE_PASSWORD (URL without it).
    let url_no_pw = format!(
        "mysql://{}@{}/{}?prefer_socket=false",
        user.name,
        db.server_addr(),
        db.name
    );
    let mut svc2 = Service::start(&[
        ("KV_DATABASE_URL", url_no_pw.as_str()),
        ("KV_DATABASE_PASSWORD", password.as_str()),
        ("KV_API_TOKENS", token.as_str()),
        ("KV_LOG_LEVEL", "debug"),
        ("KV_SHUTDOWN_DELAY", "0s"),
    ])
    .await;
    svc2.wait_ready(Duration::from_secs(20)).await;
    let r = c
        .put(svc2.url("/v1/keys/sec/e"))
        .bearer_auth(&token)
        .json(&json!({"value": value(12)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c.get(svc2.url("/v1/keys/sec/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    svc2.signal("TERM");
    assert_eq!(
        svc2.wait_exit(Duration::from_secs(10))
            .await
            .and_then(|s| s.code()),
        Some(0)
    );
    svc2.settle_logs().await;

    // A wrong password: the service retries and logs why, without the password.
    let url_wrong = format!(
        "mysql://{}:{wrong_password}@{}/{}?prefer_socket=false",
        user.name,
        db.server_addr(),
        db.name
    );
    let svc3 = Service::start(&[
        ("KV_DATABASE_URL", url_wrong.as_str()),
        ("KV_LOG_LEVEL", "debug"),
    ])
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !svc3
        .stdout_lines()
        .iter()
        .any(|l| l.contains("migrations failed"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no error logged with a wrong password"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    svc3.settle_logs().await;

    // The search.
    let mut secrets = vec![
        password.clone(),
        wrong_password.clone(),
        token.clone(),
        other_token.clone(),
        wrong_token.clone(),
        marker.clone(),
    ];
    secrets.extend((1..=12).map(value));
    let mut found = Vec::new();
    for s in [&svc, &svc2, &svc3] {
        found.extend(leaks(s, &secrets));
    }
    assert!(
        found.is_empty(),
        "secrets in the logs:\n{}",
        found.join("\n")
    );
    // The search was not vacuous: the logs are there, with an access line per request.
    let lines = svc.stdout_lines();
    let access: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).expect("every log line is JSON"))
        .filter(|r| r["msg"] == "request")
        .collect();
    assert!(
        access.len() >= statuses.len(),
        "{} access lines",
        access.len()
    );
    for s in [401, 412, 413, 503] {
        assert!(
            access.iter().any(|r| r["status"] == s),
            "no access line with {s}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains(&user.name)),
        "the database user is logged (not its password)"
    );
    report(
        "secrets",
        format!(
            "{} log lines from 3 processes searched for {} secrets: none found",
            [&svc, &svc2, &svc3]
                .iter()
                .map(|s| s.stdout_lines().len() + s.stderr_lines().len())
                .sum::<usize>(),
            secrets.len()
        ),
    );
}
