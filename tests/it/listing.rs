//! `GET /v1/keys`: byte order, pages, cursors, Link, expiry.

use std::collections::BTreeSet;

use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::common::*;

/// The keys of a listing page, in order.
fn keys_of(page: &Value) -> Vec<&str> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect()
}

async fn walk(app: &TestApp, first: &str) -> (Vec<String>, usize) {
    let mut keys = Vec::new();
    let mut url = first.to_string();
    let mut pages = 0;
    loop {
        let r = app.get(&url).await;
        assert_eq!(r.status(), 200, "{url}");
        let link = r
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_string());
        let page: Value = r.json().await.unwrap();
        pages += 1;
        let items = page["items"].as_array().unwrap();
        for it in items {
            keys.push(it["key"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            None => {
                assert!(link.is_none(), "no Link on the last page");
                return (keys, pages);
            }
            Some(c) => {
                assert!(!items.is_empty(), "only the last page may be empty");
                let link = link.expect("Link header when there is a next page");
                assert!(link.ends_with("rel=\"next\""), "{link}");
                let target = link
                    .trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_string();
                assert!(target.contains(c), "{link}");
                url = target;
            }
        }
    }
}

#[tokio::test]
async fn pages_never_skip_or_repeat() {
    let (app, _db) = spawn_app(&[]).await;
    let mut expected = BTreeSet::new();
    for i in 0..23 {
        let k = format!("p/{i:03}");
        app.put_value(&k, json!(i)).await;
        expected.insert(k);
    }
    for k in ["p", "q/1", "o/9", "p0"] {
        app.put_value(k, json!(0)).await;
    }
    let (keys, pages) = walk(&app, "/v1/keys?prefix=p/&limit=5").await;
    assert_eq!(pages, 5);
    assert_eq!(keys, expected.iter().cloned().collect::<Vec<_>>());
    // An exactly full last page: 10 keys with limit 5 is 2 pages, no empty third one.
    let (keys, pages) = walk(&app, "/v1/keys?prefix=p/01&limit=5").await;
    assert_eq!(keys.len(), 10);
    assert_eq!(pages, 2);
    // Whole listing in byte order, including the seed.
    let (all, _) = walk(&app, "/v1/keys?limit=4").await;
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(all, sorted);
    assert_eq!(all.len(), 23 + 4 + 3);
    assert!(all.contains(&"Homer".to_string()));
}

#[tokio::test]
async fn pages_stop_after_4_mib_of_keys_and_values() {
    let (app, _db) = spawn_app(&[]).await;
    // Six values of 1 MB: the first page takes entries until 4 MiB are reached (five), the
    // second the last one; nothing is skipped or repeated, and no page is empty.
    let big = "x".repeat(1_000_000);
    for i in 0..6 {
        assert_eq!(
            app.put_value(&format!("big/{i}"), json!(big))
                .await
                .status(),
            201
        );
    }
    let mut sizes = Vec::new();
    let mut keys = Vec::new();
    let mut url = "/v1/keys?prefix=big/&limit=1000".to_string();
    loop {
        let page: Value = app.get(&url).await.json().await.unwrap();
        let items = page["items"].as_array().unwrap();
        sizes.push(items.len());
        keys.extend(items.iter().map(|i| i["key"].as_str().unwrap().to_string()));
        assert!(items
            .iter()
            .all(|i| i["value"].as_str() == Some(big.as_str())));
        match page["next_cursor"].as_str() {
            Some(c) => url = format!("/v1/keys?cursor={c}&limit=1000"),
            None => break,
        }
    }
    assert_eq!(sizes, vec![5, 1]);
    assert_eq!(keys, (0..6).map(|i| format!("big/{i}")).collect::<Vec<_>>());
    // A smaller limit still applies.
    let page: Value = app
        .get("/v1/keys?prefix=big/&limit=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert!(page["next_cursor"].is_string());
}

#[tokio::test]
async fn pages_hold_100_entries_unless_asked_otherwise() {
    let (app, _db) = spawn_app(&[]).await;
    for chunk in (0..101).collect::<Vec<u32>>().chunks(25) {
        join_all(chunk.iter().map(|i| {
            let app = &app;
            async move { app.put_value(&format!("d/{i:03}"), json!(i)).await }
        }))
        .await;
    }
    let r = app.get("/v1/keys?prefix=d/").await;
    assert_eq!(r.status(), 200);
    let link = r.headers()["link"].to_str().unwrap().to_string();
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 100);
    assert_eq!(page["items"][99]["key"], "d/099");
    let c = page["next_cursor"].as_str().expect("a next page");
    assert!(link.contains(c) && link.ends_with("rel=\"next\""), "{link}");
    let last: Value = app
        .get(&format!("/v1/keys?cursor={c}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(last["items"].as_array().unwrap().len(), 1);
    assert_eq!(last["items"][0]["key"], "d/100");
    assert_eq!(last["next_cursor"], Value::Null);
    // 1..=1000 is the range of `limit`.
    assert_eq!(app.get("/v1/keys?prefix=d/&limit=1000").await.status(), 200);
    for bad in ["0", "1001", "-1", "ten", ""] {
        assert_problem(
            app.get(&format!("/v1/keys?limit={bad}")).await,
            400,
            "invalid_request",
        )
        .await;
    }
}

#[tokio::test]
async fn byte_order_and_unicode_prefixes() {
    let (app, _db) = spawn_app(&[]).await;
    for k in ["b", "B", "a", "é", "z", "%C3%A9t%C3%A9", "a%2Fb"] {
        app.put_value(k, json!(1)).await;
    }
    let page: Value = app.get("/v1/keys?limit=100").await.json().await.unwrap();
    let keys = keys_of(&page);
    assert_eq!(
        keys,
        vec!["B", "Homer", "Jeffrey", "Stan", "a", "a/b", "b", "z", "é", "été"]
    );
    let page: Value = app
        .get("/v1/keys?prefix=%C3%A9")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["next_cursor"], Value::Null);
    let page: Value = app
        .get("/v1/keys?prefix=nothing-here")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page, json!({"items": [], "next_cursor": null}));
}

#[tokio::test]
async fn keys_present_for_the_whole_walk_appear_once_despite_concurrent_changes() {
    let (app, _db) = spawn_app(&[]).await;
    for i in 0..30 {
        app.put_value(&format!("w/{i:02}"), json!(i)).await;
    }
    let mut url = "/v1/keys?prefix=w/&limit=4".to_string();
    let mut seen = Vec::new();
    let mut round = 0;
    loop {
        let page: Value = app.get(&url).await.json().await.unwrap();
        seen.extend(keys_of(&page).into_iter().map(String::from));
        // Between pages: add keys before and after the cursor, delete the one added before,
        // rewrite an original key.
        app.put_value(&format!("w/{:02}x", round), json!("new"))
            .await;
        if round > 0 {
            assert_eq!(
                app.delete(&format!("w/{:02}x", round - 1)).await.status(),
                204
            );
        }
        app.put_value(&format!("w/{:02}", round * 2 + 1), json!("rewritten"))
            .await;
        round += 1;
        match page["next_cursor"].as_str() {
            Some(c) => url = format!("/v1/keys?cursor={c}&limit=4"),
            None => break,
        }
    }
    for i in 0..30 {
        let k = format!("w/{i:02}");
        assert_eq!(
            seen.iter().filter(|s| **s == k).count(),
            1,
            "{k} in {seen:?}"
        );
    }
    let unique: BTreeSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no key repeated");
}

#[tokio::test]
async fn cursors_carry_the_prefix_and_reject_garbage() {
    let (app, _db) = spawn_app(&[]).await;
    for i in 0..3 {
        app.put_value(&format!("c/{i}"), json!(i)).await;
    }
    let page: Value = app
        .get("/v1/keys?prefix=c/&limit=1")
        .await
        .json()
        .await
        .unwrap();
    let c = page["next_cursor"].as_str().unwrap().to_string();
    // The cursor alone continues inside the prefix.
    let next: Value = app
        .get(&format!("/v1/keys?cursor={c}&limit=10"))
        .await
        .json()
        .await
        .unwrap();
    let keys = keys_of(&next);
    assert_eq!(keys, vec!["c/1", "c/2"]);
    assert_eq!(
        app.get(&format!("/v1/keys?cursor={c}&prefix=c/"))
            .await
            .status(),
        200
    );
    assert_problem(
        app.get(&format!("/v1/keys?cursor={c}&prefix=other")).await,
        400,
        "invalid_request",
    )
    .await;
    // A prefix is refused as a key would be: no replacement of invalid UTF-8, no literal
    // '%', no control character (no key has one); `+` is a space, `%2B` a plus.
    app.put_value("\u{fffd}x", json!(1)).await;
    app.put_value("%25G1x", json!(1)).await; // the key "%G1x"
    for bad in ["%FF", "%C3", "%G1", "100%", "a%00", "a%1Fb", "%7F"] {
        assert_problem(
            app.get(&format!("/v1/keys?prefix={bad}")).await,
            400,
            "invalid_request",
        )
        .await;
    }
    app.put_value("c d", json!(1)).await;
    app.put_value("c+d", json!(1)).await;
    for (prefix, key) in [("c+d", "c d"), ("c%2Bd", "c+d"), ("%25G1", "%G1x")] {
        let page: Value = app
            .get(&format!("/v1/keys?prefix={prefix}"))
            .await
            .json()
            .await
            .unwrap();
        let keys = keys_of(&page);
        assert_eq!(keys, vec![key], "prefix={prefix}");
    }
    for bad in ["garbage", "eyJ4IjoxfQ", "%FF", "AAAA"] {
        assert_problem(
            app.get(&format!("/v1/keys?cursor={bad}")).await,
            400,
            "invalid_request",
        )
        .await;
    }
}

#[tokio::test]
async fn expired_entries_are_never_listed() {
    let (app, _db) = spawn_app(&[]).await;
    app.put("e/short", json!({"value": 1, "ttl_seconds": 1}))
        .await;
    app.put_value("e/long", json!(2)).await;
    let page: Value = app.get("/v1/keys?prefix=e/").await.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let page: Value = app.get("/v1/keys?prefix=e/").await.json().await.unwrap();
    let keys = keys_of(&page);
    assert_eq!(keys, vec!["e/long"]);
}
