//! Bearer-token auth on writes (and reads with KV_AUTH_READS).

use serde_json::json;

use crate::common::*;

const T1: &str = "token-one-0123456789";
const T2: &str = "token-two-abcdefghij";

#[tokio::test]
async fn writes_are_open_without_tokens_and_a_warning_is_logged() {
    let (app, _db) = spawn_app(&[]).await;
    assert_eq!(app.put_value("open", json!(1)).await.status(), 201);
    assert!(app
        .logs
        .lines()
        .iter()
        .any(|l| l.contains("no API token configured")));
}

#[tokio::test]
async fn writes_need_a_valid_token() {
    let tokens = format!("{T1},{T2}");
    let (app, _db) = spawn_app(&[("KV_API_TOKENS", &tokens)]).await;
    let r = app.put_value("k", json!(1)).await;
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"kvstore\"");
    assert_problem(r, 401, "unauthorized").await;
    let r = app
        .client
        .put(app.url("/v1/keys/k"))
        .bearer_auth("wrong-token-xxxxxxxx")
        .json(&json!({"value": 1}))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    assert_problem(r, 401, "unauthorized").await;
    let r = app
        .client
        .put(app.url("/v1/keys/k"))
        .header("authorization", format!("Basic {T1}"))
        .json(&json!({"value": 1}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 401, "unauthorized").await;
    let r = app
        .client
        .post(app.url("/v1/keys"))
        .json(&json!({"key": "k", "value": 1}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 401, "unauthorized").await;
    assert_problem(app.delete("Homer").await, 401, "unauthorized").await;
    assert_eq!(
        app.get("/v1/keys/k").await.status(),
        404,
        "refused writes wrote nothing"
    );
    // Either token works (created, then replaced); reads stay open; probes and metrics
    // never need one; with tokens there is no "no token" warning.
    for (t, status) in [(T1, 201), (T2, 200)] {
        let r = app
            .client
            .put(app.url("/v1/keys/k"))
            .bearer_auth(t)
            .json(&json!({"value": t}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
    }
    assert!(!app
        .logs
        .lines()
        .iter()
        .any(|l| l.contains("no API token configured")));
    let r = app
        .client
        .delete(app.url("/v1/keys/k"))
        .bearer_auth(T1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(app.get("/v1/keys/Homer").await.status(), 200);
    assert_eq!(app.get("/v1/keys?limit=1").await.status(), 200);
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);
    assert!(app.metrics_text().await.contains("kvstore_build_info"));
    // Tokens never reach the logs.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    for line in app.logs.lines() {
        assert!(
            !line.contains(T1) && !line.contains(T2),
            "token logged: {line}"
        );
    }
}

#[tokio::test]
async fn reads_need_a_token_with_auth_reads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("# api tokens\n{T1}\n")).unwrap();
    let (app, _db) = spawn_app(&[
        ("KV_API_TOKENS_FILE", file.to_str().unwrap()),
        ("KV_AUTH_READS", "true"),
    ])
    .await;
    for path in ["/v1/keys/Homer", "/v1/keys", "/v1/stats"] {
        let r = app.get(path).await;
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer realm=\"kvstore\"",
            "{path}"
        );
        assert_problem(r, 401, "unauthorized").await;
    }
    let r = app
        .client
        .head(app.url("/v1/keys/Homer"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .get(app.url("/v1/keys/Homer"))
        .bearer_auth(T1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);
    assert!(app.metrics_text().await.contains("kvstore_build_info"));
}

#[tokio::test]
async fn near_misses_and_doubled_credentials_are_refused() {
    let (app, _db) = spawn_app(&[("KV_API_TOKENS", T1)]).await;
    let put = |auth: Vec<String>| {
        let mut req = app.client.put(app.url("/v1/keys/k"));
        for a in auth {
            req = req.header("authorization", a);
        }
        req.json(&json!({"value": 1})).send()
    };
    // Tokens of another length (a prefix, the token plus a byte, empty) and of the same
    // length with one byte changed are all wrong; the digest comparison must not make any
    // of them equal.
    let mut changed = T1.to_owned().into_bytes();
    changed[T1.len() - 1] ^= 1;
    let changed = String::from_utf8(changed).unwrap();
    for wrong in [&T1[..T1.len() - 1], &format!("{T1}x"), &changed] {
        let r = put(vec![format!("Bearer {wrong}")]).await.unwrap();
        assert_problem(r, 401, "unauthorized").await;
    }
    let r = put(vec!["Bearer".into()]).await.unwrap();
    assert_problem(r, 401, "unauthorized").await;
    // Two Authorization headers are a malformed request (RFC 6750 §3.1), whichever of them
    // is right: the service does not pick one.
    for pair in [
        vec![format!("Bearer {T1}"), "Bearer wrong-token-xxxxxxxx".into()],
        vec!["Bearer wrong-token-xxxxxxxx".into(), format!("Bearer {T1}")],
        vec![format!("Bearer {T1}"), format!("Bearer {T1}")],
    ] {
        let r = put(pair).await.unwrap();
        let body = assert_problem(r, 400, "invalid_request").await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("one Authorization header"),
            "{body}"
        );
    }
    assert_eq!(
        app.get("/v1/keys/k").await.status(),
        404,
        "nothing was written"
    );
    let r = put(vec![format!("Bearer {T1}")]).await.unwrap();
    assert_eq!(r.status(), 201);
}
