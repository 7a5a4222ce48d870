//! Test harness: a MySQL-protocol server for the whole run, a fresh database per test, the
//! service started in-process on port 0, and a TCP proxy that can cut or stall the database.
//!
//! The server is `TEST_DATABASE_URL` if set (e.g. `mysql://root@127.0.0.1:3306/`), else a
//! throwaway `mariadbd`/`mysqld` from PATH, started in a temp dir and removed when the test
//! process exits (a watchdog shell waits for this process to end). With neither, the tests
//! fail with one sentence saying what to install. Set `TEST_LOG=1` to see service logs.

#![allow(dead_code)]

pub mod proxy;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvstore::app::{self, Running};
use kvstore::config::Config;
use kvstore::logging::AccessLog;
use mysql_async::prelude::*;
use slog::Drain;

/// Base URL of the test server, without a database name: `mysql://user:pw@host:port`.
pub fn server_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("TEST_DATABASE_URL") {
        Ok(u) if !u.trim().is_empty() => strip_db(u.trim()),
        // On a thread of its own: this may be called inside a test's runtime.
        _ => std::thread::spawn(start_throwaway_server)
            .join()
            .expect("database start"),
    })
}

fn strip_db(url: &str) -> String {
    let (base, _) = url.split_once('?').unwrap_or((url, ""));
    let after_scheme = base.trim_start_matches("mysql://");
    match after_scheme.find('/') {
        Some(i) => format!("mysql://{}", &after_scheme[..i]),
        None => format!("mysql://{after_scheme}"),
    }
}

