//! Connections whose client stops reading are closed.
//!
//! hyper bounds how long a request head may take (`KV_HEADER_READ_TIMEOUT`), and the handlers
//! bound the body (`KV_REQUEST_TIMEOUT`), but nothing bounds how long a response may take to
//! leave: a client that asks for large answers and never reads them would hold each
//! connection, and every response queued on it, for as long as it likes. [`StallGuard`]
//! wraps each connection's stream and fails a write that has made no progress for
//! `KV_REQUEST_TIMEOUT`; hyper then closes the connection and drops what it held. A client
//! that reads, however slowly, is never cut off.
//!
//! Cost: nothing while writes complete at once (the usual case); a timer only while the
//! socket's send buffer is full.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A connection's stream whose writes fail after `timeout` without progress.
pub struct StallGuard<S> {
    inner: S,
    timeout: Duration,
    /// Armed while a write waits; made on the first wait, reused after.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl<S> StallGuard<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        StallGuard {
            inner,
            timeout,
            timer: None,
            waiting: false,
        }
    }

    /// Passes a write's outcome on; a write still waiting `timeout` after the last progress
    /// fails with `TimedOut`.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.waiting = false;
            return r;
        }
        if !self.waiting {
            let deadline = Instant::now() + self.timeout;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.waiting = true;
        }
        let timer = self.timer.as_mut().expect("armed above");
        if timer.as_mut().poll(cx).is_ready() {
            self.waiting = false;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing of the response in time",
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that reads nothing: the write fails once `timeout` passes without progress.
    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_reads_fails_after_the_timeout() {
        let (_peer, server) = tokio::io::duplex(64);
        let mut io = StallGuard::new(server, Duration::from_secs(10));
        let started = Instant::now();
        let write = tokio::time::timeout(Duration::from_secs(60), io.write_all(&[1u8; 1024]));
        let e = write.await.expect("still waiting after 60 s").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    /// A peer that reads slowly, a little every few seconds: never cut off, since each read
    /// lets the write progress again well within the timeout.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_never_cut_off() {
        let (mut peer, server) = tokio::io::duplex(64);
        let mut io = StallGuard::new(server, Duration::from_secs(10));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            loop {
                tokio::time::sleep(Duration::from_secs(4)).await;
                match peer.read(&mut buf).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let data: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
        io.write_all(&data).await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), data);
    }
}
