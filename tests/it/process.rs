//! The `kvstore` binary as operators run it: commands, exit codes, config errors, logs,
//! SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_kvstore");

fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KV_")) {
        cmd.env_remove(k);
    }
    cmd
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(
        s.starts_with(&format!("kvstore {} (", env!("CARGO_PKG_VERSION"))),
        "{s}"
    );
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    for word in ["serve", "migrate", "import", "KV_DATABASE_URL"] {
        assert!(s.contains(word), "--help lacks {word}: {s}");
    }
}

#[test]
fn configuration_errors_exit_2_with_one_sentence() {
    for (vars, needle) in [
        (vec![], "KV_DATABASE_URL"),
        (
            vec![("KV_DATABASE_URL", "mysql://user:s3cr3t-pw@")],
            "KV_DATABASE_URL",
        ),
        (
            vec![("KV_DATABASE_URL", "postgres://u:s3cr3t-pw@h/db")],
            "KV_DATABASE_URL",
        ),
        (
            vec![
                ("KV_DATABASE_URL", "mysql://u:s3cr3t-pw@h/db"),
                ("KV_CACHE_TTL", "soon"),
            ],
            "KV_CACHE_TTL",
        ),
        (
            vec![
                ("KV_DATABASE_URL", "mysql://u:s3cr3t-pw@h/db"),
                ("KV_LISTEN_ADDR", "everywhere"),
            ],
            "KV_LISTEN_ADDR",
        ),
        // Auth asked for with no token (an empty Secret, say) must not start with writes open.
        (
            vec![
                ("KV_DATABASE_URL", "mysql://u:s3cr3t-pw@h/db"),
                ("KV_API_TOKENS", ""),
            ],
            "KV_API_TOKENS",
        ),
        (
            vec![
                ("KV_DATABASE_URL", "mysql://u:s3cr3t-pw@h/db"),
                ("KV_AUTH_READS", "true"),
            ],
            "KV_AUTH_READS",
        ),
    ] {
        let mut cmd = Command::new(BIN);
        clean_env(&mut cmd).envs(vars.iter().cloned());
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{vars:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains("s3cr3t-pw"), "password leaked: {err}");
        assert!(out.stdout.is_empty());
    }
}

/// Takes the migration lock of the connection's database, as a replica that is migrating
/// would; returns its name (for `RELEASE_LOCK`).
async fn hold_migration_lock(holder: &mut mysql_async::Conn) -> String {
    use mysql_async::prelude::Queryable;
    let db_name: String = holder
        .query_first("SELECT DATABASE()")
        .await
        .unwrap()
        .unwrap();
    let lock = format!("kvstore.migrate.{db_name}");
    let got: Option<i64> = holder
        .exec_first("SELECT GET_LOCK(?, 0)", (lock.as_str(),))
        .await
        .unwrap();
    assert_eq!(got, Some(1));
    lock
}

