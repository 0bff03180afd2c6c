//! Conversation sessions for the MCP tools.
//!
//! A session is the history of one conversation in the OpenAI message format: an optional
//! system message, then user and assistant turns. Sessions live in moka with an idle TTL,
//! weighed by their bytes (`max_sessions_bytes` in all), and counted per caller
//! (`max_sessions_per_key`) and in all (`max_sessions`). Each keeps at most
//! `max_session_messages` messages and `max_session_bytes` bytes, trimming its oldest turns
//! (never the system message).
//!
//! Ids are random UUID v4s, and every session is keyed by its caller's [`Scope`] as well as
//! its id: a caller asking for another caller's session finds nothing, exactly as for an id
//! that never existed.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

use crate::config::McpPolicy;
use crate::gateway::{Caller, Credential};

/// Who owns a session: a hash of the caller's key id or credential, never the key itself.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope([u8; 32]);

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Scope({:02x}{:02x}{:02x}{:02x}..)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

impl Scope {
    pub fn of(caller: &Caller) -> Scope {
        let mut h = Sha256::new();
        h.update(b"poe-gateway mcp session scope\0");
        match (&caller.key_id, &caller.credential) {
            (Some(id), _) => {
                h.update(b"key\0");
                h.update(id.as_bytes());
            }
            (None, Credential::Server) => h.update(b"server\0"),
            (None, Credential::Poe(secret)) => {
                h.update(b"poe\0");
                h.update(secret.expose().as_bytes());
            }
        }
        Scope(h.finalize().into())
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    max_messages: usize,
    max_bytes: usize,
}

/// All sessions of one gateway.
pub struct Sessions {
    cache: Cache<(Scope, Uuid), Stored>,
    /// Each caller's live sessions, least recently used first. The cache's eviction listener
    /// takes out what expires or is evicted, so the counts are of live sessions only.
    index: Arc<std::sync::Mutex<Index>>,
    per_scope: usize,
    max_sessions: usize,
    limits: Limits,
}

/// A stored session: its history, and its size when last stored, which is its weight in
/// the cache (`mcp.max_sessions_bytes` bounds the sum).
#[derive(Clone)]
struct Stored {
    history: Arc<Mutex<History>>,
    weight: u32,
}

#[derive(Default)]
struct Index {
    scopes: HashMap<Scope, VecDeque<Uuid>>,
}

impl Index {
    fn remove(&mut self, scope: Scope, id: Uuid) {
        if let Some(ids) = self.scopes.get_mut(&scope)
            && let Some(at) = ids.iter().position(|i| *i == id)
        {
            ids.remove(at);
            self.remove_if_empty(scope);
        }
    }

    /// Makes a session its caller's most recently used.
    fn touch(&mut self, scope: Scope, id: Uuid) {
        if let Some(ids) = self.scopes.get_mut(&scope)
            && let Some(at) = ids.iter().position(|i| *i == id)
        {
            ids.remove(at);
            ids.push_back(id);
        }
    }

    /// Adds a new session and takes out the ones it pushes past the caps: the caller's own
    /// least recently used past `per_scope`, and past `max` in all, the least recently used
    /// of whichever caller holds the most.
    fn add(&mut self, scope: Scope, id: Uuid, per_scope: usize, max: usize) -> Vec<(Scope, Uuid)> {
        let ids = self.scopes.entry(scope).or_default();
        ids.push_back(id);
        let over = ids.len().saturating_sub(per_scope);
        let mut out: Vec<(Scope, Uuid)> = ids.drain(..over).map(|old| (scope, old)).collect();
        // One new session puts the total at most one past `max`: this runs once at most.
        while self.scopes.values().map(VecDeque::len).sum::<usize>() > max {
            let Some((&busiest, _)) = self.scopes.iter().max_by_key(|(_, ids)| ids.len()) else {
                break;
            };
            if let Some(old) = self.scopes.get_mut(&busiest).and_then(VecDeque::pop_front) {
                out.push((busiest, old));
            }
            self.remove_if_empty(busiest);
        }
        out
    }

