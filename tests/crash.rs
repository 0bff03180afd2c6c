//! Crash safety of the ledger: the real binary is killed with SIGKILL while serving, and every
//! request that finished more than a second before is in the ledger afterwards.

mod support;

use std::time::Duration;

use poe_gateway::ledger::Store;
use support::*;

#[tokio::test]
async fn kill_9_loses_nothing_older_than_a_second() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.set_fallback(Reply::completion("gpt-5", "ok"));
        let (mut child, gw) = spawn_binary(&mut binary_command(&up.url(), &db));

        const N: usize = 25;
        for _ in 0..N {
            let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
            assert_eq!(resp.status(), 200);
            let _ = body_bytes(resp).await;
        }
        // Finished more than a second ago...
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // ...then the process dies without any chance to flush.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success());

        let store = Store::open(&db).await.unwrap();
        let r = store.report(&everything()).await.unwrap();
        assert_eq!(r.totals.requests, N as i64, "{db}");
        assert_eq!(r.totals.prompt_tokens, 7 * N as i64, "{db}");
    }
}
