//! slog setup: JSON lines on stdout (slog-json), formatted on the thread that logs and
//! written by a background thread, so a slow stdout never blocks a request.
//!
//! Each thread formats its records into a buffer of its own (no lock shared between the
//! runtime's workers, no allocation per line); the writer thread empties every thread's
//! buffer every 5 ms or so and writes what it found with one `write(2)`: under load
//! dozens of lines per system call, and no wake-up per line. (slog-async, used before, copies
//! every field of every record into owned values for its thread and wakes it per record; a
//! channel of lines, used after it, costs an allocation per line, freed on another thread.)
//! Lines of one thread keep their order; lines of different threads may interleave by up to
//! a poll interval. A thread whose buffer holds more than `BUFFER_MAX_BYTES` drops lines,
//! and the count is logged. Dropping the returned guard writes what is buffered (done last
//! at shutdown); a line waits at most `POLL_MAX` to be written.
//!
//! The access log (one line per request, [`AccessLog`]) skips slog: its fixed fields are
//! written straight into the thread's buffer. Its output is slog-json's line for the same
//! record (a unit test compares the two).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use slog::{o, Drain, Logger};

use crate::config::LogLevel;

/// The `service` field of every line.
const SERVICE: &str = "kvstore";
/// Bytes a thread's buffer may hold before its new lines are dropped (≈ 16 000 access lines).
const BUFFER_MAX_BYTES: usize = 4 << 20;
/// A buffer grown beyond this by a burst is given back once written.
const BUFFER_KEEP_BYTES: usize = 256 << 10;
/// The writer looks for lines this often while they come, backing off to `POLL_MAX` when
/// idle: a line waits at most that long to be written. Each poll takes the core from a
/// worker (on a one-core pod they share it): every 1 ms, cached GETs ran ≈ 5 % slower than
/// every 5 ms; every 20 ms, the ≈ 500 KB a write then carries cost as much again.
const POLL_MIN: std::time::Duration = std::time::Duration::from_millis(5);
const POLL_MAX: std::time::Duration = std::time::Duration::from_millis(20);

/// One thread's lines waiting for the writer.
type Buffer = Arc<Mutex<Vec<u8>>>;

/// What the logging threads and the writer share.
#[derive(Default)]
struct Sink {
    buffers: Mutex<Vec<Buffer>>,
    dropped: AtomicU64,
    stop: AtomicBool,
}

impl Sink {
    /// Appends one line (`format` writes it, newline included) to `buffer`, unless the buffer
    /// is full.
    fn push(&self, buffer: &Mutex<Vec<u8>>, format: impl FnOnce(&mut Vec<u8>)) {
        let mut buf = buffer.lock().unwrap_or_else(|p| p.into_inner());
        if buf.len() >= BUFFER_MAX_BYTES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            format(&mut buf);
        }
    }

    /// Moves every thread's lines into `out` (whole lines: a thread appends under the lock),
    /// and forgets the buffers of threads that have exited (tokio's blocking threads come and
    /// go).
    fn drain_into(&self, out: &mut Vec<u8>) {
        let mut buffers = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        buffers.retain(|b| {
            // Counted before draining: when only this list holds the buffer, its thread has
            // gone and can no longer append, so what is drained now is all it will ever hold.
            let orphaned = Arc::strong_count(b) == 1;
            let mut buf = b.lock().unwrap_or_else(|p| p.into_inner());
            out.extend_from_slice(&buf);
            empty(&mut buf);
            !orphaned
        });
    }
}

pub struct LogGuard {
    sink: Arc<Sink>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // The writer writes everything buffered, then stops. (Threads may still hold their
        // formatters until they exit; what they log after this is lost.)
        self.sink.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.writer.take() {
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

/// slog-json's output: collects one record, and on the flush slog-json does after each
/// record appends the line to the thread's buffer.
struct LineSender {
    line: Vec<u8>,
    buffer: Buffer,
    sink: Arc<Sink>,
}

impl Write for LineSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sink
            .push(&self.buffer, |buf| buf.extend_from_slice(&self.line));
        self.line.clear();
        Ok(())
    }
}

/// Empties a buffer of lines, giving back what a burst grew it beyond `BUFFER_KEEP_BYTES`.
fn empty(buf: &mut Vec<u8>) {
    buf.clear();
    if buf.capacity() > BUFFER_KEEP_BYTES {
        buf.shrink_to(BUFFER_KEEP_BYTES);
    }
}

