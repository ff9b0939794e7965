//! The epoch plan: seeded shuffle → optimizer steps of `effective_batch_size` samples → best-fit-
//! decreasing packing into rows ≤ `max_seq_len` → rows shared out to ranks → micro-batches of at
//! most `max_tokens_per_gpu` tokens.
//!
//! The rule, exactly (one process per GPU; every rank computes the same global plan and keeps
//! its share, so no coordination is needed):
//! 1. Epoch `e` (0-based) orders the training samples by a Fisher–Yates shuffle seeded with
//!    `seed + e` (SplitMix64).
//! 2. Consecutive runs of `effective_batch_size` samples form the optimizer steps; the last step
//!    of an epoch holds the remainder (fewer samples), so no sample is lost or repeated.
//!    `effective_batch_size` counts samples over ALL ranks.
//! 3. With packing, a step's samples are packed best-fit-decreasing into rows of at most
//!    `max_seq_len` tokens (each row keeps its documents' lengths in `seq_lens`: attention never
//!    crosses a document boundary and positions restart per document). Without packing each
//!    sample is one row.
//! 4. Rows go to ranks longest first, each to the rank with the fewest tokens so far (ties: the
//!    lowest rank). A rank can get no rows in a tiny last step; it still takes part in the
//!    step's gradient all-reduce with zero gradients.
//! 5. A rank's rows are packed best-fit-decreasing into micro-batches of at most
//!    `max_tokens_per_gpu` tokens; gradient accumulation runs over them.
//! 6. Loss normalisation: `OptimizerStep::trained_tokens` is the step's trained-token count over
//!    all ranks; dividing the summed token losses by it gives every token the same weight
//!    whatever its rank or micro-batch.

use serde::{Deserialize, Serialize};

use crate::tokenize::TokenizedSample;

/// One packed row: several documents back to back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub input_ids: Vec<u32>,
    /// Unshifted: `train_mask[i]` means token `i` is a target. Token 0 of each document is never one.
    pub train_mask: Vec<bool>,
    /// Lengths of the documents in this row, in order; they sum to `input_ids.len()`.
    pub seq_lens: Vec<u32>,
    /// Index of each document in `PreparedData::train` (or `validation`), for tracing.
    pub sample_ids: Vec<u32>,
}

impl Row {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Position ids: restart at 0 for every document.
    pub fn position_ids(&self) -> Vec<u32> {
        self.seq_lens.iter().flat_map(|&n| 0..n).collect()
    }
}

/// Rows one forward/backward pass on one GPU processes together.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MicroBatch {
    pub rows: Vec<Row>,
}

impl MicroBatch {
    pub fn tokens(&self) -> usize {
        self.rows.iter().map(Row::len).sum()
    }
    pub fn trained_tokens(&self) -> usize {
        self.rows
            .iter()
            .map(|r| r.train_mask.iter().filter(|&&m| m).count())
            .sum()
    }
}

/// One optimizer step, as seen by this rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptimizerStep {
    /// This rank's micro-batches (possibly none).
    pub micro_batches: Vec<MicroBatch>,
    /// Samples in the step over all ranks (`effective_batch_size`, or fewer in an epoch's last step).
    pub samples: usize,
    /// Trained tokens in the step over all ranks: the loss normaliser.
    pub trained_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPlan {
    pub epoch: usize,
    pub steps: Vec<OptimizerStep>,
}

/// Sizes that drive a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanParams {
    pub max_seq_len: usize,
    pub max_tokens_per_gpu: usize,
    pub effective_batch_size: usize,
    pub sample_packing: bool,
    pub seed: u64,
    pub world_size: usize,
    pub rank: usize,
}

/// SplitMix64: small, fast, and the same everywhere.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0), without modulo bias.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }
}

/// Fisher–Yates shuffle of `0..n` seeded with `seed`.
pub(crate) fn shuffled(n: usize, seed: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// Best-fit decreasing: items (id, size) into bins of `capacity`; returns bins of ids.
/// Items larger than `capacity` get a bin of their own. Deterministic: ties keep input order.
pub(crate) fn best_fit_decreasing(items: &[(u32, usize)], capacity: usize) -> Vec<Vec<u32>> {
    use std::collections::BTreeSet;
    let mut sorted: Vec<(u32, usize)> = items.to_vec();
    sorted.sort_by_key(|item| std::cmp::Reverse(item.1)); // stable: equal sizes keep their order
    let mut bins: Vec<Vec<u32>> = Vec::new();
    // (remaining capacity, bin index): the smallest remaining ≥ size is the best fit.
    let mut free: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut remaining: Vec<usize> = Vec::new();
    for (id, size) in sorted {
        let fit = free.range((size, 0)..).next().copied();
        match fit {
            Some((rem, b)) => {
                free.remove(&(rem, b));
                bins[b].push(id);
                remaining[b] = rem - size;
                if remaining[b] > 0 {
                    free.insert((remaining[b], b));
                }
            }
            None => {
                let b = bins.len();
                bins.push(vec![id]);
                let rem = capacity.saturating_sub(size);
                remaining.push(rem);
                if rem > 0 {
                    free.insert((rem, b));
                }
            }
        }
    }
    bins
}

/// A step's layout by sample index, before token data is copied: what the summary counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLayout {
    pub samples: usize,
    pub trained_tokens: u64,
    /// Per rank: micro-batches, each a list of rows, each a list of sample indices.
    pub ranks: Vec<Vec<Vec<Vec<u32>>>>,
}

