//! Timestamps: microseconds since the Unix epoch (UTC) everywhere inside the service,
//! RFC 3339 with microseconds on the wire, DATETIME(6) in MySQL, HTTP-date in headers.

use mysql_async::Value;
use time::macros::format_description;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

pub type Micros = i64;

pub fn now_micros() -> Micros {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_micros() as Micros
}

fn to_datetime(us: Micros) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(us as i128 * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `2026-11-22T19:54:48.123456Z`
pub fn rfc3339_micros(us: Micros) -> String {
    Rfc3339Micros::new(us).as_str().to_owned()
}

/// An RFC 3339 timestamp with microseconds, formatted without allocating: every log line
/// carries one. The calendar part is formatted once per second per thread (with `time`);
/// only the fraction is written per call.
pub struct Rfc3339Micros([u8; 27]);

impl Rfc3339Micros {
    pub fn new(us: Micros) -> Self {
        thread_local! {
            /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS`.
            static SECOND: std::cell::Cell<(i64, [u8; 19])> =
                const { std::cell::Cell::new((i64::MIN, [0; 19])) };
        }
        let (secs, frac) = (us.div_euclid(1_000_000), us.rem_euclid(1_000_000));
        let prefix = SECOND.with(|cell| {
            let (cached, prefix) = cell.get();
            if cached == secs {
                return prefix;
            }
            let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
            let mut prefix = [b'0'; 19];
            let text = to_datetime(secs * 1_000_000)
                .format(fmt)
                .unwrap_or_default();
            if text.len() == prefix.len() {
                prefix.copy_from_slice(text.as_bytes());
            }
            cell.set((secs, prefix));
            prefix
        });
        let mut out = [0u8; 27];
        out[..19].copy_from_slice(&prefix);
        out[19] = b'.';
        let mut f = frac as u32;
        for digit in out[20..26].iter_mut().rev() {
            *digit = b'0' + (f % 10) as u8;
            f /= 10;
        }
        out[26] = b'Z';
        Rfc3339Micros(out)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII digits and separators")
    }
}

/// `Sun, 22 Nov 2026 19:54:48 GMT` (RFC 9110 IMF-fixdate)
pub fn http_date(us: Micros) -> String {
    let fmt = format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    to_datetime(us).format(fmt).unwrap_or_default()
}

/// A DATETIME(6) parameter.
pub fn to_sql(us: Micros) -> Value {
    let dt = to_datetime(us);
    Value::Date(
        dt.year() as u16,
        dt.month() as u8,
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond(),
    )
}

/// A DATETIME(6) column (binary or text protocol).
pub fn from_sql(v: &Value) -> Option<Micros> {
    match v {
        Value::Date(y, mo, d, h, mi, s, us) => {
            let date = Date::from_calendar_date(*y as i32, Month::try_from(*mo).ok()?, *d).ok()?;
            let time = Time::from_hms_micro(*h, *mi, *s, *us).ok()?;
            let ns = PrimitiveDateTime::new(date, time)
                .assume_utc()
                .unix_timestamp_nanos();
            Some((ns / 1000) as Micros)
        }
        Value::Bytes(b) => {
            let s = std::str::from_utf8(b).ok()?;
            let fmt = format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second][optional [.[subsecond]]]"
            );
            let ns = PrimitiveDateTime::parse(s, fmt)
                .ok()?
                .assume_utc()
                .unix_timestamp_nanos();
            Some((ns / 1000) as Micros)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let us = 1_795_377_288_123_456; // 2026-11-22T19:54:48.123456Z
        assert_eq!(rfc3339_micros(us), "2026-11-22T19:54:48.123456Z");
        assert_eq!(http_date(us), "Sun, 22 Nov 2026 19:54:48 GMT");
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            rfc3339_micros(951_782_400_000_007),
            "2000-02-29T00:00:00.000007Z"
        );
        assert_eq!(from_sql(&to_sql(us)), Some(us));
        // The cached calendar part follows the second, backwards too.
        for t in [us, us + 1, us + 999_999, us + 1_000_000, us - 1, 0, us] {
            let fmt = format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
            );
            assert_eq!(
                rfc3339_micros(t),
                to_datetime(t).format(fmt).unwrap(),
                "{t}"
            );
        }
        assert_eq!(
            from_sql(&Value::Bytes(b"2026-11-22 19:54:48.123456".to_vec())),
            Some(us)
        );
    }
}
