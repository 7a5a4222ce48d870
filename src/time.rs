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

/// An instant broken down into UTC calendar fields by arithmetic alone (Howard Hinnant's
/// `civil_from_days`): every log line and every entry document carries timestamps, and the
/// general-purpose formatter of the `time` crate costs thousands of instructions per call.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    micros: u32,
    /// 0 = Sunday.
    weekday: u32,
}

impl Civil {
    /// `None` outside years 0000–9999 (four digits); callers then use the `time` crate.
    fn of(us: Micros) -> Option<Civil> {
        let (secs, micros) = (us.div_euclid(1_000_000), us.rem_euclid(1_000_000) as u32);
        let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        (0..=9999).contains(&year).then_some(Civil {
            year,
            month,
            day,
            hour: sod / 3600,
            minute: sod / 60 % 60,
            second: sod % 60,
            micros,
            weekday: (days + 4).rem_euclid(7) as u32,
        })
    }
}

/// Writes `n` as exactly `out.len()` decimal digits.
fn digits(out: &mut [u8], mut n: u32) {
    for d in out.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// An RFC 3339 timestamp with microseconds, formatted without allocating.
pub struct Rfc3339Micros([u8; 27]);

impl Rfc3339Micros {
    pub fn new(us: Micros) -> Self {
        // Log lines come many per second: the calendar fields are worked out once a second
        // per thread, and only the microseconds written for each.
        thread_local! {
            static SECOND: std::cell::Cell<(i64, [u8; 27])> =
                const { std::cell::Cell::new((i64::MIN, [0; 27])) };
        }
        let (second, micros) = (us.div_euclid(1_000_000), us.rem_euclid(1_000_000) as u32);
        SECOND.with(|cell| {
            let (cached, mut out) = cell.get();
            if cached == second {
                digits(&mut out[20..26], micros);
            } else {
                out = Self::format(us);
                cell.set((second, out));
            }
            Rfc3339Micros(out)
        })
    }

    fn format(us: Micros) -> [u8; 27] {
        let mut out = *b"0000-00-00T00:00:00.000000Z";
        match Civil::of(us) {
            Some(c) => {
                digits(&mut out[0..4], c.year as u32);
                digits(&mut out[5..7], c.month);
                digits(&mut out[8..10], c.day);
                digits(&mut out[11..13], c.hour);
                digits(&mut out[14..16], c.minute);
                digits(&mut out[17..19], c.second);
                digits(&mut out[20..26], c.micros);
            }
            None => {
                let fmt = format_description!(
                    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
                );
                let text = to_datetime(us).format(fmt).unwrap_or_default();
                if text.len() == out.len() {
                    out.copy_from_slice(text.as_bytes());
                }
            }
        }
        out
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII digits and separators")
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// `Sun, 22 Nov 2026 19:54:48 GMT` (RFC 9110 IMF-fixdate)
pub fn http_date(us: Micros) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let Some(c) = Civil::of(us) else {
        let fmt = format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        return to_datetime(us).format(fmt).unwrap_or_default();
    };
    let mut out = *b"Sun, 00 Jan 0000 00:00:00 GMT";
    out[0..3].copy_from_slice(DAYS[c.weekday as usize].as_bytes());
    digits(&mut out[5..7], c.day);
    out[8..11].copy_from_slice(MONTHS[c.month as usize - 1].as_bytes());
    digits(&mut out[12..16], c.year as u32);
    digits(&mut out[17..19], c.hour);
    digits(&mut out[20..22], c.minute);
    digits(&mut out[23..25], c.second);
    String::from_utf8(out.to_vec()).expect("ASCII")
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

/// For tests: both ends, the epoch and its neighbours, the leap day of 2000 and 20 000
/// pseudo-random instants from `lo` to the last microsecond of 9999 (the same every run).
#[cfg(test)]
pub(crate) fn sample_instants(lo: Micros) -> Vec<Micros> {
    let hi = 253_402_300_799_999_999i64;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut instants = vec![lo, hi, 0, 1, -1, 951_782_399_999_999, 951_868_800_000_000];
    for _ in 0..20_000 {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        instants.push(lo + ((x >> 1) as i64) % (hi - lo));
    }
    instants
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arithmetic formatters agree with the `time` crate over years 0001–9999, leap days
    /// and second boundaries included.
    #[test]
    fn fast_formatters_agree_with_the_time_crate() {
        let rfc = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        let imf = format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        for us in sample_instants(-62_135_596_800_000_000) {
            let dt = to_datetime(us);
            assert_eq!(rfc3339_micros(us), dt.format(rfc).unwrap(), "{us}");
            assert_eq!(http_date(us), dt.format(imf).unwrap(), "{us}");
        }
    }

    /// Within a second only the microseconds are written afresh (a per-thread cache of the
    /// rest): a run of instants inside, across and back into seconds, before 1970 too.
    #[test]
    fn instants_in_a_row_format_like_the_time_crate() {
        let rfc = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        let base = 1_795_377_288_000_000;
        for us in [
            base,
            base + 1,
            base + 999_999,
            base + 1_000_000,
            base + 5,
            base - 1,
            base + 123_456,
            -1,
            -999_999,
            -1_000_000,
            -1_000_001,
            0,
            999_999,
        ] {
            assert_eq!(
                rfc3339_micros(us),
                to_datetime(us).format(rfc).unwrap(),
                "{us}"
            );
        }
    }

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
        assert_eq!(
            from_sql(&Value::Bytes(b"2026-11-22 19:54:48.123456".to_vec())),
            Some(us)
        );
    }
}