/// The writer thread: every few milliseconds, takes every line buffered and writes them in
/// one call. It polls rather than being woken: waking it per line would cost a context switch
/// per request on a busy core (measured: cached GETs at 40 % of the rate).
fn write_lines(sink: Arc<Sink>, mut out: impl Write) {
    let mut batch = Vec::with_capacity(64 << 10);
    let mut idle = POLL_MIN;
    loop {
        let stop = sink.stop.load(Ordering::SeqCst);
        sink.drain_into(&mut batch);
        let lost = sink.dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let _ = writeln!(
                batch,
                "{{\"msg\":\"log lines dropped: the writer fell behind\",\"level\":\"warning\",\
                 \"ts\":\"{}\",\"service\":\"kvstore\",\"count\":{lost}}}",
                crate::time::rfc3339_micros(crate::time::now_micros())
            );
        }
        if batch.is_empty() {
            idle = (idle * 2).min(POLL_MAX);
        } else {
            // Nothing sensible to do when stdout fails: the lines are lost either way.
            let _ = out.write_all(&batch).and_then(|_| out.flush());
            empty(&mut batch);
            idle = POLL_MIN;
        }
        if stop {
            return;
        }
        std::thread::park_timeout(idle);
    }
}

type Formatter = slog_json::Json<LineSender>;

/// A thread's way to the writer: its buffer and its slog-json formatter.
struct Local {
    /// The `Sink` this was made for (by address: tests build several).
    sink: usize,
    buffer: Buffer,
    json: Formatter,
}

thread_local! {
    static LOCAL: std::cell::RefCell<Option<Local>> = const { std::cell::RefCell::new(None) };
}

/// A drain that formats on the logging thread into that thread's buffer.
struct PerThreadJson(Arc<Sink>);

impl PerThreadJson {
    fn local(sink: &Arc<Sink>) -> Local {
        let buffer = Buffer::default();
        sink.buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(buffer.clone());
        let json = slog_json::Json::new(LineSender {
            line: Vec::with_capacity(512),
            buffer: buffer.clone(),
            sink: sink.clone(),
        })
        .set_newlines(true)
        .set_flush(true)
        .add_key_value(o!(
            "ts" => slog::PushFnValue(|_, ser| {
                ser.emit(crate::time::Rfc3339Micros::new(crate::time::now_micros()).as_str())
            }),
            "level" => slog::PushFnValue(|rec, ser| ser.emit(level_name(rec.level()))),
            "msg" => slog::PushFnValue(|rec, ser| ser.emit(rec.msg())),
        ))
        .build();
        Local {
            sink: Arc::as_ptr(sink) as usize,
            buffer,
            json,
        }
    }
}

/// Runs `f` with this thread's buffer and formatter for `sink`, made on first use.
fn with_local(sink: &Arc<Sink>, f: impl FnOnce(&Local)) {
    LOCAL.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().map(|l| l.sink) != Some(Arc::as_ptr(sink) as usize) {
            *cell = Some(PerThreadJson::local(sink));
        }
        if let Some(local) = cell.as_ref() {
            f(local);
        }
    });
}

impl Drain for PerThreadJson {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        // LineSender never fails; serialisation errors lose only this record.
        with_local(&self.0, |local| {
            let _ = local.json.log(record, values);
        });
        Ok(())
    }
}

/// One request as the access log records it.
pub struct Access<'a> {
    /// The request id (`X-Request-Id`): 1–128 of `[A-Za-z0-9._:-]` (see `api::request_id`).
    pub id: &'a [u8],
    /// The request method as sent (`PATCH` too; the metrics' `OTHER` is only a label).
    pub method: &'a str,
    /// The route template (never the raw key).
    pub route: &'static str,
    pub status: u16,
    pub elapsed: std::time::Duration,
    /// Bytes of the response body.
    pub bytes: u64,
}

impl Access<'_> {
    /// The duration in milliseconds, rounded to the microsecond, as thousandths.
    fn micros(&self) -> u64 {
        ((self.elapsed.as_nanos() + 500) / 1000)
            .try_into()
            .unwrap_or(u64::MAX)
    }
}

