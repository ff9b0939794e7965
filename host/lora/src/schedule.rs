//! Built-in learning-rate schedules, value for value the ones `transformers.get_scheduler` makes
//! (`transformers/optimization.py`, 5.17): each is `base_lr * lambda(step)` with the same float
//! arithmetic, so a golden file written by transformers compares value for value
//! (`tests/e2e/make_scheduler_goldens.py`).
//!
//! Transcendental functions come from the `libm` crate (a port of musl's libm), not from the
//! platform's C library: the rates are then the same bits on every host, and the same bits as a
//! WASM scheduler plugin computes with `lora_plugin::math` (this same crate). Python's
//! `math.cos` is glibc's, which differs from musl's in the last bit for a few arguments; the
//! golden test allows that one ulp and counts it.
//!
//! Extra settings come from `training_lr_scheduler_kwargs` (a JSON object); a key the chosen
//! schedule does not take is refused by name, as `get_scheduler` would raise a `TypeError`.

use std::collections::BTreeMap;
use std::f64::consts::PI;

use lora_api::{ExtError, ScheduleContext, Scheduler};
use libm::cos;

/// The schedule names accepted by `training_lr_scheduler`: the parameter validation's own list,
/// so the two cannot drift apart.
pub const SCHEDULER_NAMES: &[&str] = &lora_params::SCHEDULERS;

/// A schedule could not be built from the run's parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("training_lr_scheduler: unknown schedule `{0}` (accepted: {list})", list = SCHEDULER_NAMES.join(", "))]
    UnknownSchedule(String),
    #[error("training_lr_scheduler_kwargs: not a JSON object: {0}")]
    NotAnObject(String),
    #[error("training_lr_scheduler_kwargs: `{key}` is not a setting of the `{schedule}` schedule (it takes: {takes})")]
    UnknownKey { schedule: String, key: String, takes: String },
    #[error("training_lr_scheduler_kwargs: `{key}` = {value:?} for `{schedule}`: {why}")]
    BadValue { schedule: String, key: String, value: String, why: String },
}

/// The settings each schedule takes (the keyword arguments of its transformers function).
fn settings_of(schedule: &str) -> &'static [&'static str] {
    match schedule {
        "cosine" | "cosine_with_restarts" => &["num_cycles"],
        "polynomial" => &["lr_end", "power"],
        "inverse_sqrt" => &["timescale"],
        "warmup_stable_decay" => &[
            "num_decay_steps",
            "num_stable_steps",
            "warmup_type",
            "decay_type",
            "min_lr_ratio",
            "num_cycles",
        ],
        _ => &[],
    }
}

/// Turns the `training_lr_scheduler_kwargs` JSON object into [`ScheduleContext::settings`]
/// (strings as they are, numbers and booleans in their JSON spelling). Empty text is no settings.
pub fn kwargs_to_settings(kwargs_json: &str) -> Result<BTreeMap<String, String>, ScheduleError> {
    let mut settings = BTreeMap::new();
    if kwargs_json.trim().is_empty() {
        return Ok(settings);
    }
    let value: serde_json::Value =
        serde_json::from_str(kwargs_json).map_err(|e| ScheduleError::NotAnObject(format!("{e} in {kwargs_json:?}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(ScheduleError::NotAnObject(kwargs_json.to_string()));
    };
    for (key, value) in map {
        let text = match value {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        settings.insert(key, text);
    }
    Ok(settings)
}

/// How a warmup or decay phase of `warmup_stable_decay` is shaped.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Linear,
    Cosine,
    OneMinusSqrt,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Linear,
    Cosine { num_cycles: f64 },
    CosineWithRestarts { num_cycles: f64 },
    Polynomial { lr_end: f64, power: f64 },
    Constant,
    ConstantWithWarmup,
    InverseSqrt { timescale: f64 },
    WarmupStableDecay {
        num_stable_steps: i64,
        num_decay_steps: i64,
        warmup: Shape,
        decay: Shape,
        min_lr_ratio: f64,
        num_cycles: f64,
    },
}

/// One of the built-in schedules, ready to answer [`Scheduler::learning_rate`].
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltinScheduler {
    name: String,
    kind: Kind,
    base_lr: f64,
    warmup: i64,
    total: i64,
}

struct Settings<'a> {
    schedule: &'a str,
    map: &'a BTreeMap<String, String>,
}

impl Settings<'_> {
    fn bad(&self, key: &str, why: impl Into<String>) -> ScheduleError {
        ScheduleError::BadValue {
            schedule: self.schedule.to_string(),
            key: key.to_string(),
            value: self.map.get(key).cloned().unwrap_or_default(),
            why: why.into(),
        }
    }

    fn float(&self, key: &str, default: Option<f64>) -> Result<f64, ScheduleError> {
        match self.map.get(key) {
            None => default.ok_or_else(|| self.bad(key, "required by this schedule")),
            Some(text) => match text.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => Err(self.bad(key, "expected a finite number")),
            },
        }
    }

    fn int(&self, key: &str) -> Result<Option<i64>, ScheduleError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(text) => match text.parse::<i64>() {
                Ok(v) if v >= 0 => Ok(Some(v)),
                _ => Err(self.bad(key, "expected a whole number >= 0")),
            },
        }
    }

    fn shape(&self, key: &str, default: Shape) -> Result<Shape, ScheduleError> {
        match self.map.get(key).map(String::as_str) {
            None => Ok(default),
            Some("linear") => Ok(Shape::Linear),
            Some("cosine") => Ok(Shape::Cosine),
            Some("1-sqrt") => Ok(Shape::OneMinusSqrt),
            Some(_) => Err(self.bad(key, "expected `linear`, `cosine` or `1-sqrt`")),
        }
    }
}

