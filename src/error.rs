//! Errors of the library, classified by where they come from and whether retrying helps.

use std::path::PathBuf;

/// Every failure the job can meet. Bad *records* are not errors: they become dead letters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is wrong; nothing was started. Never retryable.
    #[error("{file}: {key}: {message}")]
    Config {
        file: PathBuf,
        key: String,
        message: String,
    },
    /// Kafka refused or could not be reached.
    #[error("kafka ({context}): {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The sink's database refused or could not be reached.
    #[error("database ({context}): {source}")]
    Database {
        context: String,
        #[source]
        source: sqlx::Error,
    },
    /// Applying migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Reading or writing checkpoint storage failed.
    #[error("checkpoint storage ({context}): {source}")]
    Storage {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A stored checkpoint could not be read back.
    #[error("checkpoint {path}: {message}")]
    CorruptCheckpoint { path: PathBuf, message: String },
    /// The external system is in a state sluice will not work with (e.g. prepared
    /// transactions disabled).
    #[error("{0}")]
    Unsupported(String),
    /// A bug or a broken invariant inside the job (a channel closed early, a task died).
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// Whether restarting the job (per its restart strategy) can help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Kafka { .. } | Error::Database { .. } | Error::Storage { .. } | Error::Internal(_)
        )
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

pub type Result<T, E = Error> = std::result::Result<T, E>;
