//! `key_by`: declares the stream's key. It changes no record; the runtime routes the
//! edge after it by key group, and the operator after it (a window) reads the key.

use std::sync::Arc;

use super::BuiltOperator;
use crate::error::{Error, Result};
use crate::record::{Batch, Schema, ValueSource};
use crate::runtime::operator::{Context, Operator};
use crate::runtime::partition::PartitionerKind;

/// Build the `key_by` of `fields` over the stream `input`.
pub fn build(
    id: String,
    fields: &[String],
    input: &Schema,
    fail: &dyn Fn(&str, String) -> Error,
) -> Result<BuiltOperator> {
    let mut key = Vec::with_capacity(fields.len());
    for f in fields {
        let i = input.index(f).ok_or_else(|| {
            fail(
                "fields",
                format!(
                    "`{f}` is not a field of the stream here; its fields: {}",
                    input.describe()
                ),
            )
        })?;
        key.push(ValueSource::Field(i));
    }
    let mut output = input.clone();
    output.keyed_by = fields.to_vec();
    Ok(BuiltOperator {
        id,
        parallelism: None,
        partitioner: PartitionerKind::Forward,
        partition_key: Vec::new(),
        output,
        needs_event_time: false,
        keyed_state: false,
        make: Arc::new(|_| Ok(Box::new(KeyBy))),
    })
}

/// Passes everything on; the key lives in the schema it declares.
pub struct KeyBy;

impl Operator for KeyBy {
    fn process_batch(&mut self, batch: Batch, ctx: &mut Context<'_>) -> Result<()> {
        ctx.out.batch(batch);
        Ok(())
    }
}
