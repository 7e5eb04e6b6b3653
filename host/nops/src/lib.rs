//! The NOPS kernel as a library: configuration and the wiring of store, registry and HTTP edge.
//! The `nops` binary is a thin command-line shell over it; integration tests use it to run
//! a whole kernel in process.

pub mod config;
pub mod dispatch_http;
pub mod jwks_http;
pub mod kernel;
pub mod plugins_dir;
