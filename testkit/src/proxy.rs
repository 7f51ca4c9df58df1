//! A TCP proxy in front of the S3 server that delays every request by a set
//! latency and records the HTTP requests it forwards (method, path, when
//! they started, when their reply began), so a test can inject a slow store
//! and act at a chosen moment: while a checkpoint is being uploaded, right
//! after a member was stored.
//!
//! Bytes pass through untouched (S3 signatures cover the Host header). A
//! request is recognised by its first line at the start of a read, a reply
//! by its status line; S3 clients do not pipeline, so replies on one
//! connection answer its requests in order.

// Test support: a failure here is the test's failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One HTTP request seen by the proxy.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub started: Instant,
    /// The reply's status, once it began to come back.
    pub status: Option<u16>,
}

#[derive(Default)]
struct State {
    latency_ms: AtomicU64,
    requests: Mutex<Vec<Request>>,
    stopped: AtomicBool,
}

pub struct StoreProxy {
    pub port: u16,
    state: Arc<State>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StoreProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream_port`.
    pub fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let open = Arc::new(Mutex::new(VecDeque::new()));
                pump(
                    client.try_clone().unwrap(),
                    upstream.try_clone().unwrap(),
                    s.clone(),
                    open.clone(),
                    true,
                );
                pump(upstream, client, s.clone(), open, false);
            }
        });
        StoreProxy { port, state }
    }

    /// Delays every request by `latency` from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.state.requests).clone()
    }

    /// Waits up to `limit` for a request matching `pred`; the first one.
    pub fn wait_for(&self, limit: Duration, pred: impl Fn(&Request) -> bool) -> Option<Request> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(r) = self.requests().into_iter().find(|r| pred(r)) {
                return Some(r);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

impl Drop for StoreProxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `from` to `to` on a thread. Requests (client to store) are
/// recorded and delayed; replies mark the oldest open request of the
/// connection answered.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    state: Arc<State>,
    open: Arc<Mutex<VecDeque<usize>>>,
    requests: bool,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            if requests {
                if let Some((method, path)) = request_line(chunk) {
                    let mut all = lock(&state.requests);
                    all.push(Request {
                        method,
                        path,
                        started: Instant::now(),
                        status: None,
                    });
                    lock(&open).push_back(all.len() - 1);
                    drop(all);
                    let ms = state.latency_ms.load(Ordering::SeqCst);
                    if ms > 0 {
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                }
            } else if let Some(status) = status_line(chunk) {
                if let Some(i) = lock(&open).pop_front() {
                    lock(&state.requests)[i].status = Some(status);
                }
            }
            if to.write_all(chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

fn request_line(chunk: &[u8]) -> Option<(String, String)> {
    let line = chunk.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    if !matches!(method, "GET" | "PUT" | "POST" | "HEAD" | "DELETE") {
        return None;
    }
    let target = parts.next()?;
    parts.next().filter(|v| v.starts_with("HTTP/1"))?;
    let path = target.split('?').next().unwrap_or(target);
    Some((method.to_string(), path.to_string()))
}

fn status_line(chunk: &[u8]) -> Option<u16> {
    let rest = chunk.strip_prefix(b"HTTP/1.1 ")?;
    std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_status_lines_are_recognised() {
        assert_eq!(
            request_line(b"PUT /test/runs/r/run.json?x=1 HTTP/1.1\r\nHost: a\r\n"),
            Some(("PUT".into(), "/test/runs/r/run.json".into()))
        );
        assert_eq!(request_line(b"\x00\x01binary body"), None);
        assert_eq!(request_line(b"GET without version"), None);
        assert_eq!(
            status_line(b"HTTP/1.1 412 Precondition Failed\r\n"),
            Some(412)
        );
        assert_eq!(status_line(b"HTTP/1.1"), None);
    }
}