#[tokio::test]
async fn migrate_and_import_commands() {
    use mysql_async::prelude::Queryable;
    let db = TestDb::new().await;
    // `migrate` waits for the named migration lock: held here, nothing is applied until it
    // is released.
    let mut holder = db.conn().await;
    let lock = hold_migration_lock(&mut holder).await;
    let mut cmd = Command::new(BIN);
    let mut child = clean_env(&mut cmd)
        .env("KV_DATABASE_URL", &db.url)
        .arg("migrate")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "migrate did not wait for the lock"
    );
    let mut probe = db.conn().await;
    let tables: Vec<String> = probe
        .query("SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()")
        .await
        .unwrap();
    assert!(tables.is_empty(), "applied without the lock: {tables:?}");
    let _: Option<i64> = holder
        .exec_first("SELECT RELEASE_LOCK(?)", (lock.as_str(),))
        .await
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(
        status.success(),
        "migrate failed after the lock was released"
    );
    // Every migration recorded once, the seed loaded; a second run applies nothing again.
    let count = |sql: &'static str| {
        let pool_url = db.url.clone();
        async move {
            let mut c = mysql_async::Conn::from_url(pool_url).await.unwrap();
            let n: Option<u64> = c.query_first(sql).await.unwrap();
            n.unwrap()
        }
    };
    let migrations = kvstore::store::migrations::MIGRATIONS.len() as u64;
    let seeded = "SELECT COUNT(*) FROM kv_entries WHERE k IN ('Homer', 'Jeffrey', 'Stan')";
    assert_eq!(
        count("SELECT COUNT(*) FROM kv_schema_migrations").await,
        migrations
    );
    assert_eq!(count(seeded).await, 3);
    run_ok(&db.url, &["migrate"]);
    assert_eq!(
        count("SELECT COUNT(*) FROM kv_schema_migrations").await,
        migrations
    );
    assert_eq!(count(seeded).await, 3);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.json");
    std::fs::write(
        &file,
        r#"[{"Homer": "Simpson", "Marge": {"hair": "blue"}}, {"Bart": [1, 2], "Homer": "J."}]"#,
    )
    .unwrap();
    let out = run_ok(&db.url, &["import", file.to_str().unwrap()]);
    // Homer twice is one key, written once, with its last value.
    assert!(out.contains("imported 3 keys"), "{out}");
    std::fs::write(&file, "not json").unwrap();
    let mut cmd = Command::new(BIN);
    let out = clean_env(&mut cmd)
        .env("KV_DATABASE_URL", &db.url)
        .args(["import", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let app = spawn_app_on(&db.url, &[]).await;
    let e: Value = app.get("/v1/keys/Marge").await.json().await.unwrap();
    assert_eq!(e["value"]["hair"], "blue");
    let e: Value = app.get("/v1/keys/Homer").await.json().await.unwrap();
    assert_eq!(e["version"], 2, "import wrote over the seeded key, once");
    assert_eq!(e["value"], "J.");
}

#[tokio::test]
async fn serves_logs_json_and_shuts_down_gracefully_on_sigterm() {
    let db = TestDb::new().await;
    let Serving {
        mut child,
        rx,
        mut lines,
        http,
    } = serve(
        &db.url,
        &[("KV_SHUTDOWN_DELAY", "1s"), ("KV_SHUTDOWN_TIMEOUT", "5s")],
    );
    let client = reqwest::Client::new();
    wait_ready_at(&client, &http).await;
    let r = client
        .get(format!("{http}/v1/keys/Homer"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["value"], "Simpson");

    let started = Instant::now();
    unsafe_kill(child.id(), "TERM");
    // During the shutdown delay the instance still serves, but is not ready, and says why.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client.get(format!("{http}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["code"], "unavailable");
    assert!(
        doc["detail"].as_str().unwrap().contains("shutting down"),
        "{doc}"
    );
    assert_eq!(
        client
            .get(format!("{http}/v1/keys/Homer"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the shutdown delay was honoured"
    );
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
        lines.push(l);
    }
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let starting = records
        .iter()
        .find(|r| r["msg"] == "starting")
        .expect("start-up summary");
    assert!(starting["version"].is_string() && starting["database"].is_string());
    let access = records
        .iter()
        .find(|r| r["msg"] == "request" && r["route"] == "/v1/keys/{key}")
        .expect("access line");
    for f in [
        "ts",
        "level",
        "request_id",
        "method",
        "route",
        "status",
        "duration_ms",
        "bytes",
    ] {
        assert!(!access[f].is_null(), "access line lacks {f}: {access}");
    }
    assert!(records
        .iter()
        .any(|r| r["msg"].as_str().unwrap().contains("database pool closed")));
    assert!(
        !lines.iter().any(|l| l.contains("Simpson")),
        "a stored value was logged"
    );
}

#[tokio::test]
async fn sigint_shuts_down_too_and_a_second_signal_exits_at_once() {
    let db = TestDb::new().await;
    let client = reqwest::Client::new();
    // SIGINT (Ctrl-C) gives the same graceful shutdown as SIGTERM: exit 0.
    let mut s = serve(&db.url, &[("KV_SHUTDOWN_DELAY", "200ms")]);
    wait_ready_at(&client, &s.http).await;
    unsafe_kill(s.child.id(), "INT");
    assert_eq!(
        wait_exit(&mut s.child, Duration::from_secs(10)).code(),
        Some(0)
    );
    // A second signal during a long shutdown delay ends the process at once.
    let mut s = serve(&db.url, &[("KV_SHUTDOWN_DELAY", "60s")]);
    wait_ready_at(&client, &s.http).await;
    unsafe_kill(s.child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    while client
        .get(format!("{}/readyz", s.http))
        .send()
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "SIGTERM did not start the shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "the delay was not honoured"
    );
    let second = Instant::now();
    unsafe_kill(s.child.id(), "INT");
    let status = wait_exit(&mut s.child, Duration::from_secs(5));
    assert!(
        second.elapsed() < Duration::from_secs(2),
        "{:?}",
        second.elapsed()
    );
    assert!(
        !status.success(),
        "an interrupted shutdown must not look clean"
    );
}

/// Runs `kvstore ARGS` against `db_url` to completion; it must succeed. Returns its stdout.
fn run_ok(db_url: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(BIN);
    let out = clean_env(&mut cmd)
        .env("KV_DATABASE_URL", db_url)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kvstore {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A serving `kvstore` process on free ports.
struct Serving {
    child: std::process::Child,
    /// Its stdout lines after those in `lines`.
    rx: std::sync::mpsc::Receiver<String>,
    /// Its stdout lines up to the "listening" line.
    lines: Vec<String>,
    /// Its API's base URL.
    http: String,
}

fn serve(db_url: &str, env: &[(&str, &str)]) -> Serving {
    let mut cmd = Command::new(BIN);
    let mut child = clean_env(&mut cmd)
        .env("KV_DATABASE_URL", db_url)
        .env("KV_LISTEN_ADDR", "127.0.0.1:0")
        .env("KV_METRICS_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let http = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("listening line");
        lines.push(line.clone());
        let rec: Value = serde_json::from_str(&line).expect("every stdout line is JSON");
        if rec["msg"] == "listening" {
            break format!("http://{}", rec["http_addr"].as_str().unwrap());
        }
    };
    Serving {
        child,
        rx,
        lines,
        http,
    }
}

async fn wait_ready_at(client: &reqwest::Client, http: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .get(format!("{http}/readyz"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(started.elapsed() < within, "did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Until the migrations have run, `/v1/keys` answers 503, even when part of the schema is
/// there already (here 0001's tables, with the migration lock held by someone else): a write
/// in that window could take the change-log id the seed migration inserts.
#[tokio::test]
async fn keys_answer_503_until_the_schema_is_migrated() {
    use kvstore::store::migrations::{statements, MIGRATIONS};
    use mysql_async::prelude::Queryable;
    let db = TestDb::new().await;
    let mut holder = db.conn().await;
    for stmt in statements(MIGRATIONS[0].sql) {
        holder.query_drop(stmt).await.unwrap();
    }
    let lock = hold_migration_lock(&mut holder).await;
    let app = spawn_app_unready(&db.url, &[]).await;
    let r = app.get("/readyz").await;
    assert_eq!(r.status(), 503);
    for r in [
        app.get("/v1/keys/k").await,
        app.put_value("k", serde_json::json!(1)).await,
        app.get("/v1/keys?prefix=k").await,
    ] {
        let p = assert_problem(r, 503, "unavailable").await;
        assert!(
            p["detail"].as_str().unwrap().contains("migrations pending"),
            "{p}"
        );
    }
    let _: Option<i64> = holder
        .exec_first("SELECT RELEASE_LOCK(?)", (lock.as_str(),))
        .await
        .unwrap();
    wait_ready(&app, Duration::from_secs(30)).await;
    assert_eq!(app.put_value("k", serde_json::json!(1)).await.status(), 201);
}
