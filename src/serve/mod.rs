//! What walsync serves to others while `watch` runs, read-only to the rest:
//! the status board (`status`), the HTTP listener and its client (`http`),
//! the status page (`page`), the limits every listener shares (`listen`), the control socket of
//! `walsync sync` (`control`), and sidecar mode (`sidecar`).

pub(crate) mod control;
pub(crate) mod http;
pub(crate) mod listen;
pub mod page;
pub mod sidecar;
pub mod status;