impl BuiltinScheduler {
    /// Builds schedule `name` for a run. `ctx.settings` are the schedule's keyword arguments.
    pub fn new(name: &str, ctx: &ScheduleContext) -> Result<Self, ScheduleError> {
        if !SCHEDULER_NAMES.contains(&name) {
            return Err(ScheduleError::UnknownSchedule(name.to_string()));
        }
        let takes = settings_of(name);
        if let Some(key) = ctx.settings.keys().find(|k| !takes.contains(&k.as_str())) {
            return Err(ScheduleError::UnknownKey {
                schedule: name.to_string(),
                key: key.clone(),
                takes: if takes.is_empty() { "nothing".to_string() } else { takes.join(", ") },
            });
        }
        let s = Settings { schedule: name, map: &ctx.settings };
        let warmup = ctx.warmup_steps as i64;
        let total = ctx.total_steps as i64;
        let kind = match name {
            "linear" => Kind::Linear,
            "cosine" => Kind::Cosine { num_cycles: s.float("num_cycles", Some(0.5))? },
            "cosine_with_restarts" => Kind::CosineWithRestarts { num_cycles: s.float("num_cycles", Some(1.0))? },
            "polynomial" => {
                let lr_end = s.float("lr_end", Some(1e-7))?;
                if ctx.base_lr <= lr_end {
                    return Err(s.bad(
                        "lr_end",
                        format!("must be smaller than the learning rate ({})", ctx.base_lr),
                    ));
                }
                Kind::Polynomial { lr_end, power: s.float("power", Some(1.0))? }
            }
            "constant" => Kind::Constant,
            "constant_with_warmup" => Kind::ConstantWithWarmup,
            "inverse_sqrt" => {
                let timescale = match s.int("timescale")? {
                    Some(0) => return Err(s.bad("timescale", "must be > 0")),
                    Some(t) => t,
                    None if warmup > 0 => warmup,
                    None => 10_000,
                };
                Kind::InverseSqrt { timescale: timescale as f64 }
            }
            "warmup_stable_decay" => {
                // transformers requires num_decay_steps; we default it to a tenth of the run
                // (at least one step) so the schedule can be chosen by name alone.
                let num_decay_steps = s.int("num_decay_steps")?.unwrap_or(((total + 9) / 10).max(1));
                let num_stable_steps = match s.int("num_stable_steps")? {
                    Some(n) => n,
                    None => total - warmup - num_decay_steps,
                };
                Kind::WarmupStableDecay {
                    num_stable_steps,
                    num_decay_steps,
                    warmup: s.shape("warmup_type", Shape::Linear)?,
                    decay: s.shape("decay_type", Shape::Cosine)?,
                    min_lr_ratio: s.float("min_lr_ratio", Some(0.0))?,
                    num_cycles: s.float("num_cycles", Some(0.5))?,
                }
            }
            _ => unreachable!("checked against SCHEDULER_NAMES above"),
        };
        Ok(BuiltinScheduler { name: name.to_string(), kind, base_lr: ctx.base_lr, warmup, total })
    }

