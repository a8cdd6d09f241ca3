//! The one integration test binary: real Postgres and Redis servers owned by the harness.

mod e2e;
mod sidecar;
mod support;
