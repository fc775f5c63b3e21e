//! Postgres as a target, by concern: the connection, owner lock and migrations
//! ([`connect`](mod@connect)); the table and its batched writes ([`table`]); the write-ahead log
//! ([`wal`]); its transactions for two-phase commit ([`transactional`]); the target as
//! a whole ([`target`]).

pub mod connect;
mod copy;
pub mod table;
pub mod target;
pub mod transactional;
pub mod wal;

pub use connect::{check_fence, check_prepared_transactions, connect, migrate, owner_lock, JobLock};
pub use table::PgTable;
pub use target::TARGET;
pub use transactional::{finish_prepared, gid, gid_prefix, list_prepared, recover, PgTransactions, PreparedTxn};
pub use wal::PgWal;
