//! Errors of the library, classified by where they come from and whether retrying helps.

use std::path::PathBuf;

/// Every failure the job can meet. Bad *records* are not errors: they become dead letters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is wrong; nothing was started. Never retryable.
    #[error("{file}: {key}: {message}")]
    Config {
        /// The config file.
        file: PathBuf,
        /// The key at fault (`sink.url`), or `-` for the whole file.
        key: String,
        /// What is wrong and, where it helps, what is allowed.
        message: String,
    },
    /// Kafka refused or could not be reached.
    #[error("kafka ({context}): {source}")]
    Kafka {
        /// What sluice was doing.
        context: String,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The sink's database refused or could not be reached.
    #[error("database ({context}): {source}")]
    Database {
        /// What sluice was doing.
        context: String,
        /// The database driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Applying migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Reading or writing checkpoint storage failed.
    #[error("checkpoint storage ({context}): {source}")]
    Storage {
        /// What sluice was doing.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A stored checkpoint could not be read back.
    /// A checkpoint that cannot be read back: its path and why.
    #[error("checkpoint {path}: {message}")]
    CorruptCheckpoint {
        /// The checkpoint's file or directory.
        path: PathBuf,
        /// Why it cannot be read.
        message: String,
    },
    /// The external system is in a state sluice will not work with (e.g. prepared
    /// transactions disabled).
    #[error("{0}")]
    Unsupported(String),
    /// The target does not have what the job is set up for (its table, a column, its
    /// topic): an operator's fix, not a restart's. Refused at the first start; a job
    /// that ran before backs off and retries until it is mended (see
    /// [`Error::is_setup_fault`]).
    #[error("{0}")]
    TargetSetup(String),
    /// Another process took this job over (its owner generation is newer than this
    /// process's): this process must stop without committing. Never retryable.
    #[error(
        "job `{job}` was taken over by another sluice process (owner generation {} > ours {ours}); \
         this process stops without committing: the new owner resolves what it prepared",
        .current.map_or_else(|| "gone".to_string(), |c| c.to_string())
    )]
    Fenced {
        /// The job.
        job: String,
        /// This process's owner generation.
        ours: i64,
        /// The generation in the owners table now (`None`: its row is gone).
        current: Option<i64>,
    },
    /// The lease on this process's instance slot ran out unrenewed (the process was
    /// stopped or cut off) and another process took the slot: this one must stop
    /// without writing. Never retryable.
    #[error(
        "this process lost instance {slot} of the job: its lease (generation {generation}) ran out unrenewed and \
         the slot is now held by {holder}; it stops without writing anything more"
    )]
    SlotLost {
        /// The instance.
        slot: u32,
        /// The lease generation this process held.
        generation: u64,
        /// Who holds the slot now (and with which generation).
        holder: String,
    },
    /// A newer process of the same job initialised this job's Kafka transactional ids:
    /// this process must stop (restarting would fence the newer one in turn). Never
    /// retryable.
    #[error(
        "job `{job}`: Kafka producer {producer} was fenced by a newer sluice process of the same job; \
         this process stops without committing (one process per job)"
    )]
    ProducerFenced {
        /// The job.
        job: String,
        /// The fenced transactional id.
        producer: String,
    },
    /// An error raised by one subtask, named (`window-1`, `sink-0`, `source-2`).
    #[error("{task}: {source}")]
    Task {
        /// The subtask that raised it.
        task: String,
        /// What went wrong there.
        #[source]
        source: Box<Error>,
    },
    /// The local state backend (RocksDB) failed: the attempt restarts from the
    /// checkpoint into a fresh one.
    #[error("state backend ({context}): {message}")]
    State {
        /// What sluice was doing, and where.
        context: String,
        /// RocksDB's message.
        message: String,
    },
    /// A sink target that is no database driver's (Redis, a Kafka producer's delivery)
    /// failed: the attempt restarts from the checkpoint.
    #[error("{target} sink: {message}")]
    Sink {
        /// The target (`redis`, `kafka`).
        target: &'static str,
        /// What failed, in the target's words.
        message: String,
    },
    /// A lookup tier or store failed past its retries.
    #[error("lookup: {0}")]
    Lookup(String),
    /// The schema registry could not be asked (down, slow, an unreadable answer): the
    /// attempt restarts from the checkpoint; no record is dead-lettered for it.
    #[error("{0}")]
    Registry(String),
    /// A bug or a broken invariant inside the job (a channel closed early, a task died).
    #[error("internal: {0}")]
    Internal(String),
}

