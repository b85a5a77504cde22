//! A cap on the connections one of trimrun's servers (the control socket, `/metrics`)
//! holds open, that silent clients cannot use to lock others out.
//!
//! Each connection holds a [`ConnSlot`] and says when it is idle (waiting for a request)
//! and when it is busy (a request is being answered). When the cap is reached, a new
//! connection evicts the connection that has been idle the longest: 64 clients that
//! connect and say nothing cost the next `trimrun status` nothing. Only when every
//! connection is busy is a new one turned away. Idle connections also time out on their
//! own (the servers' read timeouts), so nothing is held for long either way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug)]
struct Entry {
    /// Since when the connection has been waiting for a request; None while busy.
    idle_since: Option<Instant>,
    evict: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    conns: HashMap<u64, Entry>,
    evicted: u64,
}

/// The set of open connections of one server, at most `max` of them.
#[derive(Debug, Clone)]
pub struct ConnLimiter {
    inner: Arc<Mutex<Inner>>,
    max: usize,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnSlot {
    id: u64,
    inner: Arc<Mutex<Inner>>,
    evict: Arc<Notify>,
}

impl ConnLimiter {
    pub fn new(max: usize) -> Self {
        ConnLimiter {
            inner: Arc::default(),
            max: max.max(1),
        }
    }

    /// Admit a new connection (idle until it says otherwise), evicting the longest-idle
    /// one if the cap is reached. None when every connection is busy.
    pub fn admit(&self) -> Option<ConnSlot> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.conns.len() >= self.max {
            let victim = g
                .conns
                .iter()
                .filter_map(|(id, e)| e.idle_since.map(|t| (t, *id)))
                .min()
                .map(|(_, id)| id)?;
            if let Some(e) = g.conns.remove(&victim) {
                e.evict.notify_one();
                g.evicted += 1;
            }
        }
        let id = g.next;
        g.next += 1;
        let evict = Arc::new(Notify::new());
        g.conns.insert(
            id,
            Entry {
                idle_since: Some(Instant::now()),
                evict: evict.clone(),
            },
        );
        Some(ConnSlot {
            id,
            inner: self.inner.clone(),
            evict,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .conns
            .len()
    }

    /// Connections evicted so far to make room.
    pub fn evicted(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).evicted
    }
}

impl ConnSlot {
    fn set(&self, idle: bool) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = g.conns.get_mut(&self.id) {
            e.idle_since = idle.then(Instant::now);
        }
    }

    /// Waiting for the next request: may be evicted from now on.
    pub fn idle(&self) {
        self.set(true);
    }

    /// Answering a request: not evicted until it is idle again.
    pub fn busy(&self) {
        self.set(false);
    }

    /// Resolves when a newer connection took this one's place.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.conns.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_set_of_idle_connections_makes_room_for_a_new_one() {
        let l = ConnLimiter::new(3);
        let a = l.admit().unwrap();
        tokio::task::yield_now().await;
        let b = l.admit().unwrap();
        let c = l.admit().unwrap();
        b.busy();
        c.busy();
        // `a` is the only idle one: it goes.
        let d = l
            .admit()
            .expect("room made by evicting the idle connection");
        tokio::time::timeout(std::time::Duration::from_secs(5), a.evicted())
            .await
            .expect("the idle connection was told to go");
        assert_eq!(l.open(), 3);
        assert_eq!(l.evicted(), 1);
        // All busy: the next one is turned away.
        d.busy();
        assert!(l.admit().is_none());
        drop(b);
        assert!(l.admit().is_some());
    }

    #[tokio::test]
    async fn the_longest_idle_connection_is_the_one_evicted() {
        let l = ConnLimiter::new(2);
        let old = l.admit().unwrap();
        let young = l.admit().unwrap();
        old.busy();
        old.idle(); // idle again, after `young` was admitted: now the younger idle
        let _new = l.admit().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), young.evicted())
            .await
            .expect("the connection idle the longest goes first");
        drop(old);
    }
}
