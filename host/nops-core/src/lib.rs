//! Domain types, services and capability traits of the NOPS kernel.
//!
//! This crate is the centre of the kernel: every other crate depends on it and it depends on
//! none of them. It knows agents, heartbeats, the TTL lifecycle, principals and API keys, and
//! it names the capabilities it needs from the outside world as traits ([`store::Store`],
//! [`clock::Clock`]). It never knows HTTP, SQL or WebAssembly.

pub mod agent;
pub mod auth;
pub mod authz;
pub mod bus;
pub mod chaos;
pub mod clock;
pub mod degraded;
pub mod dispatch;
pub mod error;
pub mod events;
pub mod health;
pub mod metrics;
pub mod outbox;
pub mod plugin;
pub mod registry;
pub mod routing;
pub mod slo;
pub mod store;
pub mod tenant;

pub use error::{CoreError, CoreResult};
