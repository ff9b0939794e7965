//! Example scheduler with three schedules, chosen by the setting `schedule`:
//!
//! - `cosine` (default): linear warmup, then half a cosine to 0, exactly as
//!   `transformers.get_cosine_schedule_with_warmup` (`num_cycles = 0.5`).
//! - `one_cycle`: PyTorch's `OneCycleLR` (cosine annealing, `three_phase = false`). Settings
//!   `pct_start` (default: warmup steps / total steps, or 0.3 without warmup), `div_factor`
//!   (25), `final_div_factor` (10000).
//! - `plateau`: linear warmup, then the rate is multiplied by `factor` (0.5) whenever the loss
//!   has not improved by a relative `threshold` (1e-4) for `patience` (10) steps; never below
//!   `min_lr` (0). Driven by the losses the run reports, so it is replayed correctly on resume.

use std::f64::consts::PI;

use lora_plugin::math::cos;
use lora_plugin::scheduler::{ScheduleContext, Scheduler};

enum Schedules {
    Cosine {
        base: f64,
        warmup: u64,
        total: u64,
    },
    OneCycle {
        initial: f64,
        max: f64,
        min: f64,
        phase1_end: f64,
        phase2_end: f64,
    },
    Plateau(Plateau),
}

struct Plateau {
    base: f64,
    warmup: u64,
    lr: f64,
    factor: f64,
    patience: u64,
    threshold: f64,
    min_lr: f64,
    best: f64,
    bad_steps: u64,
}

fn anneal_cos(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * (cos(PI * pct) + 1.0)
}

impl Scheduler for Schedules {
    fn create(ctx: ScheduleContext) -> Result<Self, String> {
        let s = &ctx.settings;
        let kind = s.get("schedule").unwrap_or("cosine");
        let total = ctx.total_steps.max(1);
        match kind {
            "cosine" => {
                s.allow_only(&["schedule"])?;
                Ok(Schedules::Cosine {
                    base: ctx.base_lr,
                    warmup: ctx.warmup_steps,
                    total,
                })
            }
            "one_cycle" => {
                s.allow_only(&["schedule", "pct_start", "div_factor", "final_div_factor"])?;
                let default_pct = if ctx.warmup_steps > 0 {
                    ctx.warmup_steps as f64 / total as f64
                } else {
                    0.3
                };
                let pct_start: f64 = s.parse_or("pct_start", default_pct)?;
                if !(0.0..1.0).contains(&pct_start) {
                    return Err(format!(
                        "setting `pct_start` = {pct_start} must be in [0, 1)"
                    ));
                }
                let div: f64 = s.parse_or("div_factor", 25.0)?;
                let final_div: f64 = s.parse_or("final_div_factor", 1e4)?;
                let initial = ctx.base_lr / div;
                Ok(Schedules::OneCycle {
                    initial,
                    max: ctx.base_lr,
                    min: initial / final_div,
                    phase1_end: pct_start * total as f64 - 1.0,
                    phase2_end: total as f64 - 1.0,
                })
            }
            "plateau" => {
                s.allow_only(&["schedule", "factor", "patience", "threshold", "min_lr"])?;
                let factor: f64 = s.parse_or("factor", 0.5)?;
                if !(factor > 0.0 && factor < 1.0) {
                    return Err(format!("setting `factor` = {factor} must be in (0, 1)"));
                }
                Ok(Schedules::Plateau(Plateau {
                    base: ctx.base_lr,
                    warmup: ctx.warmup_steps,
                    lr: ctx.base_lr,
                    factor,
                    patience: s.parse_or("patience", 10)?,
                    threshold: s.parse_or("threshold", 1e-4)?,
                    min_lr: s.parse_or("min_lr", 0.0)?,
                    best: f64::INFINITY,
                    bad_steps: 0,
                }))
            }
            other => Err(format!(
                "setting `schedule` = `{other}`; expected `cosine`, `one_cycle` or `plateau`"
            )),
        }
    }

    fn learning_rate(&mut self, step: u64) -> Result<f64, String> {
        Ok(match self {
            Schedules::Cosine {
                base,
                warmup,
                total,
            } => {
                // The factor first, then `base * factor`, in transformers' order of operations.
                let factor = if step < *warmup {
                    step as f64 / (*warmup).max(1) as f64
                } else {
                    let progress =
                        (step - *warmup) as f64 / (total.saturating_sub(*warmup)).max(1) as f64;
                    f64::max(0.0, 0.5 * (1.0 + cos(PI * 0.5 * 2.0 * progress)))
                };
                *base * factor
            }
            Schedules::OneCycle {
                initial,
                max,
                min,
                phase1_end,
                phase2_end,
            } => {
                let s = step as f64;
                if s <= *phase1_end {
                    anneal_cos(*initial, *max, s / *phase1_end)
                } else {
                    anneal_cos(*max, *min, (s - *phase1_end) / (*phase2_end - *phase1_end))
                }
            }
            Schedules::Plateau(p) => {
                if step < p.warmup {
                    p.base * (step as f64 / p.warmup as f64)
                } else {
                    p.lr
                }
            }
        })
    }

    fn observe_loss(&mut self, step: u64, loss: f64) -> Result<(), String> {
        let Schedules::Plateau(p) = self else {
            return Ok(());
        };
        if !loss.is_finite() {
            return Err(format!("loss of step {step} is {loss}"));
        }
        if step < p.warmup {
            return Ok(());
        }
        if loss < p.best * (1.0 - p.threshold) {
            p.best = loss;
            p.bad_steps = 0;
        } else {
            p.bad_steps += 1;
            if p.bad_steps > p.patience {
                p.lr = (p.lr * p.factor).max(p.min_lr);
                p.bad_steps = 0;
                lora_plugin::log::info(&format!(
                    "step {step}: loss plateaued, learning rate now {}",
                    p.lr
                ));
            }
        }
        Ok(())
    }
}

lora_plugin::export_scheduler!(Schedules);
