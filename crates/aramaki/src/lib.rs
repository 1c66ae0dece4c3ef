//! Aramaki: a federated DevOps control plane.
//!
//! The code is cut by domain ([`systems`], [`timeline`], [`users`],
//! [`federation`]); each domain owns its model, its SQL (`store`) and its
//! routes (`http`). [`context::Context`] carries everything from the outside
//! world; [`web`] only assembles the routes.

pub mod actions;
pub mod agents;
pub mod app;
pub mod cli;
pub mod config;
pub mod context;
pub mod db;
pub mod demo;
pub mod federation;
pub mod input;
pub mod metrics;
pub mod monitoring;
pub mod setup;
pub mod systems;
pub mod timeline;
pub mod ui;
pub mod users;
pub mod web;
