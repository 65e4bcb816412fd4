//! A TCP proxy that delays every chunk by a random 0..=`max` (the kernels ferry is tested on
//! have no netem): jitter for the manager scenarios.
//!
//! Each accepted connection gets an upstream connection and, per direction, a reader thread
//! that stamps each chunk with its delivery time and a writer thread that sleeps until then.
//! Delivery times never go backwards (`max(now + delay, previous)`), so each direction keeps
//! its byte order, as TCP must; a chunk waits at most `max` after its predecessor was due.
//! EOF on one side shuts down the write half of the other, once the queued chunks are out.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// A listening proxy; stops accepting and cuts its connections on drop.
#[derive(Debug)]
pub struct JitterProxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    /// Chunks forwarded, both directions (proof that traffic went through it).
    pub chunks: Arc<AtomicU64>,
}

impl JitterProxy {
    /// Listens on `listen` (port 0: any) and forwards to `upstream`.
    pub fn start(listen: &str, upstream: &str, max: Duration, seed: u64) -> JitterProxy {
        let listener = TcpListener::bind(listen).expect("proxy bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy address");
        let upstream: SocketAddr = upstream.parse().expect("upstream address");
        let proxy = JitterProxy {
            addr,
            stop: Arc::new(AtomicBool::new(false)),
            streams: Arc::new(Mutex::new(Vec::new())),
            chunks: Arc::new(AtomicU64::new(0)),
        };
        let (stop, streams, chunks) = (
            proxy.stop.clone(),
            proxy.streams.clone(),
            proxy.chunks.clone(),
        );
        std::thread::spawn(move || {
            let mut prng = SplitMix64(seed);
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) =
                            TcpStream::connect_timeout(&upstream, Duration::from_secs(1))
                        else {
                            continue; // the client sees a closed connection
                        };
                        let _ = client.set_nonblocking(false);
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                            streams.lock().unwrap().extend([a, b]);
                        }
                        for (from, to) in [(&client, &server), (&server, &client)] {
                            let (from, to) = (
                                from.try_clone().expect("clone"),
                                to.try_clone().expect("clone"),
                            );
                            pump(from, to, max, prng.next(), chunks.clone());
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        proxy
    }
}

impl Drop for JitterProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// One direction: `from` to `to`, each chunk delayed.
fn pump(mut from: TcpStream, mut to: TcpStream, max: Duration, seed: u64, chunks: Arc<AtomicU64>) {
    let (tx, rx) = mpsc::channel::<Option<(Instant, Vec<u8>)>>();
    std::thread::spawn(move || {
        let mut prng = SplitMix64(seed);
        let max_us = u64::try_from(max.as_micros()).expect("delay fits");
        let mut due = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let delay = Duration::from_micros(prng.next() % (max_us + 1));
                    due = due.max(Instant::now() + delay);
                    if tx.send(Some((due, buf[..n].to_vec()))).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(None);
    });
    std::thread::spawn(move || {
        while let Ok(Some((due, chunk))) = rx.recv() {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            chunks.fetch_add(1, Ordering::Relaxed);
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// SplitMix64: the delays need no quality, only no dependency.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
