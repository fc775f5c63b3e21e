//! What every sink strategy does with incoming batches: gather records into statements
//! of `sink.batch_size` rows, and send dead letters bound for Kafka on at once.

use std::mem;

use super::dead_letter::KafkaDeadLetters;
use crate::error::Result;
use crate::record::{Batch, DeadLetter};

/// Records gathered into statements of `batch_size` rows, and the dead letters met with them.
pub struct WriteBuffer {
    batch: Batch,
    batch_size: usize,
    dead_letters: Option<KafkaDeadLetters>,
}

impl WriteBuffer {
    /// `dead_letters`: the Kafka destination, if dead letters do not go to a table.
    pub fn new(batch_size: usize, dead_letters: Option<KafkaDeadLetters>) -> Self {
        Self {
            batch: Batch::default(),
            batch_size,
            dead_letters,
        }
    }

    /// Take a batch in; true when a statement's worth is waiting.
    pub async fn add(&mut self, mut batch: Batch) -> Result<bool> {
        if let Some(dlq) = &mut self.dead_letters {
            dlq.send(mem::take(&mut batch.dead)).await?;
        }
        self.batch.records.append(&mut batch.records);
        self.batch.dead.append(&mut batch.dead);
        Ok(self.batch.len() >= self.batch_size)
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Everything waiting; hand it back with [`WriteBuffer::recycle`] to reuse its memory.
    pub fn take(&mut self) -> Batch {
        mem::take(&mut self.batch)
    }

    /// Give a written batch back, so its allocation is reused.
    pub fn recycle(&mut self, mut batch: Batch) {
        if self.batch.is_empty() {
            batch.records.clear();
            batch.dead.clear();
            self.batch = batch;
        }
    }

    /// Send dead letters met while writing (rows the database rejected) to Kafka if that
    /// is where dead letters go; otherwise hand them back for the table.
    pub async fn route_dead(&mut self, dead: Vec<DeadLetter>) -> Result<Vec<DeadLetter>> {
        match &mut self.dead_letters {
            Some(dlq) if !dead.is_empty() => dlq.send(dead).await.map(|()| Vec::new()),
            _ => Ok(dead),
        }
    }

    /// Wait until every dead letter sent to Kafka so far is acknowledged.
    pub async fn flush_dead_letters(&mut self) -> Result<()> {
        match &mut self.dead_letters {
            Some(dlq) => dlq.flush().await,
            None => Ok(()),
        }
    }
}