/// Where the access lines go. The process logger's lines are written straight into its
/// per-thread buffers, one fixed layout with no slog record between: through slog, with its
/// key-value serialisation, a line cost ≈ 2 900 instructions, an eighth of a cached GET. Any
/// other logger (tests capture through their own) gets an ordinary slog record with the same
/// fields ([`AccessLog::slog`]); a unit test holds the two to the same JSON.
#[derive(Clone)]
pub struct AccessLog(Target);

#[derive(Clone)]
enum Target {
    Direct(Arc<Sink>),
    Slog(Logger),
    Off,
}

impl AccessLog {
    /// Access lines as `info` records of `log`.
    pub fn slog(log: Logger) -> AccessLog {
        AccessLog(Target::Slog(log))
    }

    /// No access lines (`KV_ACCESS_LOG=false`).
    pub fn off() -> AccessLog {
        AccessLog(Target::Off)
    }

    pub fn line(&self, a: &Access) {
        match &self.0 {
            Target::Direct(sink) => with_local(sink, |local| {
                sink.push(&local.buffer, |buf| {
                    access_json(buf, a, crate::time::now_micros())
                })
            }),
            // slog serialises a record's fields last to first: listed backwards, they come
            // out in the direct line's order.
            Target::Slog(log) => slog::info!(log, "request";
                "bytes" => a.bytes,
                "duration_ms" => a.micros() as f64 / 1e3,
                "status" => a.status,
                "route" => a.route,
                "method" => a.method,
                "request_id" => String::from_utf8_lossy(a.id).as_ref(),
            ),
            Target::Off => {}
        }
    }
}

/// The access line: what slog-json writes for the same record through the process logger
/// (same keys in the same order, same JSON values), newline included.
fn access_json(buf: &mut Vec<u8>, a: &Access, now: crate::time::Micros) {
    buf.extend_from_slice(b"{\"msg\":\"request\",\"level\":\"info\",\"ts\":\"");
    buf.extend_from_slice(crate::time::Rfc3339Micros::new(now).as_bytes());
    buf.extend_from_slice(b"\",\"service\":\"kvstore\",\"request_id\":");
    json_string(buf, a.id);
    // A method is an HTTP token, which never needs escapes; checked all the same, as the id.
    buf.extend_from_slice(b",\"method\":");
    json_string(buf, a.method.as_bytes());
    // Route templates are constants that need no escapes (a unit test checks every one).
    buf.extend_from_slice(b",\"route\":\"");
    buf.extend_from_slice(a.route.as_bytes());
    buf.push(b'"');
    buf.extend_from_slice(b",\"status\":");
    buf.extend_from_slice(itoa::Buffer::new().format(a.status).as_bytes());
    // Thousandths printed exactly: what serde_json prints for the f64 nearest to them (the
    // shortest text that reads back as it), trailing zeros dropped, at least one decimal.
    let us = a.micros();
    buf.extend_from_slice(b",\"duration_ms\":");
    buf.extend_from_slice(itoa::Buffer::new().format(us / 1000).as_bytes());
    let frac = (us % 1000) as u32;
    let digits = [
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    let keep = if frac.is_multiple_of(100) {
        1
    } else if frac.is_multiple_of(10) {
        2
    } else {
        3
    };
    buf.push(b'.');
    buf.extend_from_slice(&digits[..keep]);
    buf.extend_from_slice(b",\"bytes\":");
    buf.extend_from_slice(itoa::Buffer::new().format(a.bytes).as_bytes());
    buf.extend_from_slice(b"}\n");
}

/// A JSON string. Request ids are plain ASCII (see `api::request_id`); anything else would
/// go through serde_json's escaper, invalid UTF-8 replaced.
fn json_string(buf: &mut Vec<u8>, s: &[u8]) {
    if needs_escape(s) || !s.is_ascii() {
        let _ = serde_json::to_writer(&mut *buf, &*String::from_utf8_lossy(s));
    } else {
        buf.push(b'"');
        buf.extend_from_slice(s);
        buf.push(b'"');
    }
}

/// Whether a JSON string needs escapes: a control character (< 0x20), `"` or `\\`. Eight
/// bytes at a time (a byte loop cost ≈ 5 instructions a byte; the access line checks every
/// request id with it): a zero byte in `x ^ c` marks a `c`, and `x - 0x20…`
/// borrows into a byte's top bit only where it was below 0x20 (bytes ≥ 0x80 keep theirs,
/// masked by `!x`). A short string is padded with spaces; a long one's last word overlaps.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * n as u64) & !x & HIGH;
    let hit = |w: [u8; 8]| {
        let x = u64::from_ne_bytes(w);
        below(x, 0x20) | below(x ^ (ONES * b'"' as u64), 1) | below(x ^ (ONES * b'\\' as u64), 1)
            != 0
    };
    let word = |c: &[u8]| -> [u8; 8] { c.try_into().expect("8 bytes") };
    if s.len() < 8 {
        let mut w = [b' '; 8];
        w[..s.len()].copy_from_slice(s);
        return hit(w);
    }
    s.chunks_exact(8).any(|c| hit(word(c))) || hit(word(&s[s.len() - 8..]))
}

