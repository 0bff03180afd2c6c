//! The policy parser (`poe_gateway::config::parse`, src/config/mod.rs) on arbitrary text.
//!
//! Input: UTF-8 policy text; after a NUL, `NAME=VALUE` env overrides, NUL-separated
//! (e.g. `POE_GATEWAY_TIMEOUTS__IDLE=0s`), so the env path is fuzzed too.
//!
//! Checked: never a panic; an error names the file and gives a reason, and names the key
//! unless the text is not TOML at all (that error has a line number instead) or the bad key
//! is the empty `''`; an env var named by an error was set; parsing is repeatable; an
//! accepted policy formats with `Debug` (which redacts secrets).

#![no_main]

use libfuzzer_sys::fuzz_target;
use poe_gateway::config;

const FILE: &str = "fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let (text, env) = input.split_once('\0').unwrap_or((input, ""));
    let env: Vec<(String, String)> = env
        .split('\0')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match config::parse(FILE, text, env.clone()) {
        Ok(policy) => {
            let _ = format!("{policy:?}");
            let _ = policy.auth_mode();
            assert!(
                config::parse(FILE, text, env).is_ok(),
                "parsing is not repeatable"
            );
        }
        Err(e) => {
            assert_eq!(e.file, FILE);
            assert!(
                !e.reason.trim().is_empty(),
                "an error without a reason: {e:?}"
            );
            // No key for text that is not TOML at all, or when the bad key is the empty `''`.
            if !e.reason.contains("invalid TOML") && !e.reason.starts_with("unknown field ``") {
                assert!(!e.key.is_empty(), "an error without a key: {e:?}");
            }
            if let Some(var) = &e.env {
                assert!(
                    env.iter().any(|(k, _)| k == var),
                    "{e:?} names an unset var"
                );
            }
            let shown = e.to_string();
            assert!(shown.starts_with(FILE) && shown.contains(&e.reason));
            assert_eq!(config::parse(FILE, text, env).err(), Some(e));
        }
    }
});
