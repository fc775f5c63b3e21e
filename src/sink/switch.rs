//! A job whose sink changes strategy between two runs (`two_phase` to `wal`, say) must
//! not lose what the old strategy left unfinished in the restored checkpoint: prepared
//! transactions to commit, logged epochs to write, Kafka epochs to rewrite. Each sink
//! state is tagged with the sink that wrote it (`kind/strategy`); at restore, states of
//! another strategy of the same target are finished by a sink of that strategy before
//! the new one starts (the composition root builds it), and states of another kind are
//! refused, since their target is not the one configured.

use std::collections::BTreeMap;

use crate::config::SinkConfig;
use crate::record::Batch;
use crate::runtime::sink::{Sink, SinkFuture};

/// The key of the tag in a sink state.
const TAG: &str = "sink";

/// The tag of the configured sink: `kind/strategy`.
pub fn tag(cfg: &SinkConfig) -> String {
    format!("{}/{}", cfg.kind().name(), cfg.strategy.name())
}

/// A sink whose checkpoint states carry its tag.
pub struct Tagged {
    inner: Box<dyn Sink>,
    tag: String,
}

impl Tagged {
    /// `inner`, its states tagged with `tag`.
    pub fn new(inner: Box<dyn Sink>, tag: String) -> Self {
        Self { inner, tag }
    }
}

impl Sink for Tagged {
    fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()> {
        self.inner.write(batch)
    }

    fn pre_commit(&mut self, checkpoint: u64) -> SinkFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let mut state = self.inner.pre_commit(checkpoint).await?;
            // A state that is not an object holds nothing to finish (`null`).
            if let Some(o) = state.as_object_mut() {
                o.insert(TAG.into(), self.tag.clone().into());
            }
            Ok(state)
        })
    }

    fn commit(&mut self, checkpoint: u64) -> SinkFuture<'_, ()> {
        self.inner.commit(checkpoint)
    }

    fn on_watermark(&mut self, watermark: Option<i64>) {
        self.inner.on_watermark(watermark)
    }

    fn flush_due(&self) -> Option<std::time::Instant> {
        self.inner.flush_due()
    }

    fn recover(&mut self, checkpoint: u64, states: Vec<serde_json::Value>) -> SinkFuture<'_, ()> {
        self.inner.recover(checkpoint, states)
    }

    fn on_quiet(&mut self) -> SinkFuture<'_, ()> {
        self.inner.on_quiet()
    }

    fn pending_epochs(&self) -> usize {
        self.inner.pending_epochs()
    }

    fn finish(&mut self) -> SinkFuture<'_, ()> {
        self.inner.finish()
    }
}

/// Restored states split into those of the configured sink (`tag`; untagged states,
/// written before tags, count as its own) and, by tag, those another sink left with
/// epochs pending. States of another sink with nothing pending are dropped.
pub fn split(
    states: Vec<serde_json::Value>,
    tag: &str,
) -> (Vec<serde_json::Value>, BTreeMap<String, Vec<serde_json::Value>>) {
    let mut own = Vec::new();
    let mut foreign: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for s in states {
        match s.get(TAG).and_then(|t| t.as_str()) {
            Some(t) if t != tag => {
                let pending = s
                    .get("pending")
                    .and_then(|p| p.as_array())
                    .is_some_and(|p| !p.is_empty());
                if pending {
                    foreign.entry(t.to_string()).or_default().push(s);
                }
            }
            _ => own.push(s),
        }
    }
    (own, foreign)
}

/// The kind and strategy of a tag, if it names them.
pub fn parse(tag: &str) -> Option<(&str, crate::config::Strategy)> {
    let (kind, strategy) = tag.split_once('/')?;
    Some((kind, crate::config::Strategy::from_name(strategy)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn states_of_another_sink_with_pending_epochs_are_set_apart() {
        let states = vec![
            json!({"pending": [[3, "chk-3/x"]], "subtask": 0}),
            json!({"pending": [[3, "chk-3/y"]], "subtask": 1, "sink": "postgres/wal"}),
            json!({"pending": [[3, "sluice:j:2:3"]], "sink": "postgres/two_phase"}),
            json!({"pending": [], "sink": "postgres/two_phase"}),
            serde_json::Value::Null,
        ];
        let (own, foreign) = split(states, "postgres/wal");
        assert_eq!(own.len(), 3, "untagged, own and null states stay");
        assert_eq!(foreign.keys().collect::<Vec<_>>(), vec!["postgres/two_phase"]);
        assert_eq!(
            foreign["postgres/two_phase"].len(),
            1,
            "nothing pending: nothing to finish"
        );
        assert_eq!(
            parse("kafka/two_phase"),
            Some(("kafka", crate::config::Strategy::TwoPhase))
        );
        assert_eq!(parse("kafka"), None);
    }
}
