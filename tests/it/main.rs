//! The one integration-test binary. Every module starts real servers on
//! loopback with real TLS, redb in a temp dir and real WebSocket clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod admin;
mod backpressure;
mod chat;
mod dashboard;
mod demo;
mod fuzz_corpus;
mod gateway;
mod loadtest;
mod logs;
mod sdk;
mod security;
mod shutdown;
