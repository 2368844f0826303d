//! The one integration-test binary. Every module starts real servers on
//! loopback with real TLS, redb in a temp dir and real WebSocket clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod admin;
mod backpressure;
mod backup;
mod burst;
mod chat;
mod client;
mod closing;
mod cluster;
mod cluster_bus;
mod cluster_failover;
mod cluster_store;
mod config_refusals;
mod dashboard;
mod demo;
mod deploy;
mod disk;
mod drain;
mod fuzz_corpus;
mod gateway;
mod loadtest;
mod loadtest_failover;
mod logs;
mod module_graph;
mod natsd;
mod presence;
mod requests;
mod retention;
mod sdk;
mod security;
mod shutdown;
mod startup;
