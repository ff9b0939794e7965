//! Example reporter: posts every run event as one JSON document to an HTTP endpoint (a metrics
//! collector, a chat webhook, an MLflow or W&B bridge). It needs the `wasi:http` grant for the
//! endpoint's host, and nothing else:
//!
//! ```json
//! {"webhook_reporter": {
//!    "settings": {"url": "https://metrics.internal/lora", "bearer_token_env": "METRICS_TOKEN"},
//!    "grants": {"http": ["https://metrics.internal"], "env": ["METRICS_TOKEN"]}}}
//! ```
//!
//! Settings:
//! - `url` (required): where to `POST`, `http://` or `https://`.
//! - `bearer_token_env`: the name of an environment variable (grant it with `grants.env`) whose
//!   value is sent as `Authorization: Bearer …`. Tokens do not belong in settings, which are
//!   recorded in the run manifest.
//! - `events`: which events to send, comma-separated (default
//!   `start,step,eval,checkpoint,finish`).
//! - `on_error`: `fail` (default: a failed delivery fails the run, naming the plugin and the
//!   step) or `warn` (log it and go on).
//!
//! Each body is `{"event": "step", "run_id": "...", ...the event's fields}`; `start` carries
//! the resolved parameters under `params`.

use lora_plugin::Settings;
use lora_plugin::reporter::{
    CheckpointInfo, EvalMetrics, Reporter, RunInfo, RunSummary, StepMetrics,
};
use lora_plugin::{http, log};
use serde_json::{Value, json};

const EVENTS: [&str; 5] = ["start", "step", "eval", "checkpoint", "finish"];

struct WebhookReporter {
    url: String,
    authorization: Option<String>,
    events: Vec<String>,
    fail_on_error: bool,
    run_id: String,
}

impl WebhookReporter {
    fn send(&self, event: &str, mut fields: Value) -> Result<(), String> {
        if !self.events.iter().any(|e| e == event) {
            return Ok(());
        }
        fields["event"] = json!(event);
        fields["run_id"] = json!(self.run_id);
        let headers: Vec<(&str, &str)> = self
            .authorization
            .as_deref()
            .map(|a| ("authorization", a))
            .into_iter()
            .collect();
        let sent = http::post_json(&self.url, &headers, &fields.to_string())
            .and_then(|r| r.ok().map_err(|e| format!("POST {}: {e}", self.url)));
        match sent {
            Ok(_) => Ok(()),
            Err(e) if !self.fail_on_error => {
                log::warn(&format!("{event} not delivered: {e}"));
                Ok(())
            }
            Err(e) => Err(format!("{event} not delivered: {e}")),
        }
    }
}

impl Reporter for WebhookReporter {
    fn configure(settings: &Settings) -> Result<Self, String> {
        settings.allow_only(&["url", "bearer_token_env", "events", "on_error"])?;
        let url = settings
            .get("url")
            .ok_or("setting `url` is required (the endpoint to POST events to)")?
            .to_string();
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(format!("setting `url` = `{url}` must start with http:// or https://"));
        }
        let authorization = match settings.get("bearer_token_env") {
            None => None,
            Some(var) => {
                let token = std::env::var(var).map_err(|_| {
                    format!("setting `bearer_token_env`: `{var}` is not set; grant it with `grants.env`")
                })?;
                Some(format!("Bearer {token}"))
            }
        };
        let events: Vec<String> = match settings.get("events") {
            None => EVENTS.iter().map(|e| e.to_string()).collect(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(|e| {
                    if EVENTS.contains(&e) {
                        Ok(e.to_string())
                    } else {
                        Err(format!("setting `events`: `{e}` is not one of {}", EVENTS.join(", ")))
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        let fail_on_error = match settings.get("on_error").unwrap_or("fail") {
            "fail" => true,
            "warn" => false,
            other => return Err(format!("setting `on_error` = `{other}`; expected `fail` or `warn`")),
        };
        Ok(WebhookReporter { url, authorization, events, fail_on_error, run_id: String::new() })
    }

    fn on_start(&mut self, info: RunInfo) -> Result<(), String> {
        self.run_id = info.run_id;
        let params: Value = serde_json::from_str(&info.params_json).unwrap_or(Value::Null);
        self.send(
            "start",
            json!({
                "params": params,
                "total_steps": info.total_steps,
                "num_epochs": info.num_epochs,
                "steps_per_epoch": info.steps_per_epoch,
                "start_step": info.start_step,
                "world_size": info.world_size,
            }),
        )
    }

    fn on_step(&mut self, m: StepMetrics) -> Result<(), String> {
        self.send(
            "step",
            json!({
                "step": m.step, "epoch": m.epoch, "max_steps": m.max_steps, "loss": m.loss,
                "grad_norm": m.grad_norm, "learning_rate": m.learning_rate, "tokens": m.tokens,
                "trained_tokens": m.trained_tokens, "tokens_per_second": m.tokens_per_second,
                "elapsed_s": m.elapsed_s,
            }),
        )
    }

    fn on_eval(&mut self, m: EvalMetrics) -> Result<(), String> {
        self.send(
            "eval",
            json!({
                "step": m.step, "epoch": m.epoch, "eval_loss": m.eval_loss,
                "perplexity": m.perplexity, "eval_tokens": m.eval_tokens,
            }),
        )
    }

    fn on_checkpoint(&mut self, c: CheckpointInfo) -> Result<(), String> {
        self.send("checkpoint", json!({"step": c.step, "epoch": c.epoch, "path": c.path}))
    }

    fn on_finish(&mut self, s: RunSummary) -> Result<(), String> {
        self.send(
            "finish",
            json!({
                "total_steps": s.total_steps, "epochs": s.epochs, "train_loss": s.train_loss,
                "final_loss": s.final_loss, "min_loss": s.min_loss,
                "final_eval_loss": s.final_eval_loss, "final_perplexity": s.final_perplexity,
                "tokens": s.tokens, "trained_tokens": s.trained_tokens,
                "tokens_per_second": s.tokens_per_second,
                "peak_memory_bytes": s.peak_memory_bytes, "train_runtime": s.train_runtime,
            }),
        )
    }
}

lora_plugin::export_reporter!(WebhookReporter);