    fn remove_if_empty(&mut self, scope: Scope) {
        if self.scopes.get(&scope).is_some_and(VecDeque::is_empty) {
            self.scopes.remove(&scope);
        }
    }
}

/// A session held for one tool call: its history is locked until the handle is dropped, so
/// two calls on one session take turns instead of interleaving.
pub struct Session {
    pub id: Uuid,
    key: (Scope, Uuid),
    history: OwnedMutexGuard<History>,
    shared: Arc<Mutex<History>>,
    is_new: bool,
}

impl Session {
    pub fn history(&self) -> &History {
        &self.history
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// Not a UUID.
    Malformed(String),
    /// Unknown, expired, cleared, or another caller's.
    Unknown(String),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Malformed(id) => write!(
                f,
                "session_id {id:?} is not a session id (a UUID returned by an earlier call); \
                 omit session_id to start a new session"
            ),
            SessionError::Unknown(id) => write!(
                f,
                "unknown session_id {id}: it may have expired (sessions end after a period \
                 without use) or been cleared; omit session_id to start a new session"
            ),
        }
    }
}

impl Sessions {
    pub fn new(policy: &McpPolicy) -> Sessions {
        let index: Arc<std::sync::Mutex<Index>> = Arc::default();
        let listener = index.clone();
        Sessions {
            cache: Cache::builder()
                .max_capacity(policy.max_sessions_bytes.0)
                .weigher(|_, v: &Stored| v.weight)
                // New sessions are always kept; the ones unused longest make room.
                .eviction_policy(EvictionPolicy::lru())
                .time_to_idle(policy.session_ttl)
                .eviction_listener(move |key: Arc<(Scope, Uuid)>, _, cause| {
                    if cause != RemovalCause::Replaced {
                        let (scope, id) = *key;
                        listener.lock().expect("session index").remove(scope, id);
                    }
                })
                .build(),
            index,
            per_scope: policy.max_sessions_per_key,
            max_sessions: usize::try_from(policy.max_sessions).unwrap_or(usize::MAX),
            limits: Limits {
                max_messages: policy.max_session_messages,
                max_bytes: usize::try_from(policy.max_session_bytes.0).unwrap_or(usize::MAX),
            },
        }
    }

    /// Opens `id` for `scope`, or a new session (with a fresh id, saved only once a turn
    /// succeeds) when `id` is `None`.
    pub async fn open(&self, scope: Scope, id: Option<&str>) -> Result<Session, SessionError> {
        let Some(raw) = id else {
            let id = Uuid::new_v4();
            let shared = Arc::new(Mutex::new(History::default()));
            return Ok(Session {
                id,
                key: (scope, id),
                history: shared.clone().lock_owned().await,
                shared,
                is_new: true,
            });
        };
        let id = parse_id(raw)?;
        let shared = self
            .cache
            .get(&(scope, id))
            .await
            .ok_or_else(|| SessionError::Unknown(id.to_string()))?
            .history;
        self.index.lock().expect("session index").touch(scope, id);
        Ok(Session {
            id,
            key: (scope, id),
            history: shared.clone().lock_owned().await,
            shared,
            is_new: false,
        })
    }

    /// Records a completed turn, trims the history to the limits, and keeps a new session.
    pub async fn commit(
        &self,
        mut session: Session,
        system: Option<String>,
        user: Value,
        assistant: Value,
    ) {
        if let Some(system) = system {
            session.history.system = Some(system);
        }
        session.history.push_turn(user, assistant, self.limits);
        let weight = session.history.weight();
        let Session {
            key,
            history,
            shared,
            is_new,
            ..
        } = session;
        drop(history);
        let stored = Stored {
            history: shared,
            weight,
        };
        if is_new {
            let (scope, id) = key;
            // Indexed before it is stored: the cache may evict it at once, and its listener
            // must find it.
            let over = self.index.lock().expect("session index").add(
                scope,
                id,
                self.per_scope,
                self.max_sessions,
            );
            self.cache.insert(key, stored).await;
            // Outside the index lock: the eviction listener takes it.
            for old in over {
                self.cache.invalidate(&old).await;
            }
        } else {
            // Stored again for its new weight, unless it ended (cleared, evicted) meanwhile:
            // putting it back then would bring it back unindexed.
            let _ = self
                .cache
                .entry(key)
                .and_compute_with(|found| {
                    let op = match found {
                        Some(_) => Op::Put(stored),
                        None => Op::Nop,
                    };
                    std::future::ready(op)
                })
                .await;
        }
    }

    /// Forgets a session. `Ok(false)` when there was none (for this caller).
    pub async fn clear(&self, scope: Scope, id: &str) -> Result<bool, SessionError> {
        let id = parse_id(id)?;
        Ok(self.cache.remove(&(scope, id)).await.is_some())
    }

    /// Sessions held now (after pending evictions), for tests and metrics.
    pub async fn count(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }
}

