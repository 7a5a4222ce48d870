//! Bearer-token auth: on writes when tokens are configured, on reads too with
//! `KV_AUTH_READS=true`. Tokens are compared in constant time and never logged.

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
    let given = req.header(header::AUTHORIZATION).and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let Some(given) = given else {
        return Err(ApiError::Unauthorized { token_given: false });
    };
    // Compare against every token, without stopping at the first match.
    let mut ok = subtle::Choice::from(0);
    for token in &config.api_tokens {
        ok |= given.as_bytes().ct_eq(token.expose().as_bytes());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized { token_given: true })
    }
}