/// Whose fault a database error is, by its SQLSTATE class (and a MySQL error's number):
/// the one place that decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbFault {
    /// The row's data: isolate the row and dead-letter it (21 cardinality violation:
    /// two rows of one upsert whose keys differ to sluice but are equal to the
    /// database, `char(8)` "a" and "a ", one instant in two time zones, which apart
    /// are written one after the other; 22 data exception, 23 integrity constraint
    /// violation, 54 program limit exceeded: a value too large for an index row, JSON
    /// nested deeper than the server's stack).
    Row,
    /// Possibly the row, possibly not: a trigger's `RAISE` (P0), a routine's exception
    /// (2F, 38, 39), an internal error (XX000), a statement timeout (57014). The rows
    /// are isolated like [`DbFault::Row`]; a row that fails alone the same way
    /// `sink.max_record_attempts` times is dead-lettered, so it cannot be replayed
    /// forever. Elsewhere (a commit, a prepare) it is retried like a transient error.
    Suspect,
    /// The connection or the server's state: retry, restart from the checkpoint (08
    /// connection, 40 rollback/serialization, 53 insufficient resources, 57 operator
    /// intervention, 55 object not in prerequisite state, and errors without a code).
    Transient,
    /// The configuration: a restart cannot help, stop with the reason (42 syntax or
    /// access rule: a missing table or column, no privilege; 28 authorization; 3D no
    /// such database; 3F no such schema; 0A not supported).
    Permanent,
}

impl DbFault {
    /// Classify a SQLSTATE (`None`: not a server error, e.g. a broken connection).
    pub fn of(sqlstate: Option<&str>) -> DbFault {
        match sqlstate.map(|c| c.get(..2).unwrap_or(c)) {
            Some("21" | "22" | "23" | "54") => DbFault::Row,
            _ if matches!(sqlstate, Some("57014" | "XX000")) => DbFault::Suspect,
            Some("P0" | "2F" | "38" | "39") => DbFault::Suspect,
            Some("42" | "28" | "3D" | "3F" | "0A") => DbFault::Permanent,
            _ => DbFault::Transient,
        }
    }

    /// Classify a MySQL or MariaDB error by its number, where its SQLSTATE says too
    /// little (`HY000` covers a refused value, a lock wait and a read-only server alike),
    /// else by the SQLSTATE as [`DbFault::of`] does.
    pub fn of_mysql(number: u16, sqlstate: Option<&str>) -> DbFault {
        match number {
            // A row's data: NULL into NOT NULL (1048), a duplicate key (1062), out of
            // range (1264, 1690), truncated or wrong (1265, 1292, 1366, 1367, 1406), no
            // default (1364), a foreign key (1451, 1452), invalid JSON (3140), a CHECK
            // constraint (MySQL 3819, MariaDB 4025), a row too large (1118).
            1048 | 1062 | 1118 | 1264 | 1265 | 1292 | 1364 | 1366 | 1367 | 1406 | 1451 | 1452 | 1690 | 3140 | 3819
            | 4025 => DbFault::Row,
            // A trigger's or routine's SIGNAL (1644), a statement timeout (MySQL 3024,
            // MariaDB 1969): perhaps the row's doing.
            1644 | 3024 | 1969 => DbFault::Suspect,
            // A lock wait (1205), a deadlock (1213), too many connections (1040), a
            // server shutting down (1053), a killed connection (1927), a read-only
            // server mid-failover (1290, 1836).
            1205 | 1213 | 1040 | 1053 | 1927 | 1290 | 1836 => DbFault::Transient,
            // The job's setup: access denied (1044, 1045, 1142, 1143, 1227), an unknown
            // database, table or column (1049, 1146, 1054), safe-update mode (1175).
            1044 | 1045 | 1049 | 1054 | 1142 | 1143 | 1146 | 1175 | 1227 => DbFault::Permanent,
            _ if sqlstate == Some("45000") => DbFault::Suspect,
            _ => DbFault::of(sqlstate),
        }
    }

    /// Classify a sqlx error.
    pub fn of_sqlx(e: &sqlx::Error) -> DbFault {
        match e {
            sqlx::Error::Database(d) => match d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                Some(m) => DbFault::of_mysql(m.number(), d.code().as_deref()),
                None => DbFault::of(d.code().as_deref()),
            },
            _ => DbFault::Transient,
        }
    }
}

