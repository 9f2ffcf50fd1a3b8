//! The admin endpoint.
pub mod settings;
