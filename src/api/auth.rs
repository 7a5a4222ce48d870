//! Bearer-token auth: on writes when tokens are configured, on reads too with
//! `KV_AUTH_READS=true`. Tokens are compared in constant time and never logged.
//!
//! The comparison is of SHA-256 digests, not of the tokens themselves: `subtle`'s slice
//! comparison is constant-time only between slices of one length and returns at once on a
//! different one, which would tell a patient attacker how long a token is. Digests are always
//! 32 bytes (the configured tokens' are made once, at start: `config::ApiToken`), so the time
//! taken depends only on the number of tokens and the length of what the client sent, never
//! on how close it came.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use warp::http::header;

use super::Req;
use crate::config::Config;
use crate::error::ApiError;

pub fn check_write(config: &Config, req: &Req) -> Result<(), ApiError> {
    check(config, req)
}

pub fn check_read(config: &Config, req: &Req) -> Result<(), ApiError> {
    if config.auth_reads {
        check(config, req)
    } else {
        Ok(())
    }
}

fn check(config: &Config, req: &Req) -> Result<(), ApiError> {
    if !config.auth_enabled() {
        return Ok(());
    }
    // RFC 6750 §3.1: a request that offers more than one credential is malformed (400), not
    // merely unauthenticated; using the first or the last would be a guess.
    if req
        .headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(ApiError::InvalidRequest(
            "send one Authorization header, not several".into(),
        ));
    }
    let given = req.header(header::AUTHORIZATION).and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let Some(given) = given else {
        return Err(ApiError::Unauthorized { token_given: false });
    };
    // Compare against every token, without stopping at the first match.
    let given = Sha256::digest(given.as_bytes());
    let mut ok = subtle::Choice::from(0);
    for token in &config.api_tokens {
        ok |= given.as_slice().ct_eq(token.digest());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized { token_given: true })
    }
}
