//! `key_by`: declares the stream's key. It changes no record; the runtime routes the
//! edge after it by key group, and the operator after it (a window) reads the key.

use crate::error::Result;
use crate::record::Batch;
use crate::runtime::operator::{Context, Operator};

/// Passes everything on; the key lives in the schema it declares.
pub struct KeyBy;

impl Operator for KeyBy {
    fn process_batch(&mut self, batch: Batch, ctx: &mut Context<'_>) -> Result<()> {
        ctx.out.batch(batch);
        Ok(())
    }
}
