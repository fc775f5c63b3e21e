//! The formats records arrive in, decoded into typed fields. Below sources and
//! operators: a source decodes as it reads (the decoder is chained into it), and
//! nothing here knows either.
//!
//! - [`json`]: JSON objects, in one pass and without building a JSON tree.
//! - [`hop`]: records, dead letters and watermarks crossing between instances.

pub mod hop;
pub mod json;

pub use json::Decoder;