fn parse_id(raw: &str) -> Result<Uuid, SessionError> {
    let shown: String = raw.chars().take(64).collect();
    Uuid::parse_str(raw.trim()).map_err(|_| SessionError::Malformed(shown))
}

/// A session's history.
#[derive(Debug, Default)]
pub struct History {
    system: Option<String>,
    turns: VecDeque<Turn>,
    bytes: usize,
}

#[derive(Debug)]
struct Turn {
    messages: [Value; 2],
    bytes: usize,
}

impl Turn {
    fn new(user: Value, assistant: Value) -> Turn {
        let bytes = json_len(&user) + json_len(&assistant);
        Turn {
            messages: [user, assistant],
            bytes,
        }
    }
}

impl History {
    /// The messages for the next request: the system message (`system` replaces the stored
    /// one), the kept turns, then `user`.
    pub fn messages(&self, system: Option<&str>, user: Value) -> Vec<Value> {
        let mut out = Vec::with_capacity(2 + 2 * self.turns.len());
        if let Some(s) = system.or(self.system.as_deref()) {
            out.push(json!({"role": "system", "content": s}));
        }
        for turn in &self.turns {
            out.extend(turn.messages.iter().cloned());
        }
        out.push(user);
        out
    }

    /// Number of user and assistant messages kept.
    pub fn len(&self) -> usize {
        self.turns.len() * 2
    }

    pub fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

    /// Its size for the cache's byte cap: the kept turns, the system message, and a little
    /// for the entry itself.
    fn weight(&self) -> u32 {
        let bytes = self.bytes + self.system.as_ref().map_or(0, String::len) + 512;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    fn push_turn(&mut self, user: Value, assistant: Value, limits: Limits) {
        let mut turn = Turn::new(user, assistant);
        if turn.bytes > limits.max_bytes {
            // Too big to keep whole: keep the words, drop the inline attachment data.
            strip_inline_attachments(&mut turn.messages[0]);
            turn.bytes = json_len(&turn.messages[0]) + json_len(&turn.messages[1]);
        }
        self.bytes += turn.bytes;
        self.turns.push_back(turn);
        while !self.turns.is_empty()
            && (self.turns.len() * 2 > limits.max_messages || self.bytes > limits.max_bytes)
        {
            if let Some(old) = self.turns.pop_front() {
                self.bytes -= old.bytes;
            }
        }
    }
}

/// Replaces data-URL attachment parts of a user message by a short note.
fn strip_inline_attachments(message: &mut Value) {
    let Some(parts) = message.get_mut("content").and_then(Value::as_array_mut) else {
        return;
    };
    for part in parts.iter_mut() {
        let (kind, url) = match part.get("type").and_then(Value::as_str) {
            Some("image_url") => ("an image", part.pointer("/image_url/url")),
            Some("file") => ("a file", part.pointer("/file/file_data")),
            _ => continue,
        };
        if !url
            .and_then(Value::as_str)
            .is_some_and(|u| u.starts_with("data:"))
        {
            continue;
        }
        let name = part
            .pointer("/file/filename")
            .and_then(Value::as_str)
            .map(|n| format!(" `{n}`"))
            .unwrap_or_default();
        *part = json!({
            "type": "text",
            "text": format!(
                "[{kind} attachment{name} was sent with this message; it is too large to keep in the session (mcp.max_session_bytes)]"
            ),
        });
    }
}

/// Serialised size of a JSON value, without building the string.
fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Secret;

    fn caller(cred: Credential) -> Caller {
        let mut c = Caller::server(Arc::from("t"));
        c.credential = cred;
        c
    }

    fn user(s: &str) -> Value {
        json!({"role": "user", "content": s})
    }

    fn assistant(s: &str) -> Value {
        json!({"role": "assistant", "content": s})
    }

    #[test]
    fn scopes_differ_by_credential() {
        let a = Scope::of(&caller(Credential::Poe(Secret::new("key-a"))));
        let b = Scope::of(&caller(Credential::Poe(Secret::new("key-b"))));
        let s = Scope::of(&caller(Credential::Server));
        assert_ne!(a, b);
        assert_ne!(a, s);
        assert_eq!(a, Scope::of(&caller(Credential::Poe(Secret::new("key-a")))));
        assert!(!format!("{a:?}").contains("key-a"));
    }

