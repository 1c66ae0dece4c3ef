//! Observations and checks on the system page.
