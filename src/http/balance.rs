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
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::metrics::Metrics;

/// Open connections per serving thread, and a way to send each thread a connection.
pub(crate) struct Balancer {
    open: Box<[IntGauge]>,
    inboxes: Box<[mpsc::UnboundedSender<Handoff>]>,
}

/// A connection accepted on one thread for another, with its place in
/// `server.max_connections` and in its thread's count.
pub(crate) struct Handoff {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub slot: OwnedSemaphorePermit,
    pub seat: Seat,
}

/// One connection counted on `thread`; dropping it (when the connection ends, or when a
/// hand-off fails) takes it off the count.
pub(crate) struct Seat {
    balancer: Arc<Balancer>,
    thread: usize,
}

impl Balancer {
    /// A balancer for `threads` serving threads, and each thread's inbox.
    pub fn new(threads: usize, metrics: &Metrics) -> (Arc<Balancer>, Vec<Inbox>) {
        let threads = threads.max(1);
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..threads).map(|_| mpsc::unbounded_channel()).unzip();
        let open = (0..threads)
            .map(|i| {
                let g = metrics
                    .open_connections
                    .with_label_values(&[i.to_string().as_str()]);
                g.set(0);
                g
            })
            .collect();
        let balancer = Arc::new(Balancer {
            open,
            inboxes: inboxes.into(),
        });
        (balancer, receivers.into_iter().map(Inbox).collect())
    }

    /// Where a connection accepted on thread `here` is served, counted there: `here` unless
    /// another thread has fewer connections open (the first such, on a tie).
    pub fn place(self: &Arc<Self>, here: usize) -> Seat {
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

    /// Sends a connection to its thread. Fails only once that thread has stopped accepting
    /// (shutdown); the connection is then closed and uncounted as the hand-off drops.
    pub fn send(&self, handoff: Handoff) -> Result<(), Handoff> {
        let to = handoff.seat.thread;
        self.inboxes[to].send(handoff).map_err(|e| e.0)
    }
}

impl Seat {
    pub fn thread(&self) -> usize {
        self.thread
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.balancer.open[self.thread].dec();
    }
}

/// The connections other threads accepted for this one.
pub(crate) struct Inbox(mpsc::UnboundedReceiver<Handoff>);

impl Inbox {
    /// The next connection handed over. Pending for ever once every sender is gone, so it
    /// can sit in a `select!` beside the accept.
    pub async fn recv(&mut self) -> Handoff {
        match self.0.recv().await {
            Some(h) => h,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each connection goes to the thread with the fewest open, whichever thread accepted it,
    /// and a thread that is no busier than any other keeps what it accepts.
    #[test]
    fn connections_go_to_the_least_busy_thread() {
        let metrics = Metrics::new();
        let (b, _inboxes) = Balancer::new(2, &metrics);
        let open = |b: &Balancer| (b.open[0].get(), b.open[1].get());
        // A burst all accepted on thread 0 alternates between the threads.
        let mut seats: Vec<Seat> = (0..6).map(|_| b.place(0)).collect();
        let on: Vec<usize> = seats.iter().map(Seat::thread).collect();
        assert_eq!(on, [0, 1, 0, 1, 0, 1]);
        assert_eq!(open(&b), (3, 3));
        // Thread 1's connections close: the next one goes there, whoever accepted it.
        seats.retain(|s| s.thread() == 0);
        assert_eq!(open(&b), (3, 0));
        seats.push(b.place(0));
        assert_eq!(seats.last().map(Seat::thread), Some(1));
        // A thread no busier than any other keeps what it accepts, a tie included.
        for _ in 0..3 {
            seats.push(b.place(1));
            assert_eq!(seats.last().map(Seat::thread), Some(1));
        }
        assert_eq!(open(&b), (3, 4));
        assert_eq!(
            b.place(1).thread(),
            0,
            "thread 1 has more open than thread 0"
        );
        assert_eq!(open(&b), (3, 4), "a dropped seat is uncounted");
        drop(seats);
        assert_eq!(open(&b), (0, 0));
    }
}
