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
//! The access log (a record tagged [`ACCESS_TAG`], one per request) is formatted by
//! [`AccessJson`], a serialiser that writes straight into the buffer: slog-json, through
//! serde, cost ≈ 5 000 instructions per line, a sixth of a cached GET. Its output is the
//! same JSON (a unit test compares the two).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use slog::{o, Drain, Logger};

use crate::config::LogLevel;

/// The tag of access-log records: `info!(log, #ACCESS_TAG, "request"; ...)` (see `api`).
pub const ACCESS_TAG: &str = "access";
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

impl Drain for PerThreadJson {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        LOCAL.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.as_ref().map(|l| l.sink) != Some(Arc::as_ptr(&self.0) as usize) {
                *cell = Some(Self::local(&self.0));
            }
            let Some(local) = cell.as_ref() else { return };
            if record.tag() == ACCESS_TAG {
                self.0
                    .push(&local.buffer, |buf| AccessJson::line(buf, record, values));
            } else {
                // LineSender never fails; serialisation errors lose only this record.
                let _ = local.json.log(record, values);
            }
        });
        Ok(())
    }
}

/// The access-log formatter: slog-json's line (same keys, same order, same JSON values)
/// written straight into a buffer.
struct AccessJson<'a>(&'a mut Vec<u8>);

impl AccessJson<'_> {
    fn line(buf: &mut Vec<u8>, record: &slog::Record, values: &slog::OwnedKVList) {
        let start = buf.len();
        let mut ser = AccessJson(buf);
        ser.0.extend_from_slice(b"{\"msg\":");
        ser.arguments(record.msg());
        ser.0.extend_from_slice(b",\"level\":\"");
        ser.0
            .extend_from_slice(level_name(record.level()).as_bytes());
        ser.0.extend_from_slice(b"\",\"ts\":\"");
        ser.0.extend_from_slice(
            crate::time::Rfc3339Micros::new(crate::time::now_micros())
                .as_str()
                .as_bytes(),
        );
        ser.0.push(b'"');
        use slog::KV;
        let ok = values.serialize(record, &mut ser).is_ok()
            && record.kv().serialize(record, &mut ser).is_ok();
        if ok {
            ser.0.extend_from_slice(b"}\n");
        } else {
            buf.truncate(start);
        }
    }

    fn string(&mut self, s: &str) {
        // Strings that need no escaping (all the access log's, in practice) are copied as
        // they are; the rest go through serde_json's escaper, as in slog-json.
        if !needs_escape(s.as_bytes()) {
            self.0.push(b'"');
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(b'"');
        } else {
            let _ = serde_json::to_writer(&mut *self.0, s);
        }
    }

    fn arguments(&mut self, a: &std::fmt::Arguments) {
        match a.as_str() {
            Some(s) => self.string(s),
            None => self.string(&a.to_string()),
        }
    }

    fn key(&mut self, key: slog::Key) {
        self.0.push(b',');
        self.string(key);
        self.0.push(b':');
    }

    fn int(&mut self, key: slog::Key, v: impl itoa::Integer) -> slog::Result {
        self.key(key);
        self.0
            .extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        Ok(())
    }

    fn value(&mut self, key: slog::Key, v: impl serde::Serialize) -> slog::Result {
        self.key(key);
        serde_json::to_writer(&mut *self.0, &v).map_err(|e| slog::Error::Io(e.into()))
    }
}