/// The `level` field: slog's level names in lower case, without allocating per line.
fn level_name(level: slog::Level) -> &'static str {
    match level {
        slog::Level::Critical => "critical",
        slog::Level::Error => "error",
        slog::Level::Warning => "warning",
        slog::Level::Info => "info",
        slog::Level::Debug => "debug",
        slog::Level::Trace => "trace",
    }
}

/// Builds the process logger and its access log. Every record carries `ts`, `level` and
/// `msg` plus its fields. Access lines are `info`: at `warning` and above there are none.
pub fn init(level: LogLevel) -> (Logger, AccessLog, LogGuard) {
    let sink = Arc::new(Sink::default());
    let writer = {
        let sink = sink.clone();
        std::thread::Builder::new()
            .name("kvstore-log".into())
            .spawn(move || write_lines(sink, std::io::stdout()))
            .expect("spawn the log writer thread")
    };
    let access = if slog::Level::Info.is_at_least(level.as_slog()) {
        AccessLog(Target::Direct(sink.clone()))
    } else {
        AccessLog::off()
    };
    let drain = PerThreadJson(sink.clone())
        .filter_level(level.as_slog())
        .fuse();
    let logger = Logger::root(drain, o!("service" => SERVICE));
    (
        logger,
        access,
        LogGuard {
            sink,
            writer: Some(writer),
        },
    )
}

