//! Clients of external systems that more than one component uses, and what they share
//! (SQL names quoted one way). A leaf: it knows
//! the layers below (errors, config values), and the sources, operators, lookups and
//! sinks that use it know it, never each other.

pub mod redis;
pub mod sql;
