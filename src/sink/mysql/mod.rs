//! MySQL and MariaDB as a target, by concern: the connection, names, owner lock and
//! migrations ([`connect`](mod@connect)); the table and its batched writes ([`table`]);
//! the write-ahead log ([`wal`]); XA transactions for two-phase commit ([`xa`]); the
//! target as a whole ([`target`]).

pub mod connect;
pub mod table;
pub mod target;
pub mod wal;
pub mod xa;

pub use table::MyTable;
pub use target::TARGET;
