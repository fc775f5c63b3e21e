//! A sink subtask: reads its inputs through an input gate, aligns barriers, and drives a
//! [`SinkWriter`] through write / pre-commit / commit.

use tokio::sync::{mpsc, watch};

use super::align::{AlignStep, BarrierAligner};
use super::channel::{GateItem, InputGate};
use crate::checkpoint::{task_name, TaskEvent};
use crate::error::{Error, Result};
use crate::record::{Barrier, StreamElement};
use crate::sink::SinkWriter;

pub struct SinkTaskIo {
    pub index: usize,
    pub gate: InputGate,
    pub events: mpsc::UnboundedSender<TaskEvent>,
    /// Newest completed checkpoint.
    pub completed: watch::Receiver<u64>,
    pub cancel: watch::Receiver<bool>,
}

/// Run until every input has ended and the final checkpoint is committed, or until
/// cancelled (then nothing more is committed; a restart recovers).
pub async fn run_sink<W: SinkWriter>(mut writer: W, mut io: SinkTaskIo) -> Result<()> {
    let name = task_name("sink", io.index);
    let mut aligner = BarrierAligner::new(io.gate.len());
    let mut final_id: Option<u64> = None;
    let mut inputs_done = false;
    io.completed.borrow_and_update();
    loop {
        if inputs_done {
            let done = *io.completed.borrow();
            match final_id {
                Some(f) if done >= f => {
                    writer.commit(done).await?;
                    return Ok(());
                }
                Some(_) => {}
                None => {
                    return Err(Error::Internal(format!(
                        "{name}: inputs ended without a final checkpoint"
                    )))
                }
            }
        }
        tokio::select! {
            biased;
            _ = io.cancel.changed() => return Ok(()),
            changed = io.completed.changed() => {
                if changed.is_err() {
                    // The coordinator is gone: this attempt is over, commit nothing more.
                    return Ok(());
                }
                let id = *io.completed.borrow_and_update();
                writer.commit(id).await?;
            }
            item = io.gate.next(), if !inputs_done => {
                let Some(item) = item else {
                    inputs_done = true;
                    continue;
                };
                let (input, element) = match item {
                    GateItem::Closed(i) => {
                        return Err(Error::Internal(format!("{name}: source-{i} stopped without end of stream")));
                    }
                    GateItem::Element(i, e) => (i, e),
                };
                let aligned = match element {
                    StreamElement::Batch(b) => {
                        writer.write(b).await?;
                        None
                    }
                    StreamElement::Watermark(_) => None,
                    StreamElement::Barrier(b) => match aligner.on_barrier(input, b) {
                        AlignStep::Block => {
                            io.gate.block(input);
                            None
                        }
                        AlignStep::Aligned(b) => Some(b),
                        AlignStep::Ignore => None,
                    },
                    StreamElement::EndOfStream => {
                        io.gate.finish(input);
                        aligner.on_end_of_stream(input)
                    }
                };
                if let Some(b) = aligned {
                    snapshot(&mut writer, &io, &name, b).await?;
                    io.gate.unblock_all();
                    if b.is_final {
                        final_id = Some(b.id);
                    }
                }
            }
        }
    }
}

async fn snapshot<W: SinkWriter>(writer: &mut W, io: &SinkTaskIo, name: &str, b: Barrier) -> Result<()> {
    match writer.pre_commit(b.id).await {
        Ok(state) => io
            .events
            .send(TaskEvent::Ack {
                checkpoint: b.id,
                task: name.to_string(),
                state,
            })
            .map_err(|_| Error::Internal("checkpoint coordinator stopped".into())),
        Err(e) => {
            let _ = io.events.send(TaskEvent::Decline {
                checkpoint: b.id,
                task: name.to_string(),
                reason: e.to_string(),
            });
            Err(e)
        }
    }
}
