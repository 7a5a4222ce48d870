//! slog setup: JSON lines on stdout (slog-json), formatted on the thread that logs and
//! written by a background thread, so a slow stdout never blocks a request.
//!
//! Each thread serialises its records with a formatter of its own (no lock shared between
//! the runtime's workers) into a line, and queues the line's bytes. The writer thread takes
//! every line waiting each millisecond or so and writes them with one `write(2)`: under load
//! dozens of lines per system call, and no wake-up per line. (slog-async, used before, copies
//! every field of every record into owned values for its thread and wakes it per record.)
//! When the writer falls more than `QUEUE_LINES` behind, lines are dropped and counted, and
//! the count is logged. Dropping the returned guard writes what is queued (done last at
//! shutdown); a line waits at most `POLL_MAX` to be written.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

use slog::{o, Drain, Logger};

use crate::config::LogLevel;

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE_LINES: usize = 16 * 1024;
/// At most this much is gathered into one write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// The writer looks for lines this often while they come, backing off to `POLL_MAX` when
/// idle: a line waits at most that long to be written.
const POLL_MIN: std::time::Duration = std::time::Duration::from_millis(1);
const POLL_MAX: std::time::Duration = std::time::Duration::from_millis(20);

pub struct LogGuard {
    tx: SyncSender<Vec<u8>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // An empty line tells the writer to stop once it has written everything before it.
        // (Threads may still hold formatters, and so senders, until they exit.)
        if self.tx.send(Vec::new()).is_ok() {
            if let Some(handle) = self.writer.take() {
                let _ = handle.join();
            }
        }
    }
}

/// slog-json's output: collects one record, and on the flush slog-json does after each
/// record hands the line to the writer thread.
struct LineSender {
    line: Vec<u8>,
    tx: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl Write for LineSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let line = std::mem::replace(&mut self.line, Vec::with_capacity(512));
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The writer is gone (shutdown): nothing left to write to.
            Err(TrySendError::Disconnected(_)) => {}
        }
        Ok(())
    }
}

/// The writer thread: every few milliseconds, takes every line waiting and writes them in one
/// call. It polls rather than blocking on the channel: a blocked receiver must be woken by
/// every line sent, a context switch per request on a busy core (measured: cached GETs at
/// 40 % of the rate without it).
fn write_lines(rx: Receiver<Vec<u8>>, dropped: Arc<AtomicU64>, mut out: impl Write) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_BYTES);
    let mut idle = POLL_MIN;
    loop {
        let mut stop = false;
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    stop |= line.is_empty();
                    batch.extend_from_slice(&line);
                    if stop || batch.len() >= WRITE_BATCH_BYTES {
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    stop = true;
                    break;
                }
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
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
            batch.clear();
            idle = POLL_MIN;
        }
        if stop {
            return;
        }
        std::thread::sleep(idle);
    }
}

/// What every thread's formatter shares: the way to the writer thread.
struct Shared {
    tx: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

type Formatter = slog_json::Json<LineSender>;

thread_local! {
    /// This thread's formatter, and the `Shared` it was built for (by address).
    static FORMATTER: std::cell::RefCell<Option<(usize, Formatter)>> =
        const { std::cell::RefCell::new(None) };
}

/// A drain that formats on the logging thread with a formatter of that thread's own: no lock
/// shared between the runtime's workers.
struct PerThreadJson(Arc<Shared>);

impl PerThreadJson {
    fn formatter(shared: &Shared) -> Formatter {
        slog_json::Json::new(LineSender {
            line: Vec::with_capacity(512),
            tx: shared.tx.clone(),
            dropped: shared.dropped.clone(),
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
        .build()
    }
}

impl Drain for PerThreadJson {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let id = Arc::as_ptr(&self.0) as usize;
        FORMATTER.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.as_ref().map(|(owner, _)| *owner) != Some(id) {
                *cell = Some((id, Self::formatter(&self.0)));
            }
            if let Some((_, json)) = cell.as_ref() {
                // LineSender never fails; serialisation errors lose only this record.
                let _ = json.log(record, values);
            }
        });
        Ok(())
    }
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
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    let dropped = Arc::new(AtomicU64::new(0));
    let writer = {
        let dropped = dropped.clone();
        std::thread::Builder::new()
            .name("kvstore-log".into())
            .spawn(move || write_lines(rx, dropped, std::io::stdout()))
            .expect("spawn the log writer thread")
    };
    let shared = Arc::new(Shared {
        tx: tx.clone(),
        dropped,
    });
    let drain = PerThreadJson(shared).filter_level(level.as_slog()).fuse();
    let logger = Logger::root(drain, o!("service" => "kvstore"));
    (
        logger,
        LogGuard {
            tx,
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

    /// Lines sent before the writer runs are written together, whole and in order, and
    /// dropped lines are reported.
    #[test]
    fn the_writer_batches_whole_lines_in_order_and_reports_drops() {
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
        let (tx, rx) = mpsc::sync_channel(2);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut sender = LineSender {
            line: Vec::new(),
            tx,
            dropped: dropped.clone(),
        };
        for i in 0..3 {
            writeln!(sender, "{{\"n\":{i}}}").unwrap();
            sender.flush().unwrap();
        }
        assert_eq!(
            dropped.load(Ordering::Relaxed),
            1,
            "the queue holds 2 lines"
        );
        drop(sender);
        let out = Out::default();
        write_lines(rx, dropped, out.clone());
        let writes = out.0.lock().unwrap().clone();
        assert_eq!(writes.len(), 1, "one write for everything that was waiting");
        let text = String::from_utf8(writes[0].clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(&lines[..2], ["{\"n\":0}", "{\"n\":1}"]);
        let report: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(report["count"], 1);
        assert_eq!(report["level"], "warning");
    }
}
