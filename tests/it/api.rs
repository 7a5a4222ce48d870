//! The endpoints, status codes, limits and errors of API.md.

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn seeded_keys_are_served() {
    let (app, _db) = spawn_app(&[]).await;
    for (k, v) in [
        ("Homer", "Simpson"),
        ("Jeffrey", "Lebowski"),
        ("Stan", "Smith"),
    ] {
        let r = app.get(&format!("/v1/keys/{k}")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        for h in ["etag", "last-modified", "cache-status", "x-request-id"] {
            assert!(r.headers().contains_key(h), "missing {h}");
        }
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["key"], k);
        assert_eq!(e["value"], v);
        assert_eq!(e["version"], 1);
        assert_eq!(e["expires_at"], Value::Null);
        let created = e["created_at"].as_str().unwrap();
        // RFC 3339, UTC, microseconds: 2026-11-22T19:54:48.123456Z
        assert_eq!(created.len(), 27, "{created}");
        assert!(created.ends_with('Z') && created.as_bytes()[19] == b'.');
    }
}

#[tokio::test]
async fn put_creates_then_replaces() {
    let (app, _db) = spawn_app(&[]).await;
    let r = app.put_value("color", json!("blue")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"], "/v1/keys/color");
    let etag1 = r.headers()["etag"].to_str().unwrap().to_string();
    let e1: Value = r.json().await.unwrap();
    assert_eq!(
        (
            e1["key"].clone(),
            e1["value"].clone(),
            e1["version"].clone()
        ),
        (json!("color"), json!("blue"), json!(1))
    );
    assert_eq!(e1["created_at"], e1["updated_at"]);

    let r = app.put_value("color", json!("red")).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("location").is_none());
    let etag2 = r.headers()["etag"].to_str().unwrap().to_string();
    assert_ne!(etag1, etag2);
    let e2: Value = r.json().await.unwrap();
    assert_eq!(e2["version"], 2);
    assert_eq!(e2["value"], "red");
    assert_eq!(e2["created_at"], e1["created_at"]);
    assert!(e2["updated_at"].as_str() > e1["updated_at"].as_str());

    let got: Value = app.get("/v1/keys/color").await.json().await.unwrap();
    assert_eq!(got, e2);
}