/// The first of `names` found on PATH (or in the sbin directories).
pub fn which(names: &[&str]) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    for n in names {
        for dir in path
            .split(':')
            .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"])
        {
            let p = format!("{dir}/{n}");
            if std::path::Path::new(&p).is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Starts a private MariaDB/MySQL in a temp dir; returns its base URL. It is stopped and
/// its directory removed when this test process exits.
pub fn start_throwaway_server() -> String {
    let server = which(&["mariadbd", "mysqld"]);
    let install = which(&["mariadb-install-db", "mysql_install_db"]);
    let (Some(server), Some(install)) = (server, install) else {
        panic!(
            "no MySQL-protocol server for the tests: install a MariaDB server \
             (apt-get install -y mariadb-server) or set TEST_DATABASE_URL=mysql://user:pw@host:3306/"
        );
    };
    let dir = tempfile::Builder::new()
        .prefix("kvstore-test-db.")
        .tempdir()
        .unwrap()
        .keep();
    let port = free_port();
    let d = dir.display();
    let root = if is_root() { "--user=root" } else { "" };
    install_datadir(&install, &dir.join("data"));
    // The watchdog stops the server and removes its directory once this process is gone.
    let script = format!(
        "{server} --no-defaults --datadir={d}/data --socket={d}/sock --port={port} \
         --bind-address=127.0.0.1 {root} --pid-file={d}/pid --log-error={d}/error.log \
         --skip-name-resolve --innodb-buffer-pool-size=64M --max-connections=1000 & \
         srv=$!; while kill -0 {parent} 2>/dev/null; do sleep 0.5; done; \
         kill $srv; wait $srv; rm -rf {d}",
        parent = std::process::id()
    );
    // Not waited for on purpose: the watchdog outlives this process to clean up after it.
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sh");
    let url = format!("mysql://root@127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    loop {
        let ok = rt.block_on(async {
            let opts = mysql_async::Opts::from_url(&format!("{url}/?prefer_socket=false")).unwrap();
            match mysql_async::Conn::new(opts).await {
                Ok(c) => {
                    let _ = c.disconnect().await;
                    true
                }
                Err(_) => false,
            }
        });
        if ok {
            return url;
        }
        assert!(
            Instant::now() < deadline,
            "throwaway database did not start; see {d}/error.log"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Initialises an empty MariaDB/MySQL data directory (root with an empty password).
pub fn install_datadir(install: &str, datadir: &std::path::Path) {
    let st = Command::new(install)
        .args([
            "--no-defaults",
            &format!("--datadir={}", datadir.display()),
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ])
        .args(if is_root() {
            vec!["--user=root"]
        } else {
            vec![]
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run mariadb-install-db");
    assert!(
        st.success(),
        "mariadb-install-db failed for {}",
        datadir.display()
    );
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh, empty database on the test server; dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!("kvt_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let mut conn = admin_conn().await;
        conn.query_drop(format!("CREATE DATABASE `{name}`"))
            .await
            .unwrap();
        let _ = conn.disconnect().await;
        let url = format!("{}/{name}?prefer_socket=false", server_url());
        TestDb { name, url }
    }

    /// A direct connection to this database (to look behind the service's back).
    pub async fn conn(&self) -> mysql_async::Conn {
        mysql_async::Conn::new(mysql_async::Opts::from_url(&self.url).unwrap())
            .await
            .unwrap()
    }

    /// The URL with another host:port (e.g. a proxy in front of the server).
    pub fn url_via(&self, addr: std::net::SocketAddr) -> String {
        let base = server_url().trim_start_matches("mysql://");
        let creds = base
            .rsplit_once('@')
            .map(|(c, _)| format!("{c}@"))
            .unwrap_or_default();
        format!("mysql://{creds}{addr}/{}?prefer_socket=false", self.name)
    }

    /// The server's address.
    pub fn server_addr(&self) -> std::net::SocketAddr {
        use std::net::ToSocketAddrs;
        let base = server_url().trim_start_matches("mysql://");
        let hostport = base.rsplit_once('@').map(|(_, h)| h).unwrap_or(base);
        hostport.to_socket_addrs().unwrap().next().unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // On a thread of its own: we may be inside a runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut c = admin_conn().await;
                let _ = c
                    .query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                    .await;
                let _ = c.disconnect().await;
            });
        })
        .join();
    }
}

async fn admin_conn() -> mysql_async::Conn {
    let url = format!("{}/?prefer_socket=false", server_url());
    mysql_async::Conn::new(mysql_async::Opts::from_url(&url).unwrap())
        .await
        .unwrap()
}

/// Log lines captured from an in-process service (JSON records as strings).
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<String>>>);

impl LogCapture {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

struct CaptureWriter(LogCapture, Vec<u8>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.extend_from_slice(buf);
        while let Some(i) = self.1.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.1.drain(..=i).collect();
            let s = String::from_utf8_lossy(&line).trim_end().to_string();
            if std::env::var("TEST_LOG").is_ok() {
                println!("{s}");
            }
            (self.0).0.lock().unwrap().push(s);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn test_logger(capture: &LogCapture) -> slog::Logger {
    let json = slog_json::Json::new(CaptureWriter(capture.clone(), Vec::new()))
        .set_newlines(true)
        .add_default_keys()
        .build()
        .fuse();
    let drain = std::sync::Mutex::new(json).map(slog::Fuse);
    slog::Logger::root(drain.filter_level(slog::Level::Debug).fuse(), slog::o!())
}

/// A running service instance for one test.
pub struct TestApp {
    pub base: String,
    pub metrics_base: String,
    pub client: reqwest::Client,
    pub running: Option<Running>,
    pub logs: LogCapture,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn put(&self, key: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .put(self.url(&format!("/v1/keys/{key}")))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn put_value(&self, key: &str, value: serde_json::Value) -> reqwest::Response {
        self.put(key, serde_json::json!({ "value": value })).await
    }

    pub async fn delete(&self, key: &str) -> reqwest::Response {
        self.client
            .delete(self.url(&format!("/v1/keys/{key}")))
            .send()
            .await
            .unwrap()
    }

    pub async fn metrics_text(&self) -> String {
        let url = format!("{}/metrics", self.metrics_base);
        self.client
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn stats(&self) -> serde_json::Value {
        self.get("/v1/stats").await.json().await.unwrap()
    }

    pub fn state(&self) -> &kvstore::api::State {
        &self.running.as_ref().unwrap().state
    }

    /// Count of database operations of one kind made by this instance so far.
    pub fn db_ops(&self, op: &str) -> u64 {
        self.state()
            .metrics
            .db_duration
            .with_label_values(&[op])
            .get_sample_count()
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.trigger_shutdown();
        }
    }
}

/// Settings every test instance gets unless it overrides them.
pub fn base_vars(db_url: &str) -> HashMap<String, String> {
    [
        ("KV_DATABASE_URL", db_url),
        ("KV_LISTEN_ADDR", "127.0.0.1:0"),
        ("KV_METRICS_ADDR", "127.0.0.1:0"),
        ("KV_SHUTDOWN_DELAY", "0s"),
        ("KV_SHUTDOWN_TIMEOUT", "5s"),
        ("KV_DB_POOL_MAX", "8"),
        ("KV_DB_QUERY_TIMEOUT", "2s"),
        ("KV_DB_ACQUIRE_TIMEOUT", "2s"),
        ("KV_DB_CONNECT_TIMEOUT", "1s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Starts the service on `db_url` with `extra` settings and waits until it is ready.
pub async fn spawn_app_on(db_url: &str, extra: &[(&str, &str)]) -> TestApp {
    let app = spawn_app_unready(db_url, extra).await;
    wait_ready(&app, Duration::from_secs(20)).await;
    app
}

/// The service on `db_url`, serving but perhaps not ready yet.
pub async fn spawn_app_unready(db_url: &str, extra: &[(&str, &str)]) -> TestApp {
    let mut vars = base_vars(db_url);
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    let config = Config::from_vars(&vars).expect("test config is valid");
    let logs = LogCapture::default();
    let log = test_logger(&logs);
    let running = app::start(config, log.clone(), AccessLog::slog(log))
        .await
        .expect("service starts");
    TestApp {
        base: format!("http://{}", running.http_addr),
        metrics_base: format!("http://{}", running.metrics_addr),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap(),
        running: Some(running),
        logs,
    }
}

pub async fn wait_ready(app: &TestApp, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = app.client.get(app.url("/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "service did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh database and a ready service on it.
pub async fn spawn_app(extra: &[(&str, &str)]) -> (TestApp, TestDb) {
    let db = TestDb::new().await;
    let app = spawn_app_on(&db.url, extra).await;
    (app, db)
}

/// Asserts a problem+json answer with `status` and `code`; returns the document.
pub async fn assert_problem(resp: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "status of {}", resp.url());
    assert_eq!(
        resp.headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("application/problem+json")
    );
    let rid = resp
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let doc: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(doc["code"], code, "{doc}");
    assert_eq!(doc["status"], status, "{doc}");
    assert_eq!(doc["type"], "about:blank");
    assert_eq!(doc["request_id"], rid.as_str());
    assert!(doc["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(doc["detail"].as_str().is_some_and(|t| !t.is_empty()));
    doc
}