/// Lays out rows (lists of sample indices) for a set of samples, shared over ranks and cut into
/// micro-batches.
pub(crate) fn layout_rows(
    samples: &[TokenizedSample],
    ids: &[u32],
    p: &PlanParams,
) -> Vec<Vec<Vec<Vec<u32>>>> {
    let items: Vec<(u32, usize)> = ids
        .iter()
        .map(|&i| (i, samples[i as usize].len()))
        .collect();
    let rows: Vec<Vec<u32>> = if p.sample_packing {
        best_fit_decreasing(&items, p.max_seq_len)
    } else {
        ids.iter().map(|&i| vec![i]).collect()
    };
    let row_len = |r: &Vec<u32>| r.iter().map(|&i| samples[i as usize].len()).sum::<usize>();
    // Rows to ranks: longest first, to the least-loaded rank.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&r| std::cmp::Reverse(row_len(&rows[r])));
    let mut load = vec![0usize; p.world_size];
    let mut per_rank: Vec<Vec<usize>> = vec![Vec::new(); p.world_size];
    for r in order {
        let (rank, _) = load
            .iter()
            .enumerate()
            .min_by_key(|&(i, l)| (*l, i))
            .expect("world_size >= 1");
        load[rank] += row_len(&rows[r]);
        per_rank[rank].push(r);
    }
    per_rank
        .into_iter()
        .map(|rank_rows| {
            let items: Vec<(u32, usize)> = rank_rows
                .iter()
                .map(|&r| (r as u32, row_len(&rows[r])))
                .collect();
            best_fit_decreasing(&items, p.max_tokens_per_gpu)
                .into_iter()
                .map(|mb| mb.into_iter().map(|r| rows[r as usize].clone()).collect())
                .collect()
        })
        .collect()
}

/// The layout of every step of `epoch` (all ranks).
pub fn epoch_layout(samples: &[TokenizedSample], epoch: usize, p: &PlanParams) -> Vec<StepLayout> {
    let order = shuffled(samples.len(), p.seed.wrapping_add(epoch as u64));
    order
        .chunks(p.effective_batch_size.max(1))
        .map(|chunk| StepLayout {
            samples: chunk.len(),
            trained_tokens: chunk
                .iter()
                .map(|&i| samples[i as usize].trained_tokens() as u64)
                .sum(),
            ranks: layout_rows(samples, chunk, p),
        })
        .collect()
}

/// Copies token data for one micro-batch layout.
pub(crate) fn materialize(samples: &[TokenizedSample], mb: &[Vec<u32>]) -> MicroBatch {
    MicroBatch {
        rows: mb
            .iter()
            .map(|row| {
                let n: usize = row.iter().map(|&i| samples[i as usize].len()).sum();
                let mut r = Row {
                    input_ids: Vec::with_capacity(n),
                    train_mask: Vec::with_capacity(n),
                    seq_lens: Vec::with_capacity(row.len()),
                    sample_ids: row.clone(),
                };
                for &i in row {
                    let s = &samples[i as usize];
                    r.input_ids.extend_from_slice(&s.input_ids);
                    r.train_mask.extend_from_slice(&s.train_mask);
                    r.seq_lens.push(s.len() as u32);
                }
                r
            })
            .collect(),
    }
}

/// Per-epoch counts for the data plan summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochCounts {
    pub epoch: usize,
    pub optimizer_steps: usize,
    /// Rows over all ranks.
    pub rows: usize,
    /// Micro-batches over all ranks.
    pub micro_batches: usize,
    /// The most micro-batches any rank runs in one step (gradient accumulation steps).
    pub max_micro_batches_per_step: usize,
    pub tokens: u64,
    pub trained_tokens: u64,
}

pub(crate) fn count_epoch(
    layout: &[StepLayout],
    samples: &[TokenizedSample],
    epoch: usize,
) -> EpochCounts {
    let mut c = EpochCounts {
        epoch,
        optimizer_steps: layout.len(),
        rows: 0,
        micro_batches: 0,
        max_micro_batches_per_step: 0,
        tokens: 0,
        trained_tokens: 0,
    };
    for step in layout {
        c.trained_tokens += step.trained_tokens;
        for rank in &step.ranks {
            c.micro_batches += rank.len();
            c.max_micro_batches_per_step = c.max_micro_batches_per_step.max(rank.len());
            for mb in rank {
                c.rows += mb.len();
                c.tokens += mb
                    .iter()
                    .flatten()
                    .map(|&i| samples[i as usize].len() as u64)
                    .sum::<u64>();
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_decreasing_fills_the_tightest_bin() {
        // sizes 6,5,4,3,2 into 10: 6+4, 5+3+2
        let items = [(0, 6), (1, 5), (2, 4), (3, 3), (4, 2)];
        let bins = best_fit_decreasing(&items, 10);
        assert_eq!(bins, vec![vec![0, 2], vec![1, 3, 4]]);
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let a = shuffled(1000, 7);
        let b = shuffled(1000, 7);
        let c = shuffled(1000, 8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
    }
}
