//! A deliberately hostile scheduler for the sandbox tests. The setting `attack` picks what it
//! does in the call named by `call` (`create`, `learning_rate` or `observe_loss`; default
//! `learning_rate`) from step `at_step` on (default 0; `create` has no step):
//!
//! - `sleep`: `std::thread::sleep` for `arg` seconds (default an hour);
//! - `poll-far`: block in `wasi:io/poll` on a monotonic instant centuries away;
//! - `value`: return `arg` (e.g. `1e300`, `NaN`, `-1`) as the learning rate.
//!
//! Otherwise the rate is the base learning rate.

use std::time::Duration;

use lora_plugin::Settings;
use lora_plugin::scheduler::{ScheduleContext, Scheduler};

struct Hostile {
    attack: String,
    call: String,
    arg: String,
    at_step: u64,
    base_lr: f64,
}

impl Hostile {
    fn attack(&self, call: &str, step: u64) -> Option<f64> {
        if call != self.call || (call != "create" && step < self.at_step) {
            return None;
        }
        match self.attack.as_str() {
            "sleep" => std::thread::sleep(Duration::from_secs(self.arg.parse().unwrap_or(3600))),
            "poll-far" => {
                let far = wasip2::clocks::monotonic_clock::subscribe_instant(u64::MAX);
                wasip2::io::poll::poll(&[&far]);
            }
            "value" => return self.arg.parse().ok(),
            _ => {}
        }
        None
    }
}

fn settings_of(s: &Settings) -> Result<(String, String, String, u64), String> {
    s.allow_only(&["attack", "call", "arg", "at_step"])?;
    let get = |k: &str, d: &str| s.get(k).unwrap_or(d).to_string();
    let at_step = get("at_step", "0")
        .parse()
        .map_err(|e| format!("at_step: {e}"))?;
    Ok((
        get("attack", ""),
        get("call", "learning_rate"),
        get("arg", ""),
        at_step,
    ))
}

impl Scheduler for Hostile {
    fn create(ctx: ScheduleContext) -> Result<Self, String> {
        let (attack, call, arg, at_step) = settings_of(&ctx.settings)?;
        let h = Hostile {
            attack,
            call,
            arg,
            at_step,
            base_lr: ctx.base_lr,
        };
        h.attack("create", 0);
        Ok(h)
    }

    fn learning_rate(&mut self, step: u64) -> Result<f64, String> {
        Ok(self.attack("learning_rate", step).unwrap_or(self.base_lr))
    }

    fn observe_loss(&mut self, step: u64, _loss: f64) -> Result<(), String> {
        self.attack("observe_loss", step);
        Ok(())
    }
}

lora_plugin::export_scheduler!(Hostile);
