//! The epoch plan: nothing lost or duplicated, every row and micro-batch within its budget, the
//! same seed gives the same plan, and ranks share the work.

use std::collections::BTreeMap;

use lora_data::{DataConfig, DataReport, PreparedData, TokenizedSample};

/// Samples of varied lengths (1..=max) with a trained tail, deterministic.
fn samples(n: usize, max_len: usize) -> Vec<TokenizedSample> {
    let mut x = 12345u64;
    (0..n)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 2 + (x >> 33) as usize % (max_len - 1);
            let ids: Vec<u32> = (0..len as u32).map(|t| (i as u32 * 7 + t) % 1000).collect();
            let mask: Vec<bool> = (0..len).map(|t| t >= len / 2).collect();
            TokenizedSample {
                input_ids: ids,
                train_mask: mask,
            }
        })
        .collect()
}

fn prepared(cfg: DataConfig, train: Vec<TokenizedSample>) -> PreparedData {
    PreparedData {
        config: cfg,
        train,
        validation: Vec::new(),
        report: DataReport::default(),
    }
}

fn cfg(world_size: usize, rank: usize, packing: bool) -> DataConfig {
    DataConfig {
        max_seq_len: 256,
        max_tokens_per_gpu: 600,
        effective_batch_size: 32,
        sample_packing: packing,
        world_size,
        rank,
        seed: 7,
        ..DataConfig::default()
    }
}

fn check_epoch(world_size: usize, packing: bool) {
    let train = samples(1000, 256);
    let steps = prepared(cfg(world_size, 0, packing), train.clone()).steps_per_epoch();
    assert_eq!(steps, 1000usize.div_ceil(32));
    for epoch in 0..2 {
        let mut seen: BTreeMap<u32, usize> = BTreeMap::new();
        let plans: Vec<_> = (0..world_size)
            .map(|r| prepared(cfg(world_size, r, packing), train.clone()).epoch_plan(epoch))
            .collect();
        for s in 0..steps {
            let mut step_samples = 0;
            let mut step_trained = 0u64;
            for plan in &plans {
                let step = &plan.steps[s];
                assert_eq!(
                    step.samples,
                    if s + 1 < steps {
                        32
                    } else {
                        1000 - 32 * (steps - 1)
                    }
                );
                for mb in &step.micro_batches {
                    assert!(mb.tokens() <= 600, "micro-batch of {} tokens", mb.tokens());
                    for row in &mb.rows {
                        assert!(row.len() <= 256, "row of {} tokens", row.len());
                        assert_eq!(
                            row.seq_lens.iter().map(|&l| l as usize).sum::<usize>(),
                            row.len()
                        );
                        assert_eq!(row.train_mask.len(), row.len());
                        if !packing {
                            assert_eq!(row.sample_ids.len(), 1);
                        }
                        // Rows are the documents back to back, positions restart per document.
                        let mut at = 0;
                        for (&id, &l) in row.sample_ids.iter().zip(&row.seq_lens) {
                            let doc = &train[id as usize];
                            assert_eq!(&row.input_ids[at..at + l as usize], &doc.input_ids[..]);
                            assert_eq!(&row.train_mask[at..at + l as usize], &doc.train_mask[..]);
                            at += l as usize;
                        }
                        let pos = row.position_ids();
                        assert_eq!(pos.iter().filter(|&&p| p == 0).count(), row.seq_lens.len());
                        for &id in &row.sample_ids {
                            *seen.entry(id).or_default() += 1;
                            step_samples += 1;
                            step_trained += train[id as usize].trained_tokens() as u64;
                        }
                    }
                }
                assert_eq!(
                    step.trained_tokens, plans[0].steps[s].trained_tokens,
                    "every rank knows the global normaliser"
                );
            }
            assert_eq!(
                step_samples, plans[0].steps[s].samples,
                "step {s}: ranks together hold the step's samples"
            );
            assert_eq!(step_trained, plans[0].steps[s].trained_tokens);
        }
        assert_eq!(seen.len(), 1000, "epoch {epoch}: every sample appears");
        assert!(
            seen.values().all(|&c| c == 1),
            "epoch {epoch}: no sample twice"
        );
    }
}

#[test]
fn one_gpu_packed_epoch_keeps_every_sample_once_within_budgets() {
    check_epoch(1, true);
}

#[test]
fn three_gpus_packed_epoch_keeps_every_sample_once_within_budgets() {
    check_epoch(3, true);
}

#[test]
fn unpacked_epoch_has_one_sample_per_row() {
    check_epoch(2, false);
}

#[test]
fn same_seed_same_plan_other_epoch_other_order() {
    let train = samples(300, 256);
    let a = prepared(cfg(1, 0, true), train.clone());
    let b = prepared(cfg(1, 0, true), train.clone());
    assert_eq!(a.epoch_plan(0), b.epoch_plan(0));
    let order = |p: &PreparedData, e| -> Vec<u32> {
        p.epoch_plan(e)
            .steps
            .iter()
            .flat_map(|s| {
                s.micro_batches
                    .iter()
                    .flat_map(|m| m.rows.iter().flat_map(|r| r.sample_ids.clone()))
            })
            .collect()
    };
    assert_ne!(order(&a, 0), order(&a, 1), "each epoch reshuffles");
    let mut other = cfg(1, 0, true);
    other.seed = 8;
    assert_ne!(
        order(&a, 0),
        order(&prepared(other, train), 0),
        "the seed changes the order"
    );
}

#[test]
fn packing_fills_rows() {
    // 64 samples of 100 tokens, rows of 256: two per row → 32 rows, not 64.
    let train: Vec<TokenizedSample> = (0..64)
        .map(|_| TokenizedSample {
            input_ids: vec![1; 100],
            train_mask: vec![true; 100],
        })
        .collect();
    let mut c = cfg(1, 0, true);
    c.effective_batch_size = 64;
    c.num_epochs = 1;
    let p = prepared(c, train);
    let s = p.summary();
    assert_eq!(s.epochs[0].rows, 32);
    assert_eq!(s.epochs[0].optimizer_steps, 1);
    // 600-token micro-batches hold 3 rows of 200: 11 micro-batches for 32 rows.
    assert_eq!(s.epochs[0].micro_batches, 11);
    assert_eq!(s.epochs[0].tokens, 6400);
}
