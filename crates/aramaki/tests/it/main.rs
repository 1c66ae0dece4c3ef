#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! Integration tests: one binary, modules by domain. Storage-touching tests
//! run on SQLite and, when ARAMAKI_TEST_POSTGRES_URL is set, on PostgreSQL.

mod support;

mod access;
mod actions;
mod actions_e2e;
mod actions_pages;
mod agent_e2e;
mod agent_integrity;
mod agent_trust;
mod auth;
mod bad_input;
mod binary;
mod browser;
mod demo;
mod federation;
mod federation_e2e;
mod federation_faults;
mod federation_links;
mod federation_pages;
mod federation_tls;
mod http_hardening;
mod monitoring;
mod monitoring_pages;
mod nul_frames;
mod openapi;
mod pages;
mod properties;
mod systems;
mod timeline;
