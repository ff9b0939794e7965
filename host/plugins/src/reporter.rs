//! A WebAssembly reporter behind [`lora_api::Reporter`].

use std::path::Path;

use lora_api::{CheckpointInfo, EvalMetrics, ExtError, RunInfo, RunSummary, StepMetrics};
use wasmtime::component::HasSelf;

use crate::bindings::v0_1_0::reporter as wit;
use crate::sandbox::{self, Sandbox};
use crate::{PluginError, PluginKind, PluginOptions, escape_controls};

use wit::exports::lora::plugin::report as w;

/// A running reporter plugin.
pub struct WasmReporter {
    sandbox: Sandbox,
    bindings: wit::Reporter,
}

/// Loads and configures the reporter at `path`. Its only possible filesystem access is
/// `options.grants.dir`, seen inside as `/out`.
pub fn load_reporter(
    path: &Path,
    options: &PluginOptions,
) -> Result<Box<dyn lora_api::Reporter>, PluginError> {
    Ok(Box::new(WasmReporter::load(path, options)?))
}

impl WasmReporter {
    pub fn load(path: &Path, options: &PluginOptions) -> Result<Self, PluginError> {
        const KIND: PluginKind = PluginKind::Reporter;
        let prepared = sandbox::prepare(path, KIND, options)?;
        let mut linker = sandbox::base_linker(KIND)?;
        wit::Reporter::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let pre = sandbox::link(&prepared, path, KIND, &linker, wit::ReporterPre::new)?;
        let mut sandbox = Sandbox::new(&prepared.name, KIND, options, None)?;
        let bindings =
            sandbox.instantiate(path, KIND, async |store| pre.instantiate_async(store).await)?;
        let settings = options.settings_list();
        let configured = sandbox.call("configure", None, async |store| {
            bindings
                .lora_plugin_report()
                .call_configure(store, &settings)
                .await
        })?;
        configured.map_err(|m| ExtError::failed(&prepared.name, "configure", escape_controls(&m)))?;
        Ok(WasmReporter { sandbox, bindings })
    }

    fn run(
        &mut self,
        call: &str,
        step: Option<u64>,
        f: impl AsyncFnOnce(
            &w::Guest,
            &mut wasmtime::Store<crate::sandbox::State>,
        ) -> wasmtime::Result<Result<(), String>>,
    ) -> Result<(), ExtError> {
        let Self { sandbox, bindings } = self;
        let r = sandbox.call(call, step, async |store| {
            f(bindings.lora_plugin_report(), store).await
        });
        let denied = sandbox.store.data().http_policy.take_denied();
        r?.map_err(|m| {
            let m = escape_controls(&m).into_owned();
            let m = if denied.is_empty() {
                m
            } else {
                format!("{m}; lora denied the request to {}", denied.join("; "))
            };
            let e = ExtError::failed(&sandbox.name, call, m);
            match step {
                Some(s) => e.with_batch(s),
                None => e,
            }
        })
    }
}

impl lora_api::Reporter for WasmReporter {
    fn name(&self) -> &str {
        &self.sandbox.name
    }

    fn on_start(&mut self, i: &RunInfo) -> Result<(), ExtError> {
        let info = w::RunInfo {
            run_id: i.run_id.clone(),
            params_json: i.params.to_string(),
            total_steps: i.total_steps,
            num_epochs: i.num_epochs,
            steps_per_epoch: i.steps_per_epoch,
            start_step: i.start_step,
            world_size: i.world_size,
        };
        self.run("on_start", None, async |g, s| g.call_on_start(s, &info).await)
    }

    fn on_step(&mut self, m: &StepMetrics) -> Result<(), ExtError> {
        let metrics = w::StepMetrics {
            step: m.step,
            epoch: m.epoch,
            max_steps: m.max_steps,
            loss: m.loss,
            grad_norm: m.grad_norm,
            learning_rate: m.learning_rate,
            tokens: m.tokens,
            trained_tokens: m.trained_tokens,
            tokens_per_second: m.tokens_per_second,
            elapsed_s: m.elapsed_s,
        };
        self.run("on_step", Some(m.step), async |g, s| g.call_on_step(s, metrics).await)
    }

    fn on_eval(&mut self, m: &EvalMetrics) -> Result<(), ExtError> {
        let metrics = w::EvalMetrics {
            step: m.step,
            epoch: m.epoch,
            eval_loss: m.eval_loss,
            perplexity: m.perplexity,
            eval_tokens: m.eval_tokens,
        };
        self.run("on_eval", Some(m.step), async |g, s| g.call_on_eval(s, metrics).await)
    }

    fn on_checkpoint(&mut self, c: &CheckpointInfo) -> Result<(), ExtError> {
        let info = w::CheckpointInfo {
            step: c.step,
            epoch: c.epoch,
            path: c.path.display().to_string(),
        };
        self.run("on_checkpoint", Some(c.step), async |g, s| g.call_on_checkpoint(s, &info).await)
    }

    fn on_finish(&mut self, r: &RunSummary) -> Result<(), ExtError> {
        let summary = w::RunSummary {
            total_steps: r.total_steps,
            epochs: r.epochs,
            train_loss: r.train_loss,
            final_loss: r.final_loss,
            min_loss: r.min_loss,
            final_eval_loss: r.final_eval_loss,
            final_perplexity: r.final_perplexity,
            tokens: r.tokens,
            trained_tokens: r.trained_tokens,
            tokens_per_second: r.tokens_per_second,
            peak_memory_bytes: r.peak_memory_bytes,
            train_runtime: r.train_runtime,
        };
        self.run("on_finish", None, async |g, s| g.call_on_finish(s, summary).await)
    }
}