/// A logger that discards everything (unit tests).
pub fn discard() -> Logger {
    Logger::root(slog::Discard, o!())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn level_names_are_slogs_in_lower_case() {
        for level in [
            slog::Level::Critical,
            slog::Level::Error,
            slog::Level::Warning,
            slog::Level::Info,
            slog::Level::Debug,
            slog::Level::Trace,
        ] {
            assert_eq!(level_name(level), level.as_str().to_ascii_lowercase());
        }
    }

    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<Vec<u8>>>>);
    impl Write for Out {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(data.to_vec());
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Lines of several threads are written together, whole and in each thread's order, and
    /// lines dropped by a full buffer are reported.
    #[test]
    fn the_writer_batches_whole_lines_in_order_and_reports_drops() {
        let sink = Arc::new(Sink::default());
        let log = Logger::root(PerThreadJson(sink.clone()).fuse(), o!());
        // Joined by hand: only that waits for a thread's locals (its buffer handle) to drop.
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for n in 0..100 {
                        slog::info!(log, "line"; "t" => t, "n" => n);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        // One more thread fills its buffer: its next line is dropped.
        let big = log.clone();
        std::thread::spawn(move || {
            slog::info!(big, "big"; "x" => "x".repeat(BUFFER_MAX_BYTES));
            slog::info!(big, "lost");
        })
        .join()
        .unwrap();
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 1);
        // This thread lives on: its buffer is kept, the exited threads' are forgotten.
        slog::info!(log, "main");
        assert_eq!(sink.buffers.lock().unwrap().len(), 5);
        sink.stop.store(true, Ordering::SeqCst);
        let out = Out::default();
        write_lines(sink.clone(), out.clone());
        assert_eq!(
            sink.buffers.lock().unwrap().len(),
            1,
            "only the live thread's buffer"
        );
        let writes = out.0.lock().unwrap().clone();
        assert_eq!(writes.len(), 1, "one write for everything that was waiting");
        let text = String::from_utf8(writes[0].clone()).unwrap();
        let recs: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("whole JSON lines"))
            .collect();
        assert_eq!(
            recs.len(),
            303,
            "300 lines, the big one, main's, the report"
        );
        for t in 0..3 {
            let ns: Vec<i64> = recs
                .iter()
                .filter(|r| r["msg"] == "line" && r["t"] == t)
                .map(|r| r["n"].as_i64().unwrap())
                .collect();
            assert_eq!(ns, (0..100).collect::<Vec<_>>(), "thread {t} in order");
        }
        assert!(!text.contains("\"lost\""));
        let report = recs.last().unwrap();
        assert_eq!(report["count"], 1);
        assert_eq!(report["level"], "warning");
    }

    /// The word-at-a-time check agrees with the byte loop for every byte at every position,
    /// whatever bytes surround it (both before and in a partial last word).
    #[test]
    fn needs_escape_finds_every_byte_that_needs_it() {
        let naive = |s: &[u8]| s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        for fill in [b'a', 0x7f, 0x80, 0xff, b'!', b'#'] {
            for len in [1, 7, 8, 9, 16, 19] {
                for pos in 0..len {
                    for b in 0..=255u8 {
                        let mut s = vec![fill; len];
                        s[pos] = b;
                        assert_eq!(needs_escape(&s), naive(&s), "{s:?}");
                    }
                }
            }
        }
        assert!(!needs_escape(b""));
    }

    /// The access line is what slog-json writes for the same record through the process
    /// logger, byte for byte but for the timestamp, whatever the duration's digits.
    #[test]
    fn access_lines_are_slog_json_lines() {
        let sink = Arc::new(Sink::default());
        let log = Logger::root(PerThreadJson(sink.clone()).fuse(), o!("service" => SERVICE));
        let direct = AccessLog(Target::Direct(sink.clone()));
        let through_slog = AccessLog::slog(log);
        let nanos = [
            0,
            499,
            500,
            1_000,
            41_000,
            100_000,
            120_000,
            999_499,
            999_500,
            1_000_000,
            1_500_000,
            12_345_678,
            3_600_000_000_000,
        ];
        for (n, ns) in nanos.into_iter().enumerate() {
            let a = Access {
                id: if n % 2 == 0 {
                    b"9a6e4cc9d57148b2ae63b3d3e5b5d001"
                } else {
                    b"client.id:1-2_3"
                },
                method: "GET",
                route: "/v1/keys/{key}",
                status: [200, 404, 503][n % 3],
                elapsed: std::time::Duration::from_nanos(ns),
                bytes: [0, 210, u64::MAX][n % 3],
            };
            direct.line(&a);
            through_slog.line(&a);
        }
        let mut out = Vec::new();
        sink.drain_into(&mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<String> = text
            .lines()
            .map(|l| {
                let at = l.find("\"ts\":\"").expect("ts") + 6;
                format!("{}{}", &l[..at], &l[at + 27..])
            })
            .collect();
        assert_eq!(lines.len(), 2 * nanos.len());
        for pair in lines.chunks(2) {
            assert_eq!(pair[0], pair[1]);
        }
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["msg"], "request");
        assert_eq!(first["service"], "kvstore");
        assert_eq!(first["duration_ms"], 0.0);
        let second: serde_json::Value = serde_json::from_str(text.lines().nth(2).unwrap()).unwrap();
        assert_eq!(second["request_id"], "client.id:1-2_3");
        assert_eq!(second["status"], 404);
        let third: serde_json::Value = serde_json::from_str(text.lines().nth(4).unwrap()).unwrap();
        assert_eq!(third["duration_ms"], 0.001);
        assert_eq!(third["bytes"], u64::MAX);
    }

    /// The access line writes route templates as they are (and the method labels of the
    /// metrics, which refusals log, need no escapes either).
    #[test]
    fn access_line_constants_need_no_escapes() {
        for s in crate::metrics::METHODS
            .iter()
            .chain(&crate::api::route::ALL)
            .chain([&crate::api::route::METRICS])
        {
            assert!(s.is_ascii() && !needs_escape(s.as_bytes()), "{s}");
        }
    }

    /// Strings that would need escapes are escaped as serde_json does (request ids never
    /// need it; this is the guard that keeps a line JSON if one ever did).
    #[test]
    fn access_line_strings_are_escaped_when_needed() {
        let mut buf = Vec::new();
        json_string(&mut buf, b"plain");
        json_string(&mut buf, b"quote \" backslash \\ control \x01");
        json_string(&mut buf, b"bad utf-8 \xff");
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "\"plain\"\"quote \\\" backslash \\\\ control \\u0001\"\"bad utf-8 \u{fffd}\""
        );
    }
}
