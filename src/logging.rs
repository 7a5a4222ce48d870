//! slog setup: JSON lines on stdout, written by a background thread so a slow stdout never
//! blocks a request. Dropping the returned guard flushes what is queued (done last at
//! shutdown).

use slog::{o, Drain, Logger};

use crate::config::LogLevel;

pub struct LogGuard(Option<slog_async::AsyncGuard>);

/// Collects one record and writes it to stdout in one call when slog-json flushes (once
/// per record): stdout's lock and line scanning once per line, not once per token.
struct LineBuffered {
    buf: Vec<u8>,
}

impl std::io::Write for LineBuffered {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        let r = out.write_all(&self.buf).and_then(|_| out.flush());
        self.buf.clear();
        r
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // Dropping the AsyncGuard joins the writer thread after it has written every record.
        self.0.take();
    }
}

/// Builds the process logger. Every record carries `ts`, `level` and `msg` plus its fields.
pub fn init(level: LogLevel) -> (Logger, LogGuard) {
    let json = slog_json::Json::new(LineBuffered {
        buf: Vec::with_capacity(512),
    })
    .set_newlines(true)
    .set_flush(true)
    .add_key_value(o!(
        "ts" => slog::PushFnValue(|_, ser| {
            ser.emit(crate::time::rfc3339_micros(crate::time::now_micros()))
        }),
        "level" => slog::FnValue(|rec| rec.level().as_str().to_ascii_lowercase()),
        "msg" => slog::PushFnValue(|rec, ser| ser.emit(rec.msg())),
    ))
    .build()
    .fuse();
    let (drain, guard) = slog_async::Async::new(json)
        .chan_size(16 * 1024)
        .overflow_strategy(slog_async::OverflowStrategy::DropAndReport)
        .thread_name("kvstore-log".into())
        .build_with_guard();
    let drain = drain.filter_level(level.as_slog()).fuse();
    let logger = Logger::root(drain, o!("service" => "kvstore"));
    (logger, LogGuard(Some(guard)))
}

/// A logger that discards everything (unit tests).
pub fn discard() -> Logger {
    Logger::root(slog::Discard, o!())
}
