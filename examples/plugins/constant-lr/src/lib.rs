//! Linear warmup to the base learning rate, then a constant rate, optionally scaled by the
//! setting `scale` (default 1.0).

use lora_plugin::scheduler::{ScheduleContext, Scheduler};

struct ConstantLr {
    lr: f64,
    warmup: u64,
}

impl Scheduler for ConstantLr {
    fn create(ctx: ScheduleContext) -> Result<Self, String> {
        ctx.settings.allow_only(&["scale"])?;
        let scale: f64 = ctx.settings.parse_or("scale", 1.0)?;
        if !(scale > 0.0) {
            return Err(format!("setting `scale` = {scale} must be positive"));
        }
        Ok(ConstantLr {
            lr: ctx.base_lr * scale,
            warmup: ctx.warmup_steps,
        })
    }

    fn learning_rate(&mut self, step: u64) -> Result<f64, String> {
        Ok(if step < self.warmup {
            self.lr * (step as f64 / self.warmup as f64)
        } else {
            self.lr
        })
    }
}

lora_plugin::export_scheduler!(ConstantLr);