    /// `lambda(step)`: the factor transformers' `LambdaLR` multiplies the base rate by.
    fn factor(&self, step: i64) -> f64 {
        let (warmup, total) = (self.warmup, self.total);
        let warming = step < warmup;
        let warm_factor = step as f64 / (warmup.max(1) as f64);
        match &self.kind {
            Kind::Constant => 1.0,
            Kind::ConstantWithWarmup => {
                if warming {
                    warm_factor
                } else {
                    1.0
                }
            }
            Kind::Linear => {
                if warming {
                    return warm_factor;
                }
                f64::max(0.0, (total - step) as f64 / ((total - warmup).max(1) as f64))
            }
            Kind::Cosine { num_cycles } => {
                if warming {
                    return warm_factor;
                }
                let progress = (step - warmup) as f64 / ((total - warmup).max(1) as f64);
                f64::max(0.0, 0.5 * (1.0 + cos(PI * num_cycles * 2.0 * progress)))
            }
            Kind::CosineWithRestarts { num_cycles } => {
                if warming {
                    return warm_factor;
                }
                let progress = (step - warmup) as f64 / ((total - warmup).max(1) as f64);
                if progress >= 1.0 {
                    return 0.0;
                }
                f64::max(0.0, 0.5 * (1.0 + cos(PI * py_mod(num_cycles * progress, 1.0))))
            }
            Kind::Polynomial { lr_end, power } => {
                let lr_init = self.base_lr;
                if warming {
                    warm_factor
                } else if step > total || total == warmup {
                    lr_end / lr_init
                } else {
                    let lr_range = lr_init - lr_end;
                    let decay_steps = (total - warmup) as f64;
                    let pct_remaining = 1.0 - (step - warmup) as f64 / decay_steps;
                    let decay = lr_range * libm::pow(pct_remaining, *power) + lr_end;
                    decay / lr_init
                }
            }
            Kind::InverseSqrt { timescale } => {
                if warming {
                    return warm_factor;
                }
                let shift = timescale - warmup as f64;
                1.0 / ((step as f64 + shift) / timescale).sqrt()
            }
            Kind::WarmupStableDecay { num_stable_steps, num_decay_steps, warmup: wshape, decay, min_lr_ratio, num_cycles } => {
                if warming {
                    let progress = warm_factor;
                    let f = match wshape {
                        Shape::Linear => progress,
                        Shape::Cosine => 0.5 * (1.0 - cos(PI * progress)),
                        Shape::OneMinusSqrt => 1.0 - (1.0 - progress).sqrt(),
                    };
                    return f64::max(0.0, f * (1.0 - min_lr_ratio) + min_lr_ratio);
                }
                if step < warmup + num_stable_steps {
                    return 1.0;
                }
                if step < warmup + num_stable_steps + num_decay_steps {
                    let progress = (step - warmup - num_stable_steps) as f64 / ((*num_decay_steps).max(1) as f64);
                    let f = match decay {
                        Shape::Linear => 1.0 - progress,
                        Shape::Cosine => 0.5 * (1.0 + cos(PI * num_cycles * 2.0 * progress)),
                        Shape::OneMinusSqrt => 1.0 - progress.sqrt(),
                    };
                    return f64::max(0.0, f * (1.0 - min_lr_ratio) + min_lr_ratio);
                }
                *min_lr_ratio
            }
        }
    }
}

/// Python's float `%` (the result takes the sign of the divisor).
fn py_mod(a: f64, b: f64) -> f64 {
    let r = a % b;
    if r != 0.0 && (r < 0.0) != (b < 0.0) { r + b } else { r }
}

impl Scheduler for BuiltinScheduler {
    fn name(&self) -> &str {
        &self.name
    }