    #[tokio::test]
    async fn sessions_are_scoped_and_trimmed() {
        let policy = McpPolicy {
            max_session_messages: 4,
            ..McpPolicy::default()
        };
        let sessions = Sessions::new(&policy);
        let me = Scope::of(&caller(Credential::Poe(Secret::new("me"))));
        let other = Scope::of(&caller(Credential::Poe(Secret::new("other"))));

        let s = sessions.open(me, None).await.unwrap();
        let id = s.id.to_string();
        sessions
            .commit(s, Some("be brief".into()), user("1"), assistant("one"))
            .await;
        for n in ["2", "3"] {
            let s = sessions.open(me, Some(&id)).await.unwrap();
            sessions.commit(s, None, user(n), assistant(n)).await;
        }
        let s = sessions.open(me, Some(&id)).await.unwrap();
        let msgs = s.history().messages(None, user("4"));
        // system + two kept turns (the first was trimmed) + the new message.
        assert_eq!(msgs.len(), 6, "{msgs:?}");
        assert_eq!(msgs[0]["role"], "system");
        assert_eq!(msgs[1]["content"], "2");
        drop(s);

        assert!(matches!(
            sessions.open(other, Some(&id)).await,
            Err(SessionError::Unknown(_))
        ));
        assert!(!sessions.clear(other, &id).await.unwrap());
        assert!(sessions.clear(me, &id).await.unwrap());
        assert!(matches!(
            sessions.open(me, Some(&id)).await,
            Err(SessionError::Unknown(_))
        ));
        assert!(matches!(
            sessions.open(me, Some("../etc")).await,
            Err(SessionError::Malformed(_))
        ));
    }

    async fn new_session(sessions: &Sessions, scope: Scope, text: &str) -> String {
        let s = sessions.open(scope, None).await.unwrap();
        let id = s.id.to_string();
        sessions.commit(s, None, user(text), assistant("ok")).await;
        id
    }

    async fn alive(sessions: &Sessions, scope: Scope, id: &str) -> bool {
        sessions.open(scope, Some(id)).await.is_ok()
    }

    #[tokio::test]
    async fn past_max_sessions_the_busiest_caller_gives_way() {
        let policy = McpPolicy {
            max_sessions: 3,
            ..McpPolicy::default()
        };
        let sessions = Sessions::new(&policy);
        let a = Scope::of(&caller(Credential::Poe(Secret::new("a"))));
        let b = Scope::of(&caller(Credential::Poe(Secret::new("b"))));
        let a1 = new_session(&sessions, a, "1").await;
        let a2 = new_session(&sessions, a, "2").await;
        let a3 = new_session(&sessions, a, "3").await;
        let b1 = new_session(&sessions, b, "1").await;
        assert_eq!(sessions.count().await, 3);
        assert!(!alive(&sessions, a, &a1).await);
        for (scope, id) in [(a, &a2), (a, &a3), (b, &b1)] {
            assert!(alive(&sessions, scope, id).await, "{id}");
        }
    }

    #[tokio::test]
    async fn all_history_together_is_capped_by_bytes() {
        let policy = McpPolicy {
            max_session_bytes: crate::config::ByteSize(10_000),
            max_sessions_bytes: crate::config::ByteSize(20_000),
            ..McpPolicy::default()
        };
        let sessions = Sessions::new(&policy);
        let me = Scope::of(&caller(Credential::Poe(Secret::new("me"))));
        let big = "x".repeat(4_000);
        let mut ids = Vec::new();
        for _ in 0..6 {
            ids.push(new_session(&sessions, me, &big).await);
        }
        // About 4.6 KB each: four fit in 20,000 bytes, and the oldest went first.
        assert_eq!(sessions.count().await, 4);
        assert!(!alive(&sessions, me, &ids[0]).await);
        assert!(!alive(&sessions, me, &ids[1]).await);
        assert!(alive(&sessions, me, &ids[5]).await);

        // A session that grows is weighed again: another makes room for it.
        let s = sessions.open(me, Some(&ids[5])).await.unwrap();
        sessions.commit(s, None, user(&big), assistant("ok")).await;
        assert_eq!(sessions.count().await, 3);
        assert!(alive(&sessions, me, &ids[5]).await);
    }

    #[test]
    fn oversized_attachments_are_not_kept() {
        let mut h = History::default();
        let limits = Limits {
            max_messages: 10,
            max_bytes: 600,
        };
        let big = format!("data:image/png;base64,{}", "A".repeat(1000));
        let msg = json!({"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": big}}
        ]});
        h.push_turn(msg, assistant("a cat"), limits);
        assert_eq!(h.len(), 2);
        assert!(h.bytes <= 600);
        let msgs = h.messages(None, user("next"));
        assert_eq!(msgs[0]["content"][1]["type"], "text");
    }
}
