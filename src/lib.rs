//! poe-gateway: an OpenAI-compatible streaming gateway in front of Poe's API.
//!
//! The modules follow a request's path: [`http`] (the front end) calls the [`gateway`] core,
//! which calls [`upstream`] (Poe). [`config`] loads the policy that shapes all of them.

pub mod config;
pub mod error;
pub mod gateway;
pub mod http;
pub mod json_log;
pub mod ledger;
pub mod log_buffer;
pub mod mcp;
pub mod metrics;
pub mod shared_state;
pub mod telemetry;
pub mod upstream;

pub use config::Policy;
pub use error::GatewayError;
pub use gateway::Gateway;
