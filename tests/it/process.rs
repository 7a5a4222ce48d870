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

#[tokio::test]
async fn migrate_and_import_commands() {
    let db = TestDb::new().await;
    for _ in 0..2 {
        let mut cmd = Command::new(BIN);
        let out = clean_env(&mut cmd)
            .env("KV_DATABASE_URL", &db.url)
            .arg("migrate")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.json");
    std::fs::write(
        &file,
        r#"[{"Homer": "Simpson", "Marge": {"hair": "blue"}}, {"Bart": [1, 2], "Homer": "J."}]"#,
    )
    .unwrap();
    let mut cmd = Command::new(BIN);
    let out = clean_env(&mut cmd)
        .env("KV_DATABASE_URL", &db.url)
        .args(["import", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Homer twice is one key, written once, with its last value.
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported 3 keys"));
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
    let password_marker = db.url.clone();
    let mut cmd = Command::new(BIN);
    let mut child = clean_env(&mut cmd)
        .env("KV_DATABASE_URL", &db.url)
        .env("KV_LISTEN_ADDR", "127.0.0.1:0")
        .env("KV_METRICS_ADDR", "127.0.0.1:0")
        .env("KV_SHUTDOWN_DELAY", "1s")
        .env("KV_SHUTDOWN_TIMEOUT", "5s")
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
    let client = reqwest::Client::new();
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
    let r = client
        .get(format!("{http}/v1/keys/Homer"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["value"], "Simpson");

    let started = Instant::now();
    unsafe_kill(child.id(), "TERM");
    // During the shutdown delay the instance still serves, but is not ready.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client.get(format!("{http}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        client
            .get(format!("{http}/v1/keys/Homer"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
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
    let _ = password_marker;
}

fn unsafe_kill(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}
