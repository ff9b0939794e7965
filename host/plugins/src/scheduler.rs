//! A WebAssembly scheduler behind [`lora_api::Scheduler`].

use std::path::Path;

use lora_api::{ErrorKind, ExtError, ScheduleContext};
use wasmtime::component::{HasSelf, ResourceAny};

use crate::bindings::v0_1_0::scheduler as wit;
use crate::sandbox::{self, Sandbox};
use crate::{PluginError, PluginKind, PluginOptions};

/// A running scheduler plugin: one `schedule` resource in one instance.
pub struct WasmScheduler {
    sandbox: Sandbox,
    bindings: wit::Scheduler,
    schedule: ResourceAny,
}

/// Loads the scheduler at `path` and creates its schedule with `context`. The plugin's settings
/// are `context.settings` overlaid with `options.settings`.
pub fn load_scheduler(
    path: &Path,
    options: &PluginOptions,
    context: ScheduleContext,
) -> Result<Box<dyn lora_api::Scheduler>, PluginError> {
    Ok(Box::new(WasmScheduler::load(path, options, context)?))
}

impl WasmScheduler {
    pub fn load(
        path: &Path,
        options: &PluginOptions,
        context: ScheduleContext,
    ) -> Result<Self, PluginError> {
        let prepared = sandbox::prepare(path, PluginKind::Scheduler, options)?;
        let mut linker = sandbox::base_linker(PluginKind::Scheduler)?;
        wit::Scheduler::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let mut sandbox = Sandbox::new(&prepared.name, PluginKind::Scheduler, options, None)?;
        let component = prepared.loaded.component;
        let bindings = sandbox.instantiate(path, |store| {
            wit::Scheduler::instantiate(store, &component, &linker)
        })?;
        let mut settings = context.settings.clone();
        settings.extend(options.settings.iter().map(|(k, v)| (k.clone(), v.clone())));
        let ctx = wit::exports::lora::plugin::schedule::ScheduleContext {
            base_lr: context.base_lr,
            warmup_steps: context.warmup_steps,
            total_steps: context.total_steps,
            num_epochs: context.num_epochs,
            steps_per_epoch: context.steps_per_epoch,
            settings: settings.into_iter().collect(),
        };
        let created = sandbox.call("create", None, |store| {
            bindings
                .lora_plugin_schedule()
                .schedule()
                .call_create(store, &ctx)
        })?;
        let schedule = created.map_err(|m| ExtError::failed(&prepared.name, "create", m))?;
        Ok(WasmScheduler {
            sandbox,
            bindings,
            schedule,
        })
    }
}

impl lora_api::Scheduler for WasmScheduler {
    fn name(&self) -> &str {
        &self.sandbox.name
    }

    fn learning_rate(&mut self, step: u64) -> Result<f64, ExtError> {
        const CALL: &str = "learning_rate";
        let Self {
            sandbox,
            bindings,
            schedule,
        } = self;
        let r = sandbox.call(CALL, Some(step), |store| {
            bindings
                .lora_plugin_schedule()
                .schedule()
                .call_learning_rate(store, *schedule, step)
        })?;
        let lr = r.map_err(|m| ExtError::failed(&sandbox.name, CALL, m).with_batch(step))?;
        if !lr.is_finite() || lr < 0.0 {
            return Err(ExtError::new(
                &sandbox.name,
                CALL,
                ErrorKind::Contract,
                format!("returned learning rate {lr}; it must be finite and not negative"),
            )
            .with_batch(step));
        }
        Ok(lr)
    }

    fn observe_loss(&mut self, step: u64, loss: f64) -> Result<(), ExtError> {
        const CALL: &str = "observe_loss";
        let Self {
            sandbox,
            bindings,
            schedule,
        } = self;
        let r = sandbox.call(CALL, Some(step), |store| {
            bindings
                .lora_plugin_schedule()
                .schedule()
                .call_observe_loss(store, *schedule, step, loss)
        })?;
        r.map_err(|m| ExtError::failed(&sandbox.name, CALL, m).with_batch(step))
    }
}
