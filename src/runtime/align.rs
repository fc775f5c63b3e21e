//! Barrier alignment for an operator with several inputs, as a plain state machine.
//!
//! After barrier n arrives on one input, that input is held (its later records belong to
//! the next checkpoint) until n has arrived on every input that has not ended. Then the
//! operator snapshots its state and forwards n.

use crate::record::Barrier;

/// What the operator must do after telling the aligner about a barrier or an end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlignStep {
    /// Hold this input (stop reading it) until alignment completes.
    Block,
    /// Every live input has delivered this barrier: snapshot, acknowledge, unblock all.
    Aligned(Barrier),
    /// A barrier older than one already aligned or abandoned: nothing to do.
    Ignore,
}

/// Aligns checkpoint barriers over a task's inputs: an input whose barrier arrived waits until every live input delivered it.
#[derive(Debug)]
pub struct BarrierAligner {
    arrived: Vec<bool>,
    ended: Vec<bool>,
    current: Option<Barrier>,
    /// Highest barrier id aligned or abandoned.
    last_id: u64,
}

impl BarrierAligner {
    /// An aligner over `inputs` inputs.
    pub fn new(inputs: usize) -> Self {
        Self {
            arrived: vec![false; inputs],
            ended: vec![false; inputs],
            current: None,
            last_id: 0,
        }
    }

    /// The checkpoint being aligned, if any.
    pub fn aligning(&self) -> Option<u64> {
        self.current.map(|b| b.id)
    }

    /// Whether this input is held back by an alignment in progress.
    pub fn is_blocked(&self, input: usize) -> bool {
        self.current.is_some() && self.arrived[input]
    }

    /// Barrier `barrier` arrived on `input`; says whether to block that input or the checkpoint is aligned.
    pub fn on_barrier(&mut self, input: usize, barrier: Barrier) -> AlignStep {
        if barrier.id <= self.last_id && self.current.map(|c| c.id) != Some(barrier.id) {
            return AlignStep::Ignore;
        }
        match self.current {
            Some(cur) if barrier.id < cur.id => return AlignStep::Ignore,
            Some(cur) if barrier.id > cur.id => {
                // An input skipped ahead, so checkpoint `cur` cannot complete here any
                // more: abandon it (the coordinator times it out) and align the newer one.
                self.last_id = cur.id;
                self.start(barrier);
            }
            Some(_) => {}
            None => self.start(barrier),
        }
        self.arrived[input] = true;
        self.try_complete().unwrap_or(AlignStep::Block)
    }

    /// The input ended: it no longer holds back alignment. Returns the completed
    /// alignment if this input was the last one missing.
    pub fn on_end_of_stream(&mut self, input: usize) -> Option<Barrier> {
        self.ended[input] = true;
        match self.try_complete() {
            Some(AlignStep::Aligned(b)) => Some(b),
            _ => None,
        }
    }

    /// Whether every input ended.
    pub fn all_ended(&self) -> bool {
        self.ended.iter().all(|e| *e)
    }

    fn start(&mut self, barrier: Barrier) {
        self.current = Some(barrier);
        self.arrived.iter_mut().for_each(|a| *a = false);
    }

    fn try_complete(&mut self) -> Option<AlignStep> {
        let cur = self.current?;
        let done = self
            .arrived
            .iter()
            .zip(&self.ended)
            .all(|(arrived, ended)| *arrived || *ended);
        if !done {
            return None;
        }
        self.current = None;
        self.last_id = cur.id;
        self.arrived.iter_mut().for_each(|a| *a = false);
        Some(AlignStep::Aligned(cur))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: u64) -> Barrier {
        Barrier { id, is_final: false }
    }

    #[test]
    fn single_input_aligns_at_once() {
        let mut a = BarrierAligner::new(1);
        assert_eq!(a.on_barrier(0, b(1)), AlignStep::Aligned(b(1)));
        assert!(!a.is_blocked(0));
    }

    #[test]
    fn blocks_inputs_until_all_have_the_barrier() {
        let mut a = BarrierAligner::new(3);
        assert_eq!(a.on_barrier(1, b(1)), AlignStep::Block);
        assert!(a.is_blocked(1));
        assert!(!a.is_blocked(0));
        assert_eq!(a.on_barrier(0, b(1)), AlignStep::Block);
        assert!(a.is_blocked(0) && a.is_blocked(1) && !a.is_blocked(2));
        assert_eq!(a.on_barrier(2, b(1)), AlignStep::Aligned(b(1)));
        assert!(!a.is_blocked(0) && !a.is_blocked(1) && !a.is_blocked(2));
        assert_eq!(a.aligning(), None);
    }

    #[test]
    fn consecutive_checkpoints_align_independently() {
        let mut a = BarrierAligner::new(2);
        assert_eq!(a.on_barrier(0, b(1)), AlignStep::Block);
        assert_eq!(a.on_barrier(1, b(1)), AlignStep::Aligned(b(1)));
        assert_eq!(a.on_barrier(1, b(2)), AlignStep::Block);
        assert!(a.is_blocked(1));
        assert_eq!(a.on_barrier(0, b(2)), AlignStep::Aligned(b(2)));
    }

    #[test]
    fn an_ended_input_does_not_hold_alignment() {
        let mut a = BarrierAligner::new(2);
        assert_eq!(a.on_barrier(0, b(4)), AlignStep::Block);
        assert_eq!(a.on_end_of_stream(1), Some(b(4)));
        // Later barriers align on the remaining input alone.
        assert_eq!(a.on_barrier(0, b(5)), AlignStep::Aligned(b(5)));
        assert!(!a.all_ended());
        assert_eq!(a.on_end_of_stream(0), None);
        assert!(a.all_ended());
    }

    #[test]
    fn a_newer_barrier_abandons_the_older_alignment() {
        let mut a = BarrierAligner::new(2);
        assert_eq!(a.on_barrier(0, b(1)), AlignStep::Block);
        assert_eq!(a.on_barrier(1, b(2)), AlignStep::Block);
        assert_eq!(a.aligning(), Some(2));
        assert!(
            !a.is_blocked(0),
            "input 0 must be released from the abandoned alignment"
        );
        // The stale barrier 1 is then ignored wherever it shows up.
        assert_eq!(a.on_barrier(1, b(1)), AlignStep::Ignore);
        assert_eq!(a.on_barrier(0, b(2)), AlignStep::Aligned(b(2)));
        assert_eq!(a.on_barrier(0, b(2)), AlignStep::Ignore);
    }

    #[test]
    fn final_flag_is_carried() {
        let mut a = BarrierAligner::new(2);
        let fin = Barrier { id: 9, is_final: true };
        assert_eq!(a.on_barrier(0, fin), AlignStep::Block);
        assert_eq!(a.on_barrier(1, fin), AlignStep::Aligned(fin));
    }
}
