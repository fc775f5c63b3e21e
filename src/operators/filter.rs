//! `filter`: keeps the records for which a CEL expression over their fields is true.
//! A record the expression fails on (a missing field's null in arithmetic, a division
//! by zero, a result that is not a boolean) is dead-lettered with the reason, never
//! dropped silently. Deletes of a change stream pass: they name a row, not a record to
//! judge.

use std::sync::Arc;

use super::expr::{self, Expression};
use super::{record_json, BuiltOperator};
use crate::error::{Error, Result};
use crate::record::{Batch, DeadLetter, Field, Schema};
use crate::runtime::operator::{Context, Operator};
use crate::runtime::partition::PartitionerKind;

/// Build the `filter` of `expression` over the stream `input`.
pub fn build(
    id: String,
    expression: &str,
    input: &Schema,
    fail: &dyn Fn(&str, String) -> Error,
) -> Result<BuiltOperator> {
    let expr = Arc::new(Expression::compile(expression, input).map_err(|m| fail("expression", m))?);
    let fields: Arc<[Field]> = input.fields.clone().into();
    let op_id = id.clone();
    Ok(BuiltOperator {
        id,
        parallelism: None,
        partitioner: PartitionerKind::Forward,
        partition_key: Vec::new(),
        output: input.clone(),
        needs_event_time: false,
        keyed_state: false,
        make: Arc::new(move |_| {
            Ok(Box::new(Filter {
                id: op_id.clone(),
                expr: expr.clone(),
                fields: fields.clone(),
            }))
        }),
    })
}

/// Keeps what its expression holds true for.
pub struct Filter {
    id: String,
    expr: Arc<Expression>,
    fields: Arc<[Field]>,
}

impl Operator for Filter {
    fn process_batch(&mut self, batch: Batch, ctx: &mut Context<'_>) -> Result<()> {
        let Batch { records, mut dead } = batch;
        let mut kept = Vec::with_capacity(records.len());
        for r in records {
            if r.is_delete() {
                kept.push(r);
                continue;
            }
            let reason = match self.expr.eval(&r) {
                Ok(cel::Value::Bool(true)) => {
                    kept.push(r);
                    continue;
                }
                Ok(cel::Value::Bool(false)) => continue,
                Ok(other) => format!("`{}` gave {}, not a boolean", self.expr.text, expr::kind(&other)),
                Err(e) => e,
            };
            dead.push(DeadLetter {
                payload: record_json(&self.fields, &r.values),
                origin: r.origin,
                reason: format!("filter {}: {reason}", self.id),
            });
        }
        ctx.out.batch(Batch { records: kept, dead });
        Ok(())
    }
}
