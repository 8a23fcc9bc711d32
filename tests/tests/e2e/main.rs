//! The end-to-end tests: the real `signpost` and `signpost-control-plane`
//! binaries started on loopback (or, for what crosses hosts, in network
//! namespaces), asked as users and their programs ask them. One test
//! binary with a module per area, so that the whole suite links once.

mod acl;
mod api;
mod checks;
mod commands;
mod console;
mod dns;
mod files;
mod fleet;
#[cfg(feature = "etcd")]
mod ha;
mod hardening;
mod kv;
mod mesh;
mod monitoring;
mod persistence_cli;
mod proxy;
mod reload;
mod restart;
mod smoke;
mod sync;
