//! Spreads client connections over the serving threads.
//!
//! Every serving thread accepts from one shared socket, and whichever thread is awake when
//! connections arrive takes them. A burst of connects (a load balancer warming its pool, an
//! SDK opening its connections) is drained by the first thread to wake, so with keep-alive
//! clients one thread can end up with all the connections and the others with none: the
//! benchmark saw 32 of 32 connections on one of two threads in about one run in four, a core
//! left 20 % idle and 10 % less throughput. So the thread that accepts a connection serves it
//! only if no other thread has fewer open; otherwise it hands the socket to the thread with
//! the fewest. The counts are the `poe_gateway_open_connections{thread}` gauges.
//!
//! A hand-off costs two `epoll_ctl` calls and a wake-up of the receiving thread, once per
//! connection. Requests never cross threads: a connection stays where it was placed.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::metrics::Metrics;

/// Open connections per serving thread, and a way to send each thread a connection.
struct Balancer {
    open: Box<[IntGauge]>,
    inboxes: Box<[mpsc::UnboundedSender<Handoff>]>,
}

/// A connection accepted on one thread for another, with its place in
/// `server.max_connections` and in its thread's count.
struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    seat: Seat,
}

/// A connection this thread serves, with what it holds while open: a place under the
/// connection cap and one in the thread's count. Drop them when the connection ends.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub slot: OwnedSemaphorePermit,
    pub seat: Seat,
}

/// One connection counted on `thread`; dropping it (when the connection ends, or when a
/// hand-off fails) takes it off the count.
pub struct Seat {
    balancer: Arc<Balancer>,
    thread: usize,
}

/// One lane for each of `threads` serving threads, sharing one set of counts: the
/// `poe_gateway_open_connections{thread}` gauges of `metrics`.
pub fn lanes(threads: usize, metrics: &Metrics) -> Vec<Lane> {
    let threads = threads.max(1);
    let (inboxes, receivers): (Vec<_>, Vec<_>) =
        (0..threads).map(|_| mpsc::unbounded_channel()).unzip();
    let open = (0..threads)
        .map(|i| {
            metrics
                .open_connections
                .with_label_values(&[i.to_string().as_str()])
        })
        .collect();
    let balancer = Arc::new(Balancer {
        open,
        inboxes: inboxes.into(),
    });
    receivers
        .into_iter()
        .enumerate()
        .map(|(index, inbox)| Lane {
            index,
            balancer: balancer.clone(),
            inbox,
        })
        .collect()
}

impl Balancer {
    /// Where a connection accepted on thread `here` is served, counted there: `here` unless
    /// another thread has fewer connections open (the first such, on a tie).
    fn place(self: &Arc<Self>, here: usize) -> Seat {
        let mut thread = here;
        let mut fewest = self.open[here].get();
        for (i, open) in self.open.iter().enumerate() {
            let n = open.get();
            if n < fewest {
                fewest = n;
                thread = i;
            }
        }
        self.open[thread].inc();
        Seat {
            balancer: self.clone(),
            thread,
        }
    }

    /// Sends a connection to its thread. If that thread has stopped (shutdown), the hand-off
    /// is dropped: the connection closes and leaves the counts.
    fn send(&self, handoff: Handoff) {
        let to = handoff.seat.thread;
        let _ = self.inboxes[to].send(handoff);
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.balancer.open[self.thread].dec();
    }
}

/// One serving thread's place among the others: its index, the shared counts, and the
/// connections other threads accepted for it.
pub struct Lane {
    index: usize,
    balancer: Arc<Balancer>,
    inbox: mpsc::UnboundedReceiver<Handoff>,
}

impl Lane {
    /// The next connection this thread serves: one another thread handed over, or one
    /// accepted here while no other thread has fewer open (any other is handed over on the
    /// way). Waits for room under `slots` before accepting, so at the cap new connections
    /// wait in the kernel's backlog. Cancel-safe: it only waits in the accept and the inbox.
    pub async fn next(
        &mut self,
        listener: &TcpListener,
        slots: &Arc<Semaphore>,
    ) -> std::io::Result<Accepted> {
        loop {
            tokio::select! {
                handoff = self.inbox.recv() => {
                    // The lane holds a sender to its own inbox, so it never closes.
                    let Some(Handoff { stream, peer, slot, seat }) = handoff else {
                        continue;
                    };
                    match TcpStream::from_std(stream) {
                        Ok(stream) => return Ok(Accepted { stream, peer, slot, seat }),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot register a handed-over connection");
                        }
                    }
                }
                (accepted, slot) = accept_one(listener, slots) => {
                    let (stream, peer) = accepted?;
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "set_nodelay failed");
                    }
                    let seat = self.balancer.place(self.index);
                    if seat.thread == self.index {
                        return Ok(Accepted { stream, peer, slot, seat });
                    }
                    match stream.into_std() {
                        Ok(stream) => self.balancer.send(Handoff { stream, peer, slot, seat }),
                        Err(e) => tracing::debug!(error = %e, "cannot hand a connection over"),
                    }
                }
            }
        }
    }
}

/// Waits for room under the connection cap, then for a connection.
async fn accept_one(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> (
    std::io::Result<(TcpStream, SocketAddr)>,
    OwnedSemaphorePermit,
) {
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    (listener.accept().await, slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each connection goes to the thread with the fewest open, whichever thread accepted it,
    /// and a thread that is no busier than any other keeps what it accepts.
    #[test]
    fn connections_go_to_the_least_busy_thread() {
        let metrics = Metrics::new();
        let lanes = lanes(2, &metrics);
        let b = lanes[0].balancer.clone();
        let open = |b: &Balancer| (b.open[0].get(), b.open[1].get());
        // A burst all accepted on thread 0 alternates between the threads.
        let mut seats: Vec<Seat> = (0..6).map(|_| b.place(0)).collect();
        let on: Vec<usize> = seats.iter().map(|s| s.thread).collect();
        assert_eq!(on, [0, 1, 0, 1, 0, 1]);
        assert_eq!(open(&b), (3, 3));
        // Thread 1's connections close: the next one goes there, whoever accepted it.
        seats.retain(|s| s.thread == 0);
        assert_eq!(open(&b), (3, 0));
        seats.push(b.place(0));
        assert_eq!(seats.last().map(|s| s.thread), Some(1));
        // A thread no busier than any other keeps what it accepts, a tie included.
        for _ in 0..3 {
            seats.push(b.place(1));
            assert_eq!(seats.last().map(|s| s.thread), Some(1));
        }
        assert_eq!(open(&b), (3, 4));
        assert_eq!(b.place(1).thread, 0, "thread 1 has more open than thread 0");
        assert_eq!(open(&b), (3, 4), "a dropped seat is uncounted");
        drop(seats);
        assert_eq!(open(&b), (0, 0));
    }
}