    fn learning_rate(&mut self, step: u64) -> Result<f64, ExtError> {
        Ok(self.base_lr * self.factor(step as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(warmup: u64, total: u64, kwargs: &str) -> ScheduleContext {
        ScheduleContext {
            base_lr: 2e-4,
            warmup_steps: warmup,
            total_steps: total,
            num_epochs: 1,
            steps_per_epoch: total,
            settings: kwargs_to_settings(kwargs).unwrap(),
        }
    }

    #[test]
    fn unknown_schedule_is_refused_with_the_accepted_list() {
        let err = BuiltinScheduler::new("cosine_annealing", &ctx(0, 10, "")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("training_lr_scheduler") && text.contains("cosine_annealing"), "{text}");
        assert!(text.contains("warmup_stable_decay"), "{text}");
    }

    #[test]
    fn a_setting_the_schedule_does_not_take_is_refused_by_name() {
        let err = BuiltinScheduler::new("linear", &ctx(0, 10, r#"{"num_cycles": 2}"#)).unwrap_err();
        assert!(matches!(&err, ScheduleError::UnknownKey { key, .. } if key == "num_cycles"), "{err}");
        let err = BuiltinScheduler::new("cosine", &ctx(0, 10, r#"{"power": 2}"#)).unwrap_err();
        assert!(err.to_string().contains("it takes: num_cycles"), "{err}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = BuiltinScheduler::new("cosine", &ctx(0, 10, r#"{"num_cycles": "many"}"#)).unwrap_err();
        assert!(err.to_string().contains("`num_cycles`"), "{err}");
        let err = BuiltinScheduler::new("polynomial", &ctx(0, 10, r#"{"lr_end": 1.0}"#)).unwrap_err();
        assert!(err.to_string().contains("lr_end") && err.to_string().contains("smaller"), "{err}");
        let err = BuiltinScheduler::new("warmup_stable_decay", &ctx(0, 10, r#"{"decay_type": "exp"}"#)).unwrap_err();
        assert!(err.to_string().contains("decay_type"), "{err}");
        assert!(kwargs_to_settings("[1,2]").is_err());
        assert!(kwargs_to_settings("{oops").is_err());
    }

    #[test]
    fn warmup_rises_linearly_to_the_base_rate() {
        let mut s = BuiltinScheduler::new("constant_with_warmup", &ctx(4, 10, "")).unwrap();
        let lrs: Vec<f64> = (0..6).map(|i| s.learning_rate(i).unwrap()).collect();
        assert_eq!(lrs, vec![0.0, 2e-4 * 0.25, 2e-4 * 0.5, 2e-4 * 0.75, 2e-4, 2e-4]);
    }
}

/// Golden test: every schedule against `transformers.get_scheduler`
/// (`tests/e2e/golden/schedulers.json`, written by `tests/e2e/make_scheduler_goldens.py`): bit for
/// bit, except where glibc's `cos` (Python) and musl's (ours) round the last bit differently. Those
/// may differ by what one ulp of the cosine moves the rate (`base_lr * EPSILON`), only in schedules
/// that take a cosine, and there must be few of them.
#[cfg(test)]
mod golden {
    use super::*;

    #[test]
    fn schedules_match_transformers_value_for_value() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/e2e/golden/schedulers.json");
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let base_lr = doc["base_lr"].as_f64().unwrap();
        let mut failures = Vec::new();
        let (mut values, mut one_ulp) = (0usize, 0usize);
        let cases = doc["cases"].as_array().unwrap();
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let ctx = ScheduleContext {
                base_lr,
                warmup_steps: case["warmup_steps"].as_u64().unwrap(),
                total_steps: case["total_steps"].as_u64().unwrap(),
                num_epochs: 1,
                steps_per_epoch: case["total_steps"].as_u64().unwrap(),
                settings: kwargs_to_settings(&case["kwargs"].to_string()).unwrap(),
            };
            let mut s = BuiltinScheduler::new(name, &ctx).unwrap();
            for (step, bits) in case["lr_bits"].as_array().unwrap().iter().enumerate() {
                let want = f64::from_bits(u64::from_str_radix(bits.as_str().unwrap(), 16).unwrap());
                let got = s.learning_rate(step as u64).unwrap();
                values += 1;
                if got.to_bits() == want.to_bits() {
                    continue;
                }
                // One ulp of a cosine in [-1, 1] is at most EPSILON / 2; the schedule halves it and
                // scales by the base rate, so that is all a different last bit of `cos` can move it.
                let takes_cos = name.contains("cosine") || name == "warmup_stable_decay";
                if takes_cos && (got - want).abs() <= base_lr * f64::EPSILON {
                    one_ulp += 1;
                } else {
                    let ulps = got.to_bits().abs_diff(want.to_bits());
                    failures.push(format!("{name} {} step {step}: ours {got:e}, transformers {want:e} ({ulps} ulp)", case["kwargs"]));
                }
            }
        }
        eprintln!("{values} rates: {} bit-identical to transformers, {one_ulp} apart by one ulp of `cos` (musl vs glibc)", values - one_ulp - failures.len());
        assert!(cases.len() >= 20);
        assert!(failures.is_empty(), "{} mismatches, first: {:#?}", failures.len(), &failures[..failures.len().min(10)]);
        assert!(one_ulp * 20 <= values, "{one_ulp} of {values} rates differ: more than libm rounding explains");
    }
}
