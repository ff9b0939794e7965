//! Schedulers: the learning rate of each optimizer step, told each step's loss.

use crate::{Settings, not_implemented};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "scheduler",
        pub_export_macro: true,
        export_macro_name: "__export_scheduler_world",
        default_bindings_module: "lora_plugin::scheduler::bindings",
    });
}

/// What a schedule is created with.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleContext {
    /// The peak learning rate (`training_learning_rate`).
    pub base_lr: f64,
    pub warmup_steps: u64,
    /// Optimizer steps in the whole run.
    pub total_steps: u64,
    pub num_epochs: u64,
    pub steps_per_epoch: u64,
    pub settings: Settings,
}

/// A learning-rate schedule for one run.
pub trait Scheduler: Sized + 'static {
    /// Creates the schedule; refuse settings you do not know ([`Settings::allow_only`]).
    fn create(context: ScheduleContext) -> Result<Self, String>;

    /// The learning rate applied by optimizer step `step` (0-based).
    fn learning_rate(&mut self, step: u64) -> Result<f64, String> {
        let _ = step;
        Err(not_implemented("Scheduler::learning_rate"))
    }

    /// The loss of finished step `step`, told in order (and replayed on resume). The default
    /// ignores it, which is right for schedules that depend only on the step.
    fn observe_loss(&mut self, step: u64, loss: f64) -> Result<(), String> {
        let _ = (step, loss);
        Ok(())
    }
}

#[doc(hidden)]
pub fn __context(c: bindings::exports::lora::plugin::schedule::ScheduleContext) -> ScheduleContext {
    ScheduleContext {
        base_lr: c.base_lr,
        warmup_steps: c.warmup_steps,
        total_steps: c.total_steps,
        num_epochs: c.num_epochs,
        steps_per_epoch: c.steps_per_epoch,
        settings: Settings(c.settings),
    }
}

/// Exports `$t` (a [`Scheduler`]) as this component's schedule and stamps the API version.
#[macro_export]
macro_rules! export_scheduler {
    ($t:ty) => {
        const _: () = {
            use $crate::scheduler::bindings::exports::lora::plugin::schedule as __wit;
            struct __LoraPluginExport;
            struct __LoraPluginSchedule(::std::cell::RefCell<$t>);
            impl __wit::Guest for __LoraPluginExport {
                type Schedule = __LoraPluginSchedule;
            }
            impl __wit::GuestSchedule for __LoraPluginSchedule {
                fn create(
                    context: __wit::ScheduleContext,
                ) -> ::std::result::Result<__wit::Schedule, ::std::string::String> {
                    let inner = <$t as $crate::scheduler::Scheduler>::create(
                        $crate::scheduler::__context(context),
                    )?;
                    ::std::result::Result::Ok(__wit::Schedule::new(__LoraPluginSchedule(
                        ::std::cell::RefCell::new(inner),
                    )))
                }
                fn learning_rate(
                    &self,
                    step: u64,
                ) -> ::std::result::Result<f64, ::std::string::String> {
                    <$t as $crate::scheduler::Scheduler>::learning_rate(
                        &mut self.0.borrow_mut(),
                        step,
                    )
                }
                fn observe_loss(
                    &self,
                    step: u64,
                    loss: f64,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    <$t as $crate::scheduler::Scheduler>::observe_loss(
                        &mut self.0.borrow_mut(),
                        step,
                        loss,
                    )
                }
            }
            $crate::scheduler::bindings::__export_scheduler_world!(
                __LoraPluginExport with_types_in $crate::scheduler::bindings
            );
            $crate::__stamp_api_version!();
        };
    };
}
