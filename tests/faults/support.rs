//! Fault-injection helpers: the real `kvstore` binary as a child process, a private MariaDB
//! server that a test may `kill -9`, restart, SIGSTOP and SIGCONT, a TCP proxy that adds
//! latency to every database answer, request records and percentiles.
//!
//! Every process started here is killed (and its files removed) when its handle is dropped,
//! also when a test panics; a watchdog shell removes a private database server even if this
//! test process itself is killed.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{install_datadir, is_root, which};

pub const BIN: &str = env!("CARGO_BIN_EXE_kvstore");

/// The fault tests measure timings on a small machine: they run one at a time.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// A fresh database on the shared test server (`TEST_DATABASE_URL`, else the harness's
/// throwaway server, started here on a thread of its own: the harness starts it with a
/// `block_on` that may not run inside a test's runtime).
pub async fn fresh_db() -> crate::common::TestDb {
    std::thread::spawn(|| {
        let _ = crate::common::server_url();
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
    crate::common::TestDb::new().await
}

/// Sends a signal by name (`KILL`, `TERM`, `STOP`, `CONT`) to a process.
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// Whether every thread of `pid` is stopped (state `T` in /proc/PID/task/TID/stat).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            // the state follows the command name, which is in parentheses and may hold spaces
            .map(|st| {
                st.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T'))
            })
            .unwrap_or(true) // a thread that exited meanwhile
    })
}

/// Resident set size of a process in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS line")
}

/// Number of open file descriptors of a process (panics if they cannot be read: a count of
/// 0 would make every "no descriptor leaked" check pass).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
        .count()
}

// ---------------------------------------------------------------------------------------
// The service binary
// ---------------------------------------------------------------------------------------

/// The real `kvstore` binary, serving on loopback port 0; killed on drop.
pub struct Service {
    child: Child,
    pub pid: u32,
    pub http_addr: SocketAddr,
    pub http: String,
    pub metrics: String,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn collect_lines(
    pipe: impl std::io::Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if std::env::var("TEST_LOG").is_ok() {
                println!("{line}");
            }
            into.lock().unwrap().push(line);
        }
    })
}

impl Service {
    /// Starts the binary with exactly these `KV_*` settings (plus loopback port 0 for both
    /// listeners unless given) and waits for its "listening" line.
    pub async fn start(vars: &[(&str, &str)]) -> Service {
        let mut cmd = Command::new(BIN);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KV_")) {
            cmd.env_remove(k);
        }
        cmd.env("KV_LISTEN_ADDR", "127.0.0.1:0")
            .env("KV_METRICS_ADDR", "127.0.0.1:0");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvstore");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        collect_lines(child.stdout.take().unwrap(), stdout.clone());
        collect_lines(child.stderr.take().unwrap(), stderr.clone());
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(20);
        let (http_addr, metrics) = loop {
            let found = stdout.lock().unwrap().iter().find_map(|l| {
                let rec: serde_json::Value = serde_json::from_str(l).ok()?;
                (rec["msg"] == "listening").then(|| {
                    (
                        rec["http_addr"].as_str().unwrap().to_string(),
                        rec["metrics_addr"].as_str().unwrap().to_string(),
                    )
                })
            });
            if let Some(f) = found {
                break f;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "kvstore exited ({st}) before listening: {:?}",
                    stderr.lock().unwrap()
                );
            }
            assert!(Instant::now() < deadline, "no \"listening\" line in 20 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let http_addr: SocketAddr = http_addr.parse().unwrap();
        Service {
            child,
            pid,
            http_addr,
            http: format!("http://{http_addr}"),
            metrics: format!("http://{metrics}"),
            stdout,
            stderr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.http)
    }

    /// Waits until `/readyz` answers 200; returns how long that took.
    pub async fn wait_ready(&self, within: Duration) -> Duration {
        wait_ready_at(&self.http, within).await
    }

