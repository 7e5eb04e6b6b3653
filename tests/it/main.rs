//! Integration tests of the NOPS kernel: one binary, one module per area.
//!
//! Most tests drive the real router in process (`Router::oneshot`) against every configured
//! backend: SQLite always, PostgreSQL when `NOPS_TEST_DATABASE_URL` is set (required under
//! `CI=true`). Tests in `process` run the real `nops` binary.

mod agents;
mod attacks;
mod bad_input;
mod bus;
mod chaos;
mod dispatch;
mod events;
mod fleet;
mod hardening;
mod health;
mod heartbeat;
mod idempotency;
mod identity;
mod lifecycle;
mod nats_client;
mod openapi;
mod outage;
mod plugin_api;
mod plugin_store;
mod plugins;
mod process;
mod ratelimit;
mod routing;
mod slo;
mod support;
