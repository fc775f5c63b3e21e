//! One bad row never stalls a job: a statement the database refuses for its rows is
//! halved until the refused rows stand alone, and each of those becomes a dead letter
//! with the database's reason (or is written after all, if the target tries it again
//! alone and it goes through). The loop is here once; each target says how to write
//! rows in one statement and what its errors mean.

use crate::error::{Error, Result};
use crate::record::{DeadLetter, Record};

/// A target's statement over rows, and how its failures are judged.
#[allow(async_fn_in_trait)] // Used generically on concrete targets only: Send leaks through.
pub(crate) trait RowStatements {
    /// A failed statement, as the driver reports it.
    type Failure;

    /// Write `rows` in one statement (under a savepoint where a refusal would abort
    /// the surrounding transaction): the rows written.
    async fn write(&mut self, rows: &[&Record]) -> std::result::Result<u64, Self::Failure>;

    /// Whether a failure of several rows may be theirs, so they are halved.
    fn splits(&self, failure: &Self::Failure) -> bool;

    /// A statement of `row` alone failed with a failure that [`Self::splits`]: written
    /// after all (`Ok(Ok(n))`), a dead letter (`Ok(Err(_))`), or the job's failure.
    async fn alone(&mut self, row: &Record, failure: Self::Failure) -> Result<std::result::Result<u64, DeadLetter>>;

    /// A failure that is not the rows' (the job restarts on it).
    fn fail(&mut self, failure: Self::Failure) -> Error;
}

/// Write `statements` (each a slice of rows, in order) through `target`, halving those
/// refused until the refused rows stand alone: the rows written and the dead letters.
/// The decision is per row, so a replay makes the same one.
pub(crate) async fn write_isolating<T: RowStatements>(
    target: &mut T,
    statements: Vec<&[&Record]>,
) -> Result<(u64, Vec<DeadLetter>)> {
    let (mut written, mut dead) = (0, Vec::new());
    let mut pending: Vec<&[&Record]> = statements.into_iter().rev().collect();
    while let Some(rows) = pending.pop() {
        if rows.is_empty() {
            continue;
        }
        match target.write(rows).await {
            Ok(n) => written += n,
            Err(f) if !target.splits(&f) => return Err(target.fail(f)),
            Err(f) => match rows {
                [row] => match target.alone(row, f).await? {
                    Ok(n) => written += n,
                    Err(d) => dead.push(d),
                },
                _ => {
                    let (a, b) = rows.split_at(rows.len() / 2);
                    pending.push(b);
                    pending.push(a);
                }
            },
        }
    }
    Ok((written, dead))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Origin, Value};

    /// Refuses every statement holding a row whose first value is negative; a row of
    /// -1 fails alone with a transient error (the job's failure).
    struct Refusing {
        statements: usize,
    }

    fn value(r: &Record) -> i64 {
        match r.values.first() {
            Some(Value::Int(v)) => *v,
            _ => 0,
        }
    }

    impl RowStatements for Refusing {
        type Failure = &'static str;
        async fn write(&mut self, rows: &[&Record]) -> std::result::Result<u64, Self::Failure> {
            self.statements += 1;
            match rows.iter().map(|r| value(r)).min() {
                Some(-1) if rows.len() == 1 => Err("connection lost"),
                Some(v) if v < 0 => Err("check constraint"),
                _ => Ok(rows.len() as u64),
            }
        }
        fn splits(&self, f: &Self::Failure) -> bool {
            *f == "check constraint"
        }
        async fn alone(&mut self, row: &Record, f: Self::Failure) -> Result<std::result::Result<u64, DeadLetter>> {
            Ok(Err(DeadLetter {
                origin: row.origin.clone(),
                reason: f.into(),
                payload: Vec::new(),
            }))
        }
        fn fail(&mut self, f: Self::Failure) -> Error {
            Error::Internal(f.into())
        }
    }

    fn rows(values: &[i64]) -> Vec<Record> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| Record {
                origin: Origin {
                    topic: "t".into(),
                    partition: 0,
                    offset: i as i64,
                    timestamp_ms: 0,
                },
                values: vec![Value::Int(*v)],
                payload: None,
                timestamp: 0,
                op: crate::record::Op::Upsert,
            })
            .collect()
    }

    #[tokio::test]
    async fn refused_rows_stand_alone_as_dead_letters_and_the_rest_is_written() {
        let records = rows(&[1, 2, -5, 4, 5, 6, -7, 8]);
        let refs: Vec<&Record> = records.iter().collect();
        let mut t = Refusing { statements: 0 };
        let (written, dead) = write_isolating(&mut t, refs.chunks(3).collect())
            .await
            .expect("written");
        assert_eq!(written, 6);
        let offsets: Vec<i64> = dead.iter().map(|d| d.origin.offset).collect();
        assert_eq!(offsets, vec![2, 6], "in order, each alone");
        assert!(
            t.statements < records.len() * 2,
            "halved, not row by row: {}",
            t.statements
        );
    }

    #[tokio::test]
    async fn a_failure_that_is_not_the_rows_fails_the_write() {
        let records = rows(&[1, -1, 3]);
        let refs: Vec<&Record> = records.iter().collect();
        let err = write_isolating(&mut Refusing { statements: 0 }, vec![&refs[..]])
            .await
            .expect_err("not isolated");
        assert_eq!(err.to_string(), "internal: connection lost");
    }
}