impl Error {
    /// Whether restarting the job (per its restart strategy) can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Task { source, .. } => source.is_retryable(),
            Error::Database { source, .. } => DbFault::of_sqlx(source) != DbFault::Permanent,
            Error::Kafka { .. }
            | Error::Storage { .. }
            | Error::State { .. }
            | Error::Internal(_)
            | Error::Sink { .. }
            | Error::Registry(_)
            | Error::Lookup(_) => true,
            _ => false,
        }
    }

    /// Whether the error is a fault of the job's setup in its target that an operator
    /// mends outside sluice (a table, column, schema or topic missing, a privilege or a
    /// password refused): a restart cannot help at once, but may once it is mended.
    pub fn is_setup_fault(&self) -> bool {
        match self {
            Error::Task { source, .. } => source.is_setup_fault(),
            Error::TargetSetup(_) => true,
            Error::Database { source, .. } => DbFault::of_sqlx(source) == DbFault::Permanent,
            _ => false,
        }
    }

    /// What kind of failure this is, as the `cause` label of `sluice_errors_total`.
    pub fn cause(&self) -> &'static str {
        match self.root() {
            Error::Config { .. } | Error::TargetSetup(_) => "config",
            Error::Kafka { .. } => "kafka",
            Error::Database { .. } | Error::Migrate(_) => "database",
            Error::Storage { .. } => "checkpoint_storage",
            Error::State { .. } => "state_backend",
            Error::CorruptCheckpoint { .. } => "corrupt_checkpoint",
            Error::Unsupported(_) => "unsupported",
            Error::Fenced { .. } | Error::ProducerFenced { .. } | Error::SlotLost { .. } => "fenced",
            Error::Lookup(_) => "lookup",
            Error::Registry(_) => "schema_registry",
            Error::Sink { .. } => "sink",
            Error::Internal(_) | Error::Task { .. } => "internal",
        }
    }

    /// The operator whose subtask raised the error (`sink` of `sink-1`), if one did.
    pub fn operator(&self) -> Option<&str> {
        match self {
            Error::Task { task, .. } => Some(task.rsplit_once('-').map_or(task.as_str(), |(op, _)| op)),
            _ => None,
        }
    }

    /// The error as raised, without the subtask that names it.
    pub fn root(&self) -> &Error {
        match self {
            Error::Task { source, .. } => source.root(),
            e => e,
        }
    }

    /// Name the subtask that raised the error (once: an error passed on is not renamed).
    pub fn in_task(self, task: &str) -> Error {
        match self {
            e @ Error::Task { .. } => e,
            e => Error::Task {
                task: task.to_string(),
                source: Box::new(e),
            },
        }
    }

    pub(crate) fn db(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
        let context = context.into();
        move |source| Error::Database { context, source }
    }

    pub(crate) fn kafka(context: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
        let context = context.into();
        move |source| Error::Kafka { context, source }
    }

    pub(crate) fn storage(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Storage { context, source }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified_in_one_place() {
        for code in ["21000", "22001", "23505", "23514", "54000", "54001"] {
            assert_eq!(DbFault::of(Some(code)), DbFault::Row, "{code}");
        }
        for code in ["P0001", "38000", "39P01", "2F005", "XX000", "57014"] {
            assert_eq!(DbFault::of(Some(code)), DbFault::Suspect, "{code}");
        }
        for code in ["08006", "40001", "53300", "57P01", "55P03", "XX001"] {
            assert_eq!(DbFault::of(Some(code)), DbFault::Transient, "{code}");
        }
        for code in ["42P01", "42703", "42501", "28P01", "3D000", "3F000", "0A000"] {
            assert_eq!(DbFault::of(Some(code)), DbFault::Permanent, "{code}");
        }
        assert_eq!(DbFault::of(None), DbFault::Transient);
        // MySQL: the number decides where the SQLSTATE (HY000) cannot.
        for (n, state) in [
            (1366, "HY000"),
            (4025, "23000"),
            (1406, "22001"),
            (1048, "23000"),
            (1364, "HY000"),
        ] {
            assert_eq!(DbFault::of_mysql(n, Some(state)), DbFault::Row, "{n}");
        }
        for (n, state) in [(1205, "HY000"), (1213, "40001"), (1290, "HY000"), (2000, "HY000")] {
            assert_eq!(DbFault::of_mysql(n, Some(state)), DbFault::Transient, "{n}");
        }
        for (n, state) in [(1146, "42S02"), (1142, "42000"), (1045, "28000"), (1054, "42S22")] {
            assert_eq!(DbFault::of_mysql(n, Some(state)), DbFault::Permanent, "{n}");
        }
        assert_eq!(DbFault::of_mysql(1644, Some("45000")), DbFault::Suspect);
        assert_eq!(DbFault::of_mysql(9999, Some("45000")), DbFault::Suspect);
        let no_code = Error::Database {
            context: "x".into(),
            source: sqlx::Error::Protocol("y".into()),
        };
        assert!(no_code.is_retryable(), "errors without a SQLSTATE are retried");
    }

    #[test]
    fn errors_name_their_subtask_once_and_keep_their_class() {
        let e = Error::Unsupported("boom".into()).in_task("window-1").in_task("sink-0");
        assert_eq!(e.to_string(), "window-1: boom");
        assert!(!e.is_retryable());
        assert!(matches!(e.root(), Error::Unsupported(_)));
        let transient = Error::Internal("x".into()).in_task("source-0");
        assert!(transient.is_retryable());
    }

    #[test]
    fn a_sink_target_failure_is_counted_as_the_sink_s_not_a_lookup_s() {
        let e = Error::Sink {
            target: "redis",
            message: "connection refused".into(),
        }
        .in_task("sink-0");
        assert_eq!(e.cause(), "sink");
        assert!(e.is_retryable());
        assert_eq!(e.to_string(), "sink-0: redis sink: connection refused");
    }
}
