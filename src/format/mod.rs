//! The formats records arrive in, decoded into typed fields. Below sources and
//! operators: a source decodes as it reads (the decoder is chained into it), and
//! nothing here knows either.
//!
//! - [`decoder`]: one Kafka message (value, key, headers) into a record, in any format.
//! - [`fields`]: where each configured field is read, and how values become fields.
//! - [`json`]: JSON objects, in one pass and without building a JSON tree when it can.
//! - [`avro`], [`protobuf`]: datums and messages read with their writer's schema.
//! - [`registry`]: writer schemas fetched from a schema registry by id, cached.
//! - [`hop`]: records, dead letters and watermarks crossing between instances.

pub mod avro;
pub mod decoder;
pub mod fields;
pub mod hop;
pub mod json;
pub mod protobuf;
pub mod registry;

pub use decoder::{DecodeSetupError, Decoded, Decoder, Decoders, Message};