impl slog::Serializer for AccessJson<'_> {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
        self.key(key);
        self.arguments(val);
        Ok(())
    }
    fn emit_str(&mut self, key: slog::Key, val: &str) -> slog::Result {
        self.key(key);
        self.string(val);
        Ok(())
    }
    fn emit_unit(&mut self, key: slog::Key) -> slog::Result {
        self.value(key, ())
    }
    fn emit_none(&mut self, key: slog::Key) -> slog::Result {
        self.value(key, ())
    }
    fn emit_bool(&mut self, key: slog::Key, val: bool) -> slog::Result {
        self.value(key, val)
    }
    fn emit_char(&mut self, key: slog::Key, val: char) -> slog::Result {
        self.value(key, val)
    }
    fn emit_u8(&mut self, key: slog::Key, val: u8) -> slog::Result {
        self.int(key, val)
    }
    fn emit_i8(&mut self, key: slog::Key, val: i8) -> slog::Result {
        self.int(key, val)
    }
    fn emit_u16(&mut self, key: slog::Key, val: u16) -> slog::Result {
        self.int(key, val)
    }
    fn emit_i16(&mut self, key: slog::Key, val: i16) -> slog::Result {
        self.int(key, val)
    }
    fn emit_u32(&mut self, key: slog::Key, val: u32) -> slog::Result {
        self.int(key, val)
    }
    fn emit_i32(&mut self, key: slog::Key, val: i32) -> slog::Result {
        self.int(key, val)
    }
    fn emit_u64(&mut self, key: slog::Key, val: u64) -> slog::Result {
        self.int(key, val)
    }
    fn emit_i64(&mut self, key: slog::Key, val: i64) -> slog::Result {
        self.int(key, val)
    }
    fn emit_usize(&mut self, key: slog::Key, val: usize) -> slog::Result {
        self.int(key, val)
    }
    fn emit_isize(&mut self, key: slog::Key, val: isize) -> slog::Result {
        self.int(key, val)
    }
    fn emit_f32(&mut self, key: slog::Key, val: f32) -> slog::Result {
        self.value(key, val)
    }
    fn emit_f64(&mut self, key: slog::Key, val: f64) -> slog::Result {
        self.value(key, val)
    }
}

/// Whether a JSON string needs escapes: a control character (< 0x20), `"` or `\\`. Eight
/// bytes at a time (a byte loop cost ≈ 5 instructions a byte, and each of the access line's
/// dozen strings paid a loop set-up): a zero byte in `x ^ c` marks a `c`, and `x - 0x20…`
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

/// Builds the process logger. Every record carries `ts`, `level` and `msg` plus its fields.
pub fn init(level: LogLevel) -> (Logger, LogGuard) {
    let sink = Arc::new(Sink::default());
    let writer = {
        let sink = sink.clone();
        std::thread::Builder::new()
            .name("kvstore-log".into())
            .spawn(move || write_lines(sink, std::io::stdout()))
            .expect("spawn the log writer thread")
    };
    let drain = PerThreadJson(sink.clone())
        .filter_level(level.as_slog())
        .fuse();
    let logger = Logger::root(drain, o!("service" => "kvstore"));
    (
        logger,
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

    /// The access-log formatter writes what slog-json writes for the same record, byte for
    /// byte but for the timestamp.
    #[test]
    fn access_lines_are_slog_json_lines() {
        let sink = Arc::new(Sink::default());
        let log = Logger::root(
            PerThreadJson(sink.clone()).fuse(),
            o!("service" => "kvstore"),
        );
        macro_rules! both {
            ($($kv:tt)*) => {
                slog::info!(log, #ACCESS_TAG, "request"; $($kv)*);
                slog::info!(log, "request"; $($kv)*);
            };
        }
        both!("request_id" => "9a6e4cc9d57148b2", "method" => "GET", "route" => "/v1/keys/{key}",
            "status" => 404u16, "duration_ms" => 0.041, "bytes" => 210u64);
        both!("s" => "quote \" backslash \\ control \u{1} tab \t é ✓", "i" => -3i64,
            "f" => 1.0f64, "nan" => f64::NAN, "b" => true, "none" => None::<u8>, "u" => (),
            "args" => format_args!("x{}\"", 1), "c" => 'é', "z" => 18usize,
            "min" => i64::MIN, "max" => u64::MAX, "i8" => -128i8);
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
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], lines[1]);
        assert_eq!(lines[2], lines[3]);
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["service"], "kvstore");
        }
    }
}