    /// `kill -9`, and reap the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: &str) {
        signal(self.pid, sig);
    }

    /// Waits for the process to exit, at most `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    pub fn open_fds(&self) -> usize {
        open_fds(self.pid)
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Lets the log reader threads catch up with what the process has written.
    pub async fn settle_logs(&self) {
        let mut last = usize::MAX;
        for _ in 0..50 {
            let n = self.stdout.lock().unwrap().len() + self.stderr.lock().unwrap().len();
            if n == last {
                return;
            }
            last = n;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn wait_ready_at(base: &str, within: Duration) -> Duration {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < within,
            "{base} did not become ready within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// A private database server
// ---------------------------------------------------------------------------------------

/// A MariaDB/MySQL server of this test alone, in a temp dir, on a fixed loopback port, so it
/// can be killed and started again on the same data. Killed and removed on drop.
pub struct PrivateDb {
    dir: PathBuf,
    pub port: u16,
    server: String,
    child: Option<Child>,
    paused: bool,
    /// Server options beyond the defaults (e.g. TLS), kept for restarts.
    extra_args: Vec<String>,
}

impl PrivateDb {
    pub async fn start() -> PrivateDb {
        PrivateDb::start_with(&[]).await
    }

    /// Starts a server with `extra_args` added to its command line.
    pub async fn start_with(extra_args: &[String]) -> PrivateDb {
        let server = which(&["mariadbd", "mysqld"]);
        let install = which(&["mariadb-install-db", "mysql_install_db"]);
        let (Some(server), Some(install)) = (server, install) else {
            panic!(
                "the database fault tests need a MariaDB server binary: \
                 install one with apt-get install -y mariadb-server"
            );
        };
        let dir = tempfile::Builder::new()
            .prefix("kvstore-faults-db.")
            .tempdir()
            .unwrap()
            .keep();
        // Removes the server and its files even if this test process dies without unwinding.
        let d = dir.display();
        let watchdog = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 0.5; done; \
             if [ -f {d}/pid ]; then kill -9 $(cat {d}/pid) 2>/dev/null; fi; rm -rf {d}",
            parent = std::process::id()
        );
        #[allow(clippy::zombie_processes)]
        Command::new("sh")
            .args(["-c", &watchdog])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn watchdog");
        let datadir = dir.join("data");
        tokio::task::spawn_blocking(move || install_datadir(&install, &datadir))
            .await
            .unwrap();
        let mut db = PrivateDb {
            dir,
            port: crate::common::free_port(),
            server,
            child: None,
            paused: false,
            extra_args: extra_args.to_vec(),
        };
        db.spawn_server();
        db.wait_accepting(Duration::from_secs(30)).await;
        db
    }

    fn spawn_server(&mut self) {
        let d = self.dir.display();
        let mut cmd = Command::new(&self.server);
        cmd.args([
            "--no-defaults".to_string(),
            format!("--datadir={d}/data"),
            format!("--socket={d}/sock"),
            format!("--port={}", self.port),
            "--bind-address=127.0.0.1".into(),
            format!("--pid-file={d}/pid"),
            format!("--log-error={d}/error.log"),
            "--skip-name-resolve".into(),
            "--innodb-buffer-pool-size=64M".into(),
            "--max-connections=500".into(),
        ]);
        cmd.args(&self.extra_args);
        if is_root() {
            cmd.arg("--user=root");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mariadbd");
        self.child = Some(child);
    }

    pub fn base_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    /// Creates a database and returns the service URL for it.
    pub async fn create_database(&self, name: &str) -> String {
        let mut c = self.admin().await;
        use mysql_async::prelude::Queryable;
        c.query_drop(format!("CREATE DATABASE `{name}`"))
            .await
            .unwrap();
        let _ = c.disconnect().await;
        format!("{}/{name}?prefer_socket=false", self.base_url())
    }

    pub async fn admin(&self) -> mysql_async::Conn {
        let opts =
            mysql_async::Opts::from_url(&format!("{}/?prefer_socket=false", self.base_url()))
                .unwrap();
        mysql_async::Conn::new(opts).await.unwrap()
    }

    /// Waits until the server completes a connection handshake; returns how long it took.
    pub async fn wait_accepting(&self, within: Duration) -> Duration {
        let start = Instant::now();
        let opts =
            mysql_async::Opts::from_url(&format!("{}/?prefer_socket=false", self.base_url()))
                .unwrap();
        loop {
            let attempt =
                tokio::time::timeout(Duration::from_secs(2), mysql_async::Conn::new(opts.clone()))
                    .await;
            if let Ok(Ok(c)) = attempt {
                let _ = c.disconnect().await;
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "the private database did not accept connections within {within:?}; see {}/error.log",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9` the server (no shutdown, no flush: a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same data directory and port (crash recovery).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill9");
        self.spawn_server();
    }

    /// SIGSTOP: the server hangs, its sockets stay open. `kill` returns before the kernel has
    /// stopped every thread, so this waits until each one shows state `T`: a query sent in that
    /// gap would still be answered.
    pub fn pause(&mut self) {
        let pid = self.child.as_ref().unwrap().id();
        signal(pid, "STOP");
        self.paused = true;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !all_threads_stopped(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "database threads still running 10 s after SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        signal(self.child.as_ref().unwrap().id(), "CONT");
        self.paused = false;
    }
}

impl Drop for PrivateDb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.paused {
                let _ = Command::new("kill")
                    .args(["-CONT", &c.id().to_string()])
                    .status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// A slow database link
// ---------------------------------------------------------------------------------------

/// A TCP proxy that delays every chunk the database sends by `delay`: each round trip to
/// the database takes at least that long, so a small pool saturates under load.
pub struct SlowLink {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl SlowLink {
    pub async fn start(upstream: SocketAddr, delay: Duration) -> SlowLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if sw.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    tokio::time::sleep(delay).await;
                                    if cw.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        SlowLink { addr, task }
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Requests, as measured from the client side
// ---------------------------------------------------------------------------------------

/// One request as a client saw it.
#[derive(Debug, Clone)]
pub struct Rec {
    pub kind: &'static str,
    pub key: String,
    pub start: Instant,
    pub end: Instant,
    /// `Err` holds the transport error (refused, reset, client timeout).
    pub status: Result<u16, String>,
    pub cache_status: Option<String>,
    pub retry_after: bool,
    pub body: String,
}

impl Rec {
    pub fn took(&self) -> Duration {
        self.end - self.start
    }

    pub fn ok(&self) -> bool {
        matches!(self.status, Ok(s) if (200..300).contains(&s))
    }
}

/// Sends a request and records it (the body is read in full; transport errors recorded).
pub async fn record(kind: &'static str, key: &str, req: reqwest::RequestBuilder) -> Rec {
    let start = Instant::now();
    let (status, cache_status, retry_after, body) = match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let cs = r
                .headers()
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let ra = r.headers().contains_key("retry-after");
            match r.text().await {
                Ok(body) => (Ok(status), cs, ra, body),
                Err(e) => (Err(format!("body: {e}")), cs, ra, String::new()),
            }
        }
        Err(e) => (Err(error_chain(&e)), None, false, String::new()),
    };
    Rec {
        kind,
        key: key.to_string(),
        start,
        end: Instant::now(),
        status,
        cache_status,
        retry_after,
        body,
    }
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The `p`-th percentile (0..=100) of `durations` (nearest rank).
pub fn percentile(durations: &[Duration], p: f64) -> Duration {
    assert!(!durations.is_empty());
    let mut v = durations.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Prints a measured figure so it shows with `--nocapture` (and in the failure output).
pub fn report(test: &str, line: impl AsRef<str>) {
    println!("[faults::{test}] {}", line.as_ref());
}

/// `writes_total` from `/v1/stats`.
pub async fn writes_total(base: &str) -> u64 {
    let v: serde_json::Value = reqwest::get(format!("{base}/v1/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["writes_total"].as_u64().unwrap()
}
