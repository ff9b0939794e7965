//! Host bindings of the WIT contract, one module per supported API version (today 0.1.0, from
//! the frozen `wit/since_v0.1.0/`). A future 0.2.0 adds `v0_2_0` next to it; the loaders pick
//! the module by the version the component's export names carry.

pub(crate) mod v0_1_0 {
    pub(crate) mod preprocessor {
        wasmtime::component::bindgen!({
            path: "../../wit/since_v0.1.0",
            world: "preprocessor",
            // Calls into the guest are async so a call can be abandoned at its deadline even
            // while the guest waits in a host future (a sleep, a poll, a blocking read); lora's
            // own host functions stay synchronous and may trap (limits).
            exports: { default: async },
            imports: { default: trappable },
        });
    }

    pub(crate) mod scheduler {
        wasmtime::component::bindgen!({
            path: "../../wit/since_v0.1.0",
            world: "scheduler",
            exports: { default: async },
            with: {
                "lora:plugin/types": super::preprocessor::lora::plugin::types,
                "lora:plugin/host": super::preprocessor::lora::plugin::host,
            },
        });
    }

    pub(crate) mod reporter {
        wasmtime::component::bindgen!({
            path: "../../wit/since_v0.1.0",
            world: "reporter",
            exports: { default: async },
            with: {
                "lora:plugin/types": super::preprocessor::lora::plugin::types,
                "lora:plugin/host": super::preprocessor::lora::plugin::host,
            },
        });
    }

    pub(crate) use preprocessor::lora::plugin::{host, text_tools, types};
}
