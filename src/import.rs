//! `kvstore import FILE`: loads a dataset in the seed's format — an array of objects of
//! key → value, or one such object — through the normal write path (validated, counted,
//! logged in the change log so running replicas drop stale cache entries).

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use crate::api::keys::{compact_json, validate_key};
use crate::store::{Precondition, Store, WriteOutcome};

/// Parses the dataset: `[{"k": v, ...}, ...]` or `{"k": v, ...}`. Values are kept as sent.
/// A key given more than once keeps its last value (what writing them in order would leave)
/// and is written once, so the count reported is of keys.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, String> {
    let objects: Vec<BTreeMap<String, Box<RawValue>>> = match text.trim_start().as_bytes().first() {
        Some(b'[') => {
            serde_json::from_str(text).map_err(|e| format!("not a JSON array of objects: {e}"))?
        }
        Some(b'{') => {
            vec![serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?]
        }
        _ => return Err("expected a JSON array of objects or one JSON object".into()),
    };
    let mut out: Vec<(String, String)> = Vec::new();
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for obj in objects {
        for (k, v) in obj {
            validate_key(&k).map_err(|e| format!("key {k:?}: {e}"))?;
            let v =
                compact_json(v.get()).ok_or_else(|| format!("key {k:?}: value nests too deep"))?;
            match at.get(&k) {
                Some(&i) => out[i].1 = v,
                None => {
                    at.insert(k.clone(), out.len());
                    out.push((k, v));
                }
            }
        }
    }
    Ok(out)
}

/// Writes every pair; returns how many keys were written.
pub async fn run(
    store: &Store,
    pairs: &[(String, String)],
    max_value_bytes: usize,
) -> Result<usize, String> {
    for (k, v) in pairs {
        if v.len() > max_value_bytes {
            return Err(format!(
                "key {k:?}: value is {} bytes, over KV_MAX_VALUE_BYTES",
                v.len()
            ));
        }
    }
    let mut written = 0;
    for (k, v) in pairs {
        match store.upsert(k, v, None, &Precondition::NONE).await {
            Ok(WriteOutcome::Created(_) | WriteOutcome::Replaced(_)) => written += 1,
            Ok(other) => return Err(format!("key {k:?}: unexpected outcome {other:?}")),
            Err(e) => return Err(format!("key {k:?}: {e} ({written} keys written before)")),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_format() {
        let pairs =
            parse("[\n {\"Homer\": \"Simpson\", \"n\": [1, 2]},\n {\"x\": {\"b\":1,\"a\":2}}\n]")
                .unwrap();
        assert_eq!(
            pairs,
            vec![
                ("Homer".into(), "\"Simpson\"".into()),
                ("n".into(), "[1,2]".into()),
                ("x".into(), "{\"b\":1,\"a\":2}".into()),
            ]
        );
        assert_eq!(
            parse("{\"a\": null}").unwrap(),
            vec![("a".into(), "null".into())]
        );
        // A key given again keeps its last value, in its first place, and is written once.
        assert_eq!(
            parse("[{\"a\": 1, \"b\": 2}, {\"a\": 3}, {\"c\": 4, \"b\": 5}]").unwrap(),
            vec![
                ("a".into(), "3".into()),
                ("b".into(), "5".into()),
                ("c".into(), "4".into()),
            ]
        );
        assert!(parse("42").is_err());
        assert!(parse("[{\"\": 1}]").is_err());
        assert!(parse("[1]").is_err());
    }
}
