//! A WebAssembly scheduler behind [`lora_api::Scheduler`].

use std::path::Path;

use lora_api::{ErrorKind, ExtError, ScheduleContext};
use wasmtime::component::{HasSelf, ResourceAny};

use crate::bindings::v0_1_0::scheduler as wit;
use crate::sandbox::{self, Sandbox};
use crate::{PluginError, PluginKind, PluginOptions, escape_controls};

/// The largest learning rate a scheduler plugin may return. AdamW moves every adapter weight by
/// about the learning rate per step, and LoRA weights are of order 1e-2: a rate of 1 already
/// wrecks the adapter in one step, so 1e3 only catches garbage (1e300 overflows the update to
/// inf and the checkpoint to NaN) while leaving room for any schedule a person would write.
pub const MAX_LEARNING_RATE: f64 = 1e3;

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
        let (prepared, mut sandbox, bindings) = Self::instantiate(path, options)?;
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
        let created = sandbox.call("create", None, async |store| {
            bindings
                .lora_plugin_schedule()
                .schedule()
                .call_create(store, &ctx)
                .await
        })?;
        let schedule = created
            .map_err(|m| ExtError::failed(&prepared.name, "create", escape_controls(&m)))?;
        Ok(WasmScheduler {
            sandbox,
            bindings,
            schedule,
        })
    }

    /// Everything [`Self::load`] does but `create` (which needs the run's step counts): for
    /// checking a run's plugins before it starts.
    pub fn instantiate_only(path: &Path, options: &PluginOptions) -> Result<(), PluginError> {
        Self::instantiate(path, options).map(|_| ())
    }

    fn instantiate(
        path: &Path,
        options: &PluginOptions,
    ) -> Result<(sandbox::Prepared, Sandbox, wit::Scheduler), PluginError> {
        const KIND: PluginKind = PluginKind::Scheduler;
        let prepared = sandbox::prepare(path, KIND, options)?;
        let mut linker = sandbox::base_linker(KIND)?;
        wit::Scheduler::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let pre = sandbox::link(&prepared, path, KIND, &linker, wit::SchedulerPre::new)?;
        let mut sandbox = Sandbox::new(&prepared.name, KIND, options, None)?;
        let bindings =
            sandbox.instantiate(path, KIND, async |store| pre.instantiate_async(store).await)?;
        Ok((prepared, sandbox, bindings))
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
        let r = sandbox.call(CALL, Some(step), async |store| {
            bindings
                .lora_plugin_schedule()
                .schedule()
                .call_learning_rate(store, *schedule, step)
                .await
        })?;
        let lr = r.map_err(|m| {
            ExtError::failed(&sandbox.name, CALL, escape_controls(&m)).with_batch(step)
        })?;
        if !lr.is_finite() || !(0.0..=MAX_LEARNING_RATE).contains(&lr) {
            return Err(ExtError::new(
                &sandbox.name,
                CALL,
                ErrorKind::Contract,
                format!(
                    "returned learning rate {lr:e} for step {step}; it must be finite, not negative and at most {MAX_LEARNING_RATE:e}"
                ),
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
        let r = sandbox.call(CALL, Some(step), async |store| {
            bindings
                .lora_plugin_schedule()
                .schedule()
                .call_observe_loss(store, *schedule, step, loss)
                .await
        })?;
        r.map_err(|m| ExtError::failed(&sandbox.name, CALL, escape_controls(&m)).with_batch(step))
    }
}
