//! TLS to the database with a private CA (`KV_DATABASE_CA_FILE`), against a private MariaDB
//! that serves a certificate of a CA made here (openssl), for a user that `REQUIRE SSL`, so
//! the service can only get in over verified TLS:
//! - with the issuing CA, the service becomes ready and reads and writes;
//! - without `KV_DATABASE_CA_FILE` (no TLS) the server turns it away, which shows the first
//!   case was not passing over plain TCP;
//! - with another CA, the handshake fails on the certificate, and the log says so.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use serde_json::json;

use crate::support::*;

/// Runs openssl with `args` in `dir`; a missing openssl fails the test with what to install.
fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): apt-get install -y openssl"));
    assert!(st.success(), "openssl {args:?} failed");
}

/// A CA (`NAME.pem`, `NAME.key`) with P-256 keys, valid for two days.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A server certificate for 127.0.0.1 issued by CA `ca` (`server.pem`, `server.key`).
fn make_server_cert(dir: &Path, ca: &str) {
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
}

/// Starts the service with `vars`, checks that it does not become ready within 3 s and that
/// its log says why (`expect`); returns the log.
async fn never_ready(vars: &[(&str, &str)], expect: &str) -> String {
    let svc = Service::start(vars).await;
    assert!(
        !becomes_ready(&svc, Duration::from_secs(3)).await,
        "ready although the database should refuse it ({expect})"
    );
    svc.settle_logs().await;
    let logs = svc.stdout_lines().join("\n");
    assert!(logs.contains(expect), "no {expect:?} in the log:\n{logs}");
    logs
}

/// Whether `/readyz` answers 200 at some point within `within`.
async fn becomes_ready(svc: &Service, within: Duration) -> bool {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = client.get(svc.url("/readyz")).send().await {
            if r.status() == 200 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_tls_with_a_private_ca() {
    let _serial = serial().await;
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    make_ca(d, "ca");
    make_ca(d, "other-ca");
    make_server_cert(d, "ca");
    let path = |f: &str| d.join(f).to_str().unwrap().to_owned();
    let db = PrivateDb::start_with(&[
        format!("--ssl-ca={}", path("ca.pem")),
        format!("--ssl-cert={}", path("server.pem")),
        format!("--ssl-key={}", path("server.key")),
    ])
    .await;
    let mut admin = db.admin().await;
    for sql in [
        "CREATE DATABASE kvtls",
        "CREATE USER 'kvtls'@'%' IDENTIFIED BY 'tls-pass-123' REQUIRE SSL",
        "GRANT ALL ON kvtls.* TO 'kvtls'@'%'",
    ] {
        admin.query_drop(sql).await.unwrap();
    }
    let have_ssl: Option<String> = admin.query_first("SELECT @@have_ssl").await.unwrap();
    assert_eq!(
        have_ssl.as_deref(),
        Some("YES"),
        "the server did not enable TLS"
    );
    let url = format!("mysql://kvtls:tls-pass-123@127.0.0.1:{}/kvtls", db.port);
    let base = [
        ("KV_DATABASE_URL", url.as_str()),
        ("KV_DB_CONNECT_TIMEOUT", "1s"),
        ("KV_SHUTDOWN_DELAY", "0s"),
    ];

    // The issuing CA: ready, and the data path works.
    let ca = path("ca.pem");
    let mut vars = base.to_vec();
    vars.push(("KV_DATABASE_CA_FILE", &ca));
    let svc = Service::start(&vars).await;
    svc.wait_ready(Duration::from_secs(20)).await;
    let client = reqwest::Client::new();
    let r = client
        .put(svc.url("/v1/keys/over-tls"))
        .json(&json!({"value": "encrypted"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = client
        .get(svc.url("/v1/keys/over-tls"))
        .header("cache-control", "no-cache")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    svc.settle_logs().await;
    let started = svc
        .stdout_lines()
        .into_iter()
        .find(|l| l.contains("\"msg\":\"starting\""))
        .expect("a starting line");
    assert!(started.contains("\"database_tls\":true"), "{started}");
    drop(svc);
    let ssl_accepts: Option<(String, u64)> = admin
        .query_first("SHOW GLOBAL STATUS LIKE 'Ssl_accepts'")
        .await
        .unwrap();
    assert!(
        ssl_accepts.is_some_and(|(_, n)| n > 0),
        "no TLS handshake reached the server"
    );

    // No TLS: the user's REQUIRE SSL turns the service away (MariaDB answers "Access
    // denied" to a plain-TCP login of such a user).
    let logs = never_ready(&base, "Access denied for user 'kvtls'").await;
    assert!(!logs.contains("tls-pass-123"), "the password was logged");

    // Another CA: the server's certificate is not trusted.
    let other = path("other-ca.pem");
    let mut vars = base.to_vec();
    vars.push(("KV_DATABASE_CA_FILE", &other));
    let logs = never_ready(&vars, "invalid peer certificate: UnknownIssuer").await;
    assert!(!logs.contains("tls-pass-123"), "the password was logged");
    let _ = admin.disconnect().await;
}
