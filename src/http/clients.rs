//! `server.max_connections_per_client`: how many connections one client address may hold.
//!
//! `server.max_connections` bounds everyone together, so one host opening connections as
//! fast as it can would take every slot. This bounds each address on its own. It is off by
//! default, since behind a proxy every client has the proxy's address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

pub(crate) struct ClientCounts {
    limit: u32,
    open: Mutex<HashMap<IpAddr, u32>>,
}

impl ClientCounts {
    /// `None` when `limit` is 0 (no limit): then nothing is counted at all.
    pub(crate) fn new(limit: u32) -> Option<Arc<ClientCounts>> {
        (limit > 0).then(|| {
            Arc::new(ClientCounts {
                limit,
                open: Mutex::new(HashMap::new()),
            })
        })
    }

    /// A place for one more connection from `ip`, or `None` when it holds its share.
    pub(crate) fn seat(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSeat> {
        let ip = canonical(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(ClientSeat {
            counts: self.clone(),
            ip,
        })
    }
}

/// An IPv4 client seen through a dual-stack socket (`::ffff:a.b.c.d`) counts as itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One connection counted against its address; dropped when the connection ends.
pub(crate) struct ClientSeat {
    counts: Arc<ClientCounts>,
    ip: IpAddr,
}

impl Drop for ClientSeat {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}
