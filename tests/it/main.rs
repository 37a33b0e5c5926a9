//! Every integration test, in one binary (linked once), over the shared
//! harness in `common`: fresh stores on every backend (a local directory,
//! an S3 protocol server), the real `walsync` binary, apps in their own
//! processes, and a fault-injecting proxy.

mod common;

mod app_process;
mod browser;
mod cli;
mod fleet;
mod litestream;
mod mirrors;
mod replication;
mod sidecar;
mod storage;