#[tokio::test]
async fn post_upserts_and_validates() {
    let (app, _db) = spawn_app(&[]).await;
    // Content-Type is ignored: the body is read as JSON whatever it says.
    let r = app
        .client
        .post(app.url("/v1/keys"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"key":"a","value":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"], "/v1/keys/a");
    let r = app
        .client
        .post(app.url("/v1/keys"))
        .json(&json!({"key": "a", "value": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 2);
    let r = app
        .client
        .post(app.url("/v1/keys"))
        .json(&json!({"key": "dir/with space", "value": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"], "/v1/keys/dir/with%20space");
    // Dot segments are escaped: a client resolving `..` (curl does) would otherwise follow
    // the Location somewhere else. Sent raw: reqwest's URL parser resolves `%2E%2E` too.
    let r = app
        .client
        .post(app.url("/v1/keys"))
        .json(&json!({"key": "fresh/..", "value": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(location, "/v1/keys/fresh/%2E%2E");
    let text = raw_exchange(
        &app,
        format!("GET {location} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let (status, _, body, _) = parse_response(&text);
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap()["key"],
        "fresh/.."
    );

    for (body, status, code) in [
        (json!({"value": 1}), 400, "invalid_json"),
        (json!({"key": "a"}), 400, "invalid_json"),
        (
            json!({"key": "a", "value": 1, "extra": true}),
            400,
            "invalid_json",
        ),
        (json!({"key": 5, "value": 1}), 400, "invalid_json"),
        (json!({"key": "", "value": 1}), 400, "invalid_key"),
        (json!({"key": "a\u{0}b", "value": 1}), 400, "invalid_key"),
        (
            json!({"key": "k".repeat(513), "value": 1}),
            400,
            "invalid_key",
        ),
    ] {
        let r = app
            .client
            .post(app.url("/v1/keys"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_problem(r, status, code).await;
    }
    let r = app
        .client
        .post(app.url("/v1/keys?x=1"))
        .json(&json!({"key": "a", "value": 1}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "invalid_request").await;
}

#[tokio::test]
async fn values_are_stored_exactly_as_compact_json() {
    let (app, _db) = spawn_app(&[]).await;
    for (i, raw) in [
        r#""text with \"quotes\" and \u00e9""#,
        "12345678901234567890123456789",
        "1.50",
        "-0.0e10",
        "true",
        "null",
        "[1, [2, {}], \"x\"]",
        "{\"z\": 1, \"a\": {\"nested\": [null]}, \"m\": \"  spaced  \"}",
    ]
    .iter()
    .enumerate()
    {
        let body = format!("{{\"value\":  {raw}  }}");
        let r = app
            .client
            .put(app.url(&format!("/v1/keys/v{i}")))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{raw}");
        let text = app
            .get(&format!("/v1/keys/v{i}"))
            .await
            .text()
            .await
            .unwrap();
        let compact: String = {
            // Expected: the raw text minus whitespace outside strings.
            let mut out = String::new();
            let (mut s, mut esc) = (false, false);
            for c in raw.chars() {
                if s {
                    out.push(c);
                    if esc {
                        esc = false
                    } else if c == '\\' {
                        esc = true
                    } else if c == '"' {
                        s = false
                    }
                } else if c == '"' {
                    s = true;
                    out.push(c)
                } else if !c.is_whitespace() {
                    out.push(c)
                }
            }
            out
        };
        assert!(
            text.contains(&format!("\"value\":{compact},")),
            "{raw} -> {text}"
        );
    }
}

#[tokio::test]
async fn keys_may_contain_slashes_and_are_percent_decoded() {
    let (app, _db) = spawn_app(&[]).await;
    assert_eq!(
        app.put_value("app/config/color", json!("green"))
            .await
            .status(),
        201
    );
    for path in [
        "/v1/keys/app/config/color",
        "/v1/keys/app%2Fconfig%2Fcolor",
        "/v1/keys/app%2fconfig/color",
    ] {
        let r = app.get(path).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap()["key"], "app/config/color");
    }
    assert_eq!(
        app.put_value("caf%C3%A9%20%E2%9C%93", json!(1))
            .await
            .status(),
        201
    );
    let e: Value = app
        .get("/v1/keys/caf%C3%A9%20%E2%9C%93")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(e["key"], "café ✓");
    // SQL metacharacters are just bytes of a key and a value.
    let evil = "x'; DROP TABLE kv_entries; --";
    let enc =
        percent_encoding::utf8_percent_encode(evil, percent_encoding::NON_ALPHANUMERIC).to_string();
    assert_eq!(
        app.put_value(&enc, json!("'; DELETE FROM kv_entries; --"))
            .await
            .status(),
        201
    );
    let e: Value = app
        .get(&format!("/v1/keys/{enc}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(e["key"], evil);
    assert_eq!(e["value"], "'; DELETE FROM kv_entries; --");
    assert_eq!(app.get("/v1/keys/Homer").await.status(), 200);
}

#[tokio::test]
async fn key_limits_are_counted_in_bytes() {
    let (app, _db) = spawn_app(&[]).await;
    let ascii512 = "k".repeat(512);
    assert_eq!(app.put_value(&ascii512, json!(1)).await.status(), 201);
    assert_eq!(app.get(&format!("/v1/keys/{ascii512}")).await.status(), 200);
    // 256 × "é" (2 bytes each) = 512 bytes: accepted; 257 = 514 bytes: refused.
    let e256 = "%C3%A9".repeat(256);
    assert_eq!(app.put_value(&e256, json!(1)).await.status(), 201);
    let e257 = "%C3%A9".repeat(257);
    assert_problem(app.put_value(&e257, json!(1)).await, 400, "invalid_key").await;
    assert_problem(
        app.put_value(&"k".repeat(513), json!(1)).await,
        400,
        "invalid_key",
    )
    .await;
    assert_problem(
        app.get(&format!("/v1/keys/{}", "k".repeat(513))).await,
        400,
        "invalid_key",
    )
    .await;
    for bad in ["a%00b", "a%1Fb", "a%7Fb", "a%0Ab", "%FF%FE", "%C3"] {
        assert_problem(
            app.get(&format!("/v1/keys/{bad}")).await,
            400,
            "invalid_key",
        )
        .await;
        assert_problem(app.put_value(bad, json!(1)).await, 400, "invalid_key").await;
        assert_problem(app.delete(bad).await, 400, "invalid_key").await;
    }
    assert_problem(app.get("/v1/keys/").await, 400, "invalid_key").await;
}

#[tokio::test]
async fn value_limit_and_body_limit() {
    let max = 1000;
    let (app, _db) = spawn_app(&[("KV_MAX_VALUE_BYTES", "1000")]).await;
    // A string value of exactly `max` bytes of JSON (quotes included) is accepted.
    let exact = "x".repeat(max - 2);
    assert_eq!(app.put_value("big", json!(exact)).await.status(), 201);
    let over = "x".repeat(max - 1);
    let doc = assert_problem(
        app.put_value("big", json!(over)).await,
        413,
        "value_too_large",
    )
    .await;
    assert!(doc["detail"].as_str().unwrap().contains("1000"));
    // The stored value is untouched by the refused write.
    let e: Value = app.get("/v1/keys/big").await.json().await.unwrap();
    assert_eq!(e["value"].as_str().unwrap().len(), max - 2);
    assert_eq!(e["version"], 1);
    // Whitespace does not count: the value is measured compact.
    let spaced = format!("{{\"value\": [{}1]}}", "1,      ".repeat(max / 2 - 2));
    assert_eq!(
        app.client
            .put(app.url("/v1/keys/spaced"))
            .body(spaced)
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    // A body far over the limit is refused from its Content-Length, and when chunked.
    let huge = format!("{{\"value\": \"{}\"}}", "y".repeat(10 * 1024 * 1024));
    let r = app
        .client
        .put(app.url("/v1/keys/huge"))
        .body(huge.clone())
        .send()
        .await
        .unwrap();
    assert_problem(r, 413, "value_too_large").await;
    let stream = futures_util::stream::iter(
        huge.into_bytes()
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = app
        .client
        .put(app.url("/v1/keys/huge"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_problem(r, 413, "value_too_large").await;
    assert_problem(app.get("/v1/keys/huge").await, 404, "not_found").await;
}

#[tokio::test]
async fn default_value_limit_is_one_mebibyte() {
    let (app, _db) = spawn_app(&[]).await;
    let exact = "v".repeat(1024 * 1024 - 2);
    assert_eq!(app.put_value("mib", json!(exact)).await.status(), 201);
    let e: Value = app.get("/v1/keys/mib").await.json().await.unwrap();
    assert_eq!(e["value"].as_str().unwrap().len(), 1024 * 1024 - 2);
    assert_problem(
        app.put_value("mib2", json!("v".repeat(1024 * 1024 - 1)))
            .await,
        413,
        "value_too_large",
    )
    .await;
}

#[tokio::test]
async fn bad_json_bodies() {
    let (app, _db) = spawn_app(&[]).await;
    for body in [
        "",
        "not json",
        "{",
        "[]",
        "{\"value\": 1,}",
        "{\"ttl_seconds\": 5}",
        "{\"value\": 1, \"other\": 2}",
        "{\"value\": 1, \"ttl_seconds\": \"5\"}",
        "{\"value\": 1, \"ttl_seconds\": 1.5}",
        "{\"value\": 1, \"ttl_seconds\": -1}",
        "{\"value\": 1, \"ttl_seconds\": 0}",
        "{\"value\": 1, \"ttl_seconds\": 31536001}",
        "{\"value\": \"\u{0}\"}",
    ] {
        let r = app
            .client
            .put(app.url("/v1/keys/j"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, "invalid_json").await;
    }
    // Nesting is limited to 128 levels (a value any client can parse back).
    let nested = |n: usize| format!("{{\"value\": {}{}}}", "[".repeat(n), "]".repeat(n));
    for n in [129, 5000, 400_000] {
        let r = app
            .client
            .put(app.url("/v1/keys/j"))
            .body(nested(n))
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, "invalid_json").await;
    }
    assert_problem(app.get("/v1/keys/j").await, 404, "not_found").await;
    let r = app
        .client
        .put(app.url("/v1/keys/j"))
        .body(nested(128))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = app
        .put("j", json!({"value": 1, "ttl_seconds": 31536000}))
        .await;
    assert_eq!(r.status(), 200);
    let r = app.put("j", json!({"value": 1, "ttl_seconds": 1})).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn delete_then_get_is_404() {
    let (app, _db) = spawn_app(&[]).await;
    app.put_value("gone", json!(1)).await;
    let r = app.delete("gone").await;
    assert_eq!(r.status(), 204);
    assert!(r.bytes().await.unwrap().is_empty());
    assert_problem(app.get("/v1/keys/gone").await, 404, "not_found").await;
    assert_problem(app.delete("gone").await, 404, "not_found").await;
    assert_problem(app.delete("never").await, 404, "not_found").await;
}

#[tokio::test]
async fn query_parameters_are_checked() {
    let (app, _db) = spawn_app(&[]).await;
    assert_problem(app.get("/v1/keys/Homer?x=1").await, 400, "invalid_request").await;
    assert_problem(app.get("/v1/keys?foo=bar").await, 400, "invalid_request").await;
    assert_problem(
        app.get("/v1/keys?limit=10&limit=20").await,
        400,
        "invalid_request",
    )
    .await;
    for bad in ["0", "1001", "-1", "abc", ""] {
        assert_problem(
            app.get(&format!("/v1/keys?limit={bad}")).await,
            400,
            "invalid_request",
        )
        .await;
    }
    assert_eq!(app.get("/v1/keys?limit=1000").await.status(), 200);
    assert_eq!(app.get("/v1/keys?limit=1").await.status(), 200);
    assert_problem(app.get("/v1/stats?verbose=1").await, 400, "invalid_request").await;
    assert_problem(
        app.client
            .delete(app.url("/v1/keys/Homer?force=1"))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_request",
    )
    .await;
    assert_eq!(app.get("/v1/keys/Homer").await.status(), 200);
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let (app, _db) = spawn_app(&[]).await;
    assert_problem(app.get("/nope").await, 404, "not_found").await;
    assert_problem(app.get("/v2/keys/x").await, 404, "not_found").await;
    for (method, path, allow) in [
        ("PATCH", "/v1/keys/x", "GET, HEAD, PUT, DELETE"),
        ("POST", "/v1/keys/x", "GET, HEAD, PUT, DELETE"),
        ("DELETE", "/v1/keys", "GET, HEAD, POST"),
        ("PUT", "/v1/keys", "GET, HEAD, POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/v1/stats", "GET, HEAD"),
    ] {
        let r = app
            .client
            .request(method.parse().unwrap(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        assert_problem(r, 405, "method_not_allowed").await;
    }
}

#[tokio::test]
async fn head_answers_headers_without_body() {
    let (app, _db) = spawn_app(&[]).await;
    let get = app.get("/v1/keys/Homer").await;
    let r = app
        .client
        .head(app.url("/v1/keys/Homer"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], get.headers()["etag"]);
    assert!(r.headers().contains_key("cache-status"));
    assert!(r.bytes().await.unwrap().is_empty());
    let r = app
        .client
        .head(app.url("/v1/keys/missing"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn request_ids() {
    let (app, _db) = spawn_app(&[]).await;
    let r = app
        .client
        .get(app.url("/v1/keys/Homer"))
        .header("x-request-id", "abc-123.X:y_z")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123.X:y_z");
    let r = app
        .client
        .get(app.url("/v1/keys/nope"))
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    let doc = assert_problem(r, 404, "not_found").await;
    assert_eq!(doc["request_id"], "trace-42");
    // Insane ids are replaced.
    for bad in ["has space", "x".repeat(200).as_str(), "quote\"d", ""] {
        let r = app
            .client
            .get(app.url("/healthz"))
            .header("x-request-id", bad)
            .send()
            .await
            .unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        assert!(!id.is_empty() && id != bad && id.len() <= 128);
    }
    let a = app.get("/healthz").await.headers()["x-request-id"].clone();
    let b = app.get("/healthz").await.headers()["x-request-id"].clone();
    assert_ne!(a, b);
    // The access log line carries the id and the route template, never the key.
    app.client
        .get(app.url("/v1/keys/secret-key-name"))
        .header("x-request-id", "find-me")
        .send()
        .await
        .unwrap();
    let rec = access_line(&app, "find-me").await;
    let line = rec.to_string();
    assert_eq!(rec["msg"], "request");
    assert_eq!(rec["route"], "/v1/keys/{key}");
    assert_eq!(rec["method"], "GET");
    assert_eq!(rec["status"], 404);
    assert!(rec["duration_ms"].is_number() && rec["bytes"].is_number());
    assert!(!line.contains("secret-key-name"));
    // The method as sent, also one the metrics fold into OTHER; a HEAD sent no body bytes.
    let r = app
        .client
        .patch(app.url("/v1/keys/Homer"))
        .header("x-request-id", "patch-me")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let rec = access_line(&app, "patch-me").await;
    assert_eq!(
        (rec["method"].as_str(), rec["status"].as_u64()),
        (Some("PATCH"), Some(405))
    );
    for (method, id) in [
        (reqwest::Method::GET, "get-homer"),
        (reqwest::Method::HEAD, "head-homer"),
    ] {
        let r = app
            .client
            .request(method.clone(), app.url("/v1/keys/Homer"))
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let sent = r.bytes().await.unwrap().len() as u64;
        let rec = access_line(&app, id).await;
        assert_eq!(rec["method"], method.as_str());
        assert_eq!(rec["bytes"].as_u64(), Some(sent), "{method}");
        assert_eq!(sent == 0, method == reqwest::Method::HEAD);
    }
}

#[tokio::test]
async fn service_endpoints() {
    let (app, _db) = spawn_app(&[]).await;
    let r = app.get("/healthz").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ok");
    let r = app.get("/readyz").await;
    assert_eq!(r.status(), 200);
    let root: Value = app.get("/").await.json().await.unwrap();
    assert_eq!(root["service"], "kvstore");
    assert_eq!(root["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(root["database"]["reachable"], true);
    let r = app.get("/openapi.json").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/v1/keys/{key}",
        "/v1/keys",
        "/v1/stats",
        "/healthz",
        "/readyz",
        "/",
    ] {
        assert!(doc["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    let stats: Value = app.stats().await;
    assert_eq!(stats["keys"], 3);
    assert_eq!(stats["writes_total"], 0);
    for f in ["cache_hits", "cache_misses", "cache_entries", "cache_bytes"] {
        assert!(stats["instance"][f].is_u64(), "{f}");
    }
}

#[tokio::test]
async fn metrics_use_route_templates_not_keys() {
    let (app, _db) = spawn_app(&[]).await;
    app.get("/v1/keys/my-private-key").await;
    app.put_value("another-private-key", json!(1)).await;
    app.get("/v1/keys/another-private-key").await;
    let text = app.metrics_text().await;
    assert!(!text.contains("private-key"));
    for needle in [
        "kvstore_build_info{revision=",
        "kvstore_http_requests_total{method=\"GET\",route=\"/v1/keys/{key}\",status_class=\"4xx\"} 1",
        "kvstore_http_requests_total{method=\"PUT\",route=\"/v1/keys/{key}\",status_class=\"2xx\"} 1",
        "kvstore_http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/keys/{key}\",status_class=\"2xx\",le=\"0.005\"}",
        "kvstore_cache_hits_total 1",
        "kvstore_cache_misses_total 1",
        "kvstore_cache_capacity_bytes 67108864",
        "kvstore_writes_total{operation=\"upsert\"} 1",
        "kvstore_db_up 1",
        "kvstore_db_pool_connections_max 8",
        "kvstore_db_query_duration_seconds_count{operation=\"upsert\"} 1",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}");
    }
}

/// The metrics port answers like the API: a request id on every response, an access line,
/// and problem documents for what it does not serve.
#[tokio::test]
async fn the_metrics_port_serves_metrics_only_and_refuses_with_problems() {
    let (app, _db) = spawn_app(&[]).await;
    let url = |path: &str| format!("{}{path}", app.metrics_base);
    let r = app
        .client
        .get(url("/metrics"))
        .header("x-request-id", "scrape-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "scrape-1");
    assert_problem(
        app.client.get(url("/other")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    let r = app.client.post(url("/metrics")).send().await.unwrap();
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    assert_problem(r, 405, "method_not_allowed").await;
    assert_problem(
        app.client.get(url("/metrics?x=1")).send().await.unwrap(),
        400,
        "invalid_request",
    )
    .await;
    let line = access_line(&app, "scrape-1").await;
    assert_eq!(
        (line["route"].as_str(), line["status"].as_u64()),
        (Some("/metrics"), Some(200))
    );
}

/// Sends `GET /healthz` on a kept-alive connection and reads one answer; returns its status.
async fn ask(s: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed without an answer");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.parse().unwrap())
                })
                .unwrap();
            if body.len() >= len {
                return head[9..12].parse().unwrap();
            }
        }
    }
}

/// How long until the server closes `s` (reading and dropping whatever it sends).
async fn closed_after(s: &mut tokio::net::TcpStream) -> std::time::Duration {
    use tokio::io::AsyncReadExt;
    let start = std::time::Instant::now();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), s.read_to_end(&mut sink))
        .await
        .expect("the server closes the connection");
    start.elapsed()
}

/// Keep-alive: an answered connection may wait `KV_IDLE_TIMEOUT` for its next request, far
/// longer than `KV_HEADER_READ_TIMEOUT` (so a proxy that keeps idle upstream connections
/// for a minute never sends a request down one being closed); a head that has begun must
/// still be complete within `KV_HEADER_READ_TIMEOUT`; a new connection must send its first
/// request within it too.
#[tokio::test]
async fn idle_keep_alive_connections_wait_the_idle_timeout() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let secs = std::time::Duration::from_secs_f64;
    let (app, _db) =
        spawn_app(&[("KV_HEADER_READ_TIMEOUT", "1s"), ("KV_IDLE_TIMEOUT", "3s")]).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let (mut idle, mut slow_head, mut too_idle, mut silent) = (
        TcpStream::connect(&addr).await.unwrap(),
        TcpStream::connect(&addr).await.unwrap(),
        TcpStream::connect(&addr).await.unwrap(),
        TcpStream::connect(&addr).await.unwrap(),
    );
    for s in [&mut idle, &mut slow_head, &mut too_idle] {
        assert_eq!(ask(s).await, 200);
    }
    let (idle_check, slow_check, too_idle_check, silent_check) = tokio::join!(
        async {
            // Idle past the header timeout, then another request on the same connection.
            tokio::time::sleep(secs(1.8)).await;
            assert_eq!(ask(&mut idle).await, 200, "an idle connection was closed");
        },
        async {
            // Half a head after 0.5 s of idleness, then nothing: closed ≈ 1 s later.
            tokio::time::sleep(secs(0.5)).await;
            slow_head
                .write_all(b"GET /healthz HTTP/1.1\r\n")
                .await
                .unwrap();
            closed_after(&mut slow_head).await
        },
        closed_after(&mut too_idle),
        closed_after(&mut silent),
    );
    let () = idle_check;
    assert!(
        slow_check >= secs(0.9) && slow_check < secs(2.0),
        "a begun head was given {slow_check:?}, not the header timeout"
    );
    assert!(
        too_idle_check >= secs(2.9) && too_idle_check < secs(5.0),
        "an idle connection was closed after {too_idle_check:?}, not the idle timeout"
    );
    assert!(
        silent_check < secs(2.0),
        "a new connection that sends nothing was kept {silent_check:?}"
    );
}

/// `KV_MAX_CONNECTIONS`: at the limit, idle keep-alive connections are closed to make room
/// (one at a time at this limit), so new ones (a kubelet probe, say) get in; when every
/// open connection is busy, the API port stops accepting and a new connection waits (in
/// the listen backlog) until one closes, while the open ones keep being served.
#[tokio::test]
async fn connections_over_the_limit_close_idle_ones_or_wait() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    const LIMIT: usize = 3;
    let (app, _db) = spawn_app(&[
        ("KV_MAX_CONNECTIONS", "3"),
        ("KV_HEADER_READ_TIMEOUT", "30s"),
    ])
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let gauge = |name: &'static str| {
        let app = &app;
        async move {
            let text = app.metrics_text().await;
            let prefix = format!("{name}{{listener=\"api\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("{prefix} in {text}"))
                .parse::<usize>()
                .unwrap()
        }
    };
    assert_eq!(gauge("kvstore_http_connections_max").await, LIMIT);

    // 1. The limit filled with idle connections (the test client may hold one already):
    //    a new connection is served, and one idle connection was closed for it.
    let mut idle = Vec::new();
    while gauge("kvstore_http_connections_open").await < LIMIT {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        assert_eq!(ask(&mut s).await, 200);
        idle.push(s);
        assert!(
            idle.len() <= LIMIT,
            "the open-connection gauge does not count them"
        );
    }
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), ask(&mut extra))
        .await
        .expect("a new connection is served when idle ones can make room");
    assert_eq!(status, 200);
    assert_eq!(gauge("kvstore_http_connections_open").await, LIMIT);
    drop((idle, extra));
    for _ in 0..100 {
        if gauge("kvstore_http_connections_open").await == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(gauge("kvstore_http_connections_open").await, 0);

    // 2. The limit filled with busy connections (each has begun a request head): a new
    //    connection is accepted by the kernel but not served.
    let mut busy = Vec::new();
    for _ in 0..LIMIT {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        busy.push(s);
    }
    for _ in 0..100 {
        if gauge("kvstore_http_connections_open").await == LIMIT {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(gauge("kvstore_http_connections_open").await, LIMIT);
    let mut waiting = TcpStream::connect(&addr).await.unwrap();
    let answer = tokio::spawn(async move { ask(&mut waiting).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !answer.is_finished(),
        "a connection over the limit was served"
    );
    // A busy connection finishes its request and is answered as usual.
    busy[0].write_all(b"Host: x\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut busy[0], &mut head)
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    assert!(app.logs.lines().iter().any(|l| {
        l.contains("connection limit reached and no connection idle")
            && l.contains("\"max_connections\":3")
    }));
    // Closing one lets the waiting one in.
    drop(busy.remove(1));
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), answer)
        .await
        .expect("the waiting connection is served once one closes")
        .unwrap();
    assert_eq!(status, 200);
}

/// Sends `request` as raw bytes and reads until the server closes the connection.
async fn raw_exchange(app: &TestApp, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8(out).unwrap()
}

/// Splits one response off `text`: status, lower-cased headers, body (by Content-Length).
fn parse_response(text: &str) -> (u16, std::collections::HashMap<String, String>, &str, &str) {
    let (head, rest) = text.split_once("\r\n\r\n").expect("a complete head");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers: std::collections::HashMap<String, String> = lines
        .map(|l| l.split_once(": ").unwrap())
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    let len: usize = headers["content-length"].parse().unwrap();
    (status, headers, &rest[..len], &rest[len..])
}

/// The access line of request `id` (waits for the log writer).
async fn access_line(app: &TestApp, id: &str) -> Value {
    for _ in 0..50 {
        let found = app.logs.lines().into_iter().find(|l| {
            l.contains(&format!("\"request_id\":\"{id}\"")) && l.contains("\"msg\":\"request\"")
        });
        if let Some(line) = found {
            return serde_json::from_str(&line).unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no access line for request {id}");
}

/// Requests hyper refuses before routing (not valid HTTP/1.1, a target over 64 KiB, over 100
/// header fields) are answered 400 with a problem document, a request id and `connection:
/// close`, and counted and logged like any other request.
#[tokio::test]
async fn refusals_of_the_http_layer_are_problem_documents() {
    let (app, _db) = spawn_app(&[]).await;
    let long_key = format!(
        "GET /v1/keys/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "k".repeat(70_000)
    );
    let long_other = format!("GET /x{} HTTP/1.1\r\nHost: x\r\n\r\n", "x".repeat(70_000));
    let many_headers = format!(
        "PUT /v1/keys/a HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..120)
            .map(|i| format!("X-H{i}: 1\r\n"))
            .collect::<String>()
    );
    let cases: [(&str, &[u8], &str, &str, &str); 6] = [
        (
            "garbage",
            b"GARBAGE\r\n\r\n",
            "invalid_request",
            "OTHER",
            "unmatched",
        ),
        (
            "bad header line",
            b"GET /v1/keys/a HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n",
            "invalid_request",
            "GET",
            "/v1/keys/{key}",
        ),
        (
            "bad Content-Length",
            b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n",
            "invalid_request",
            "POST",
            "unmatched",
        ),
        (
            "key over 64 KiB",
            long_key.as_bytes(),
            "invalid_key",
            "GET",
            "/v1/keys/{key}",
        ),
        (
            "target over 64 KiB",
            long_other.as_bytes(),
            "invalid_request",
            "GET",
            "unmatched",
        ),
        (
            "120 header fields",
            many_headers.as_bytes(),
            "invalid_request",
            "PUT",
            "/v1/keys/{key}",
        ),
    ];
    for (what, request, code, method, route) in cases {
        let text = raw_exchange(&app, request).await;
        let (status, headers, body, rest) = parse_response(&text);
        assert_eq!(status, 400, "{what}: {text:.300}");
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{what}"
        );
        assert_eq!(headers["connection"], "close", "{what}");
        assert!(rest.is_empty(), "{what}: {rest:.200}");
        let doc: Value = serde_json::from_str(body).unwrap();
        let id = headers["x-request-id"].as_str();
        assert_eq!(doc["code"], code, "{what}: {doc}");
        assert_eq!(
            (doc["status"].as_u64(), doc["request_id"].as_str()),
            (Some(400), Some(id)),
            "{what}"
        );
        assert_eq!(doc["type"], "about:blank");
        assert!(
            doc["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}"
        );
        let line = access_line(&app, id).await;
        assert_eq!(line["status"], 400, "{what}");
        assert_eq!(
            (line["method"].as_str(), line["route"].as_str()),
            (Some(method), Some(route)),
            "{what}"
        );
        assert_eq!(line["bytes"].as_u64(), Some(body.len() as u64), "{what}");
    }
    // A HEAD gets the head alone.
    let text = raw_exchange(
        &app,
        format!("HEAD /v1/keys/{} HTTP/1.1\r\n\r\n", "k".repeat(70_000)).as_bytes(),
    )
    .await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 400 ")
            && head.contains("\r\ncontent-type: application/problem+json\r\n"),
        "{head}"
    );
    assert_eq!(body, "");
    // Pipelined behind a good request: that one is answered, then the refusal, whose own
    // method and target were never read apart from the first request's.
    let text = raw_exchange(
        &app,
        b"GET /v1/keys/Homer HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n",
    )
    .await;
    let (status, _, body, rest) = parse_response(&text);
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap()["value"],
        "Simpson"
    );
    let (status, headers, body, _) = parse_response(rest);
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap()["code"],
        "invalid_request"
    );
    let line = access_line(&app, &headers["x-request-id"]).await;
    assert_eq!(
        (line["method"].as_str(), line["route"].as_str()),
        (Some("OTHER"), Some("unmatched"))
    );
    // Counted with the API's requests; the service still answers.
    let text = app.metrics_text().await;
    for series in [
        r#"kvstore_http_requests_total{method="GET",route="/v1/keys/{key}",status_class="4xx"} 2"#,
        r#"kvstore_http_requests_total{method="OTHER",route="unmatched",status_class="4xx"} 2"#,
        r#"kvstore_http_requests_total{method="PUT",route="/v1/keys/{key}",status_class="4xx"} 1"#,
    ] {
        assert!(text.contains(series), "metrics lack {series}");
    }
    assert_eq!(app.get("/v1/keys/Homer").await.status(), 200);
}

/// A value may not hold a lone UTF-16 surrogate escape (`"\ud800"`): valid JSON grammar, but
/// no Unicode text, and strict parsers could not read the entry (or any listing page with
/// it) back. A proper pair is stored as sent.
#[tokio::test]
async fn values_with_lone_surrogates_are_refused() {
    let (app, _db) = spawn_app(&[]).await;
    for body in [r#"{"value":"\ud800"}"#, r#"{"value":["x","\udc00"]}"#] {
        let r = app
            .client
            .put(app.url("/v1/keys/surrogate"))
            .body(body)
            .send()
            .await
            .unwrap();
        let p = assert_problem(r, 400, "invalid_json").await;
        assert!(p["detail"].as_str().unwrap().contains("surrogate"), "{p}");
    }
    assert_eq!(app.get("/v1/keys/surrogate").await.status(), 404);
    let r = app
        .client
        .put(app.url("/v1/keys/surrogate"))
        .body(r#"{"value":"\ud83d\ude00"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let text = app.get("/v1/keys/surrogate").await.text().await.unwrap();
    assert!(text.contains(r#""value":"\ud83d\ude00""#), "{text}");
}

/// `KV_BODY_MEMORY_BYTES` bounds the request bodies held in memory at once: with room for
/// one body of the largest size, a second write waits while the first is being received,
/// and gets 503 (retryable) after `KV_DB_ACQUIRE_TIMEOUT`; once the first is done, writes
/// go through again.
#[tokio::test]
async fn request_bodies_in_memory_are_bounded() {
    use tokio::io::AsyncWriteExt;
    // KV_MAX_VALUE_BYTES=1000: the largest body is 2 × 1000 + 65 536 bytes.
    let largest = 2 * 1000 + 65_536;
    let (app, _db) = spawn_app(&[
        ("KV_MAX_VALUE_BYTES", "1000"),
        ("KV_BODY_MEMORY_BYTES", &largest.to_string()),
        ("KV_DB_ACQUIRE_TIMEOUT", "500ms"),
    ])
    .await;
    // A write that declares the largest body and sends it slowly.
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = format!(
        "{{\"value\":\"{}\"}}{}",
        "v".repeat(900),
        " ".repeat(largest - 912)
    );
    assert_eq!(body.len(), largest);
    slow.write_all(
        format!("PUT /v1/keys/slow HTTP/1.1\r\nHost: x\r\nContent-Length: {largest}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    slow.write_all(&body.as_bytes()[..100]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let r = app.put_value("other", json!(1)).await;
    let waited = started.elapsed();
    let p = assert_problem(r, 503, "unavailable").await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("KV_BODY_MEMORY_BYTES"),
        "{p}"
    );
    assert!(
        waited >= std::time::Duration::from_millis(450),
        "refused after {waited:?}, without waiting for memory"
    );
    // The slow write completes; then there is room again.
    slow.write_all(&body.as_bytes()[100..]).await.unwrap();
    let mut head = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut slow, &mut head)
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 201");
    assert_eq!(app.put_value("other", json!(1)).await.status(), 201);
}
