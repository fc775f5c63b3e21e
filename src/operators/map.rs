//! `map`: adds or replaces fields, each computed by a CEL expression over the record's
//! fields (a later one sees the earlier ones' results). A record an expression fails on,
//! or whose result does not fit the field's type, is dead-lettered with the reason.
//! Deletes of a change stream pass unchanged: they carry only their key.

use std::sync::Arc;

use super::expr::{self, Expression};
use super::{record_json, BuiltOperator};
use crate::config::MapField;
use crate::error::{Error, Result};
use crate::record::{Batch, DeadLetter, Field, FieldType, Schema, Value};
use crate::runtime::operator::{Context, Operator};
use crate::runtime::partition::PartitionerKind;

/// One computed field: where it goes, its type and its expression.
struct Computed {
    slot: usize,
    name: String,
    field_type: FieldType,
    expr: Expression,
}

/// Build the `map` of `fields` over the stream `input`.
pub fn build(
    id: String,
    fields: &[MapField],
    input: &Schema,
    fail: &dyn Fn(&str, String) -> Error,
) -> Result<BuiltOperator> {
    let mut output = input.clone();
    let mut computed = Vec::with_capacity(fields.len());
    for (i, f) in fields.iter().enumerate() {
        let expr =
            Expression::compile(&f.expression, &output).map_err(|m| fail(&format!("fields[{i}].expression"), m))?;
        let slot = match output.index(&f.name) {
            Some(slot) => {
                output.fields[slot].field_type = f.field_type;
                slot
            }
            None => {
                output.fields.push(Field::new(&f.name, f.field_type));
                output.fields.len() - 1
            }
        };
        computed.push(Computed {
            slot,
            name: f.name.clone(),
            field_type: f.field_type,
            expr,
        });
    }
    let computed = Arc::new(computed);
    let width = output.fields.len();
    let names: Arc<[Field]> = output.fields.clone().into();
    let op_id = id.clone();
    Ok(BuiltOperator {
        id,
        parallelism: None,
        partitioner: PartitionerKind::Forward,
        partition_key: Vec::new(),
        output,
        needs_event_time: false,
        keyed_state: false,
        make: Arc::new(move |_| {
            Ok(Box::new(Map {
                id: op_id.clone(),
                computed: computed.clone(),
                width,
                fields: names.clone(),
            }))
        }),
    })
}

/// Computes its fields into every record.
pub struct Map {
    id: String,
    computed: Arc<Vec<Computed>>,
    width: usize,
    fields: Arc<[Field]>,
}

impl Operator for Map {
    fn process_batch(&mut self, batch: Batch, ctx: &mut Context<'_>) -> Result<()> {
        let Batch { records, mut dead } = batch;
        let mut out = Vec::with_capacity(records.len());
        'records: for mut r in records {
            r.values.resize(self.width, Value::Null);
            if r.is_delete() {
                out.push(r);
                continue;
            }
            for c in self.computed.iter() {
                match c.expr.eval(&r).and_then(|v| expr::to_field(v, c.field_type, &c.name)) {
                    Ok(v) => r.values[c.slot] = v,
                    Err(reason) => {
                        dead.push(DeadLetter {
                            payload: record_json(&self.fields, &r.values),
                            origin: r.origin,
                            reason: format!("map {}: {reason}", self.id),
                        });
                        continue 'records;
                    }
                }
            }
            out.push(r);
        }
        ctx.out.batch(Batch { records: out, dead });
        Ok(())
    }
}
