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
        r#"[{"Homer": "Simpson", "Marge": {"hair": "blue"}}, {"Bart": [1, 2]}]"#,
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
    assert_eq!(e["version"], 2, "import wrote over the seeded key");
}

/// The binary serving, as operators run it.
struct Served {
    child: std::process::Child,
    /// `http://ADDR` of the API port.
    http: String,
    /// Its stdout lines, as they come.
    rx: std::sync::mpsc::Receiver<String>,
    /// The stdout lines read up to readiness.
    lines: Vec<String>,
}

/// Starts the binary with `env` (on top of a clean `KV_*` environment, the database and port
/// 0 for both listeners) and waits until `/readyz` says ready.
async fn serve_binary(db_url: &str, env: &[(&str, &str)]) -> Served {
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
    Served {
        child,
        http,
        rx,
        lines,
    }
}

#[tokio::test]
async fn serves_logs_json_and_shuts_down_gracefully_on_sigterm() {
    let db = TestDb::new().await;
    let password_marker = db.url.clone();
    let Served {
        mut child,
        http,
        rx,
        mut lines,
    } = serve_binary(
        &db.url,
        &[("KV_SHUTDOWN_DELAY", "1s"), ("KV_SHUTDOWN_TIMEOUT", "5s")],
    )
    .await;
    let client = reqwest::Client::new();
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

/// The image runs the service with glibc's malloc tuned (`ENV GLIBC_TUNABLES` in the
/// Dockerfile): one arena for every thread, its heap advised for transparent huge pages.
/// glibc silently ignores a tunable it does not know, so this checks the effect on the
/// binary. With the image's setting, the anonymous mapping that holds the most memory (the
/// cache's entries, allocated on the runtime's workers) is the main heap, and where the
/// node's THP mode is `madvise` (glibc advises only then) it is advised for huge pages (`hg`
/// in `/proc/PID/smaps`). With glibc's defaults it is a worker's own arena, not advised.
#[tokio::test]
async fn the_images_malloc_settings_put_the_cache_on_huge_pages() {
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .expect("read the Dockerfile");
    let tunables = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ENV GLIBC_TUNABLES="))
        .expect("the Dockerfile sets GLIBC_TUNABLES");
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let madvise_mode = thp.contains("[madvise]");
    let db = TestDb::new().await;
    let client = reqwest::Client::new();
    let value = serde_json::json!({ "value": "x".repeat(64 << 10) });
    for (setting, tuned) in [(tunables, true), ("", false)] {
        let mut served = serve_binary(&db.url, &[("GLIBC_TUNABLES", setting)]).await;
        // ≈ 4 MiB of entries in the cache: a write caches what it wrote, and a read hits it.
        for i in 0..64 {
            let url = format!("{}/v1/keys/huge/{i}", served.http);
            let r = client.put(&url).json(&value).send().await.unwrap();
            assert!(r.status().is_success(), "PUT {url}: {}", r.status());
            let r = client.get(&url).send().await.unwrap();
            assert_eq!(r.headers()["cache-status"], "kvstore; hit", "{url}");
        }
        let (mapping, rss_kib, flags) = largest_anonymous_mapping(served.child.id());
        served.child.kill().unwrap();
        let _ = served.child.wait();
        let what = format!(
            "GLIBC_TUNABLES={setting:?}: the largest anonymous mapping is {mapping} \
             ({rss_kib} KiB, VmFlags {flags}); THP mode {thp:?}"
        );
        // The entries' 4 MiB, split between at most a few arenas without the setting.
        assert!(rss_kib >= 1 << 10, "{what}");
        assert_eq!(mapping.ends_with("[heap]"), tuned, "{what}");
        let advised = flags.split_whitespace().any(|f| f == "hg");
        assert_eq!(advised, tuned && madvise_mode, "{what}");
    }
}

/// The private, writable, anonymous mapping (the `[heap]` included) with the largest RSS
/// in `/proc/PID/smaps`: its header line, its RSS in KiB and its `VmFlags`.
fn largest_anonymous_mapping(pid: u32) -> (String, u64, String) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut largest = (String::new(), 0, String::new());
    let mut current: Option<(&str, u64)> = None;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.first() {
            Some(&"Rss:") => {
                if let Some(c) = current.as_mut() {
                    c.1 = fields[1].parse().expect("Rss in kB");
                }
            }
            Some(&"VmFlags:") => {
                if let Some((header, rss)) = current.take() {
                    if rss > largest.1 {
                        largest = (header.to_string(), rss, fields[1..].join(" "));
                    }
                }
            }
            Some(f) if !f.ends_with(':') => {
                // A mapping's header: range, permissions, offset, device, inode[, path].
                let anonymous = fields.len() < 6 || fields[5] == "[heap]";
                current = (anonymous && fields[1] == "rw-p").then_some((line, 0));
            }
            _ => {}
        }
    }
    largest
}
