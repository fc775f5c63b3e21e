//! Record-at-a-time steps, chained into the source subtask so that no channel hop or
//! re-parse sits between reading a message and having typed fields.

pub mod decode;

pub use decode::Decoder;
