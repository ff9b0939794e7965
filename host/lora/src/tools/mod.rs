//! The tool commands next to training: `lora selftest` (the engine's op-by-op check),
//! `lora bench` (training throughput on a random-weight model of a given shape) and
//! `lora plugin inspect|check` (what a WebAssembly plugin is, and what it does on sample input).
//!
//! Owns: their command-line syntax, the translation of flags into the engine's and the plugin
//! runtime's options, and the text they print. Must not: implement engine ops or plugin
//! runtime behaviour (those live in `lora-engine` and `lora-plugins`), or exit the process
//! (errors go back to `main` as [`ToolError`], which picks the exit code).

mod bench;
mod plugin;
mod selftest;

use clap::{ArgMatches, Command};
use lora_engine::Device;

pub use bench::{ModelFlops, model_flops_per_step};

/// The tool subcommands, for [`crate::cli::command`].
pub fn commands() -> Vec<Command> {
    vec![selftest::command(), bench::command(), plugin::command()]
}

/// The names of the tool subcommands.
pub const NAMES: [&str; 3] = ["selftest", "bench", "plugin"];

/// Runs tool subcommand `name` (one of [`NAMES`]) with its matches.
pub fn run(name: &str, m: &ArgMatches) -> Result<(), ToolError> {
    match name {
        "selftest" => selftest::run(m),
        "bench" => bench::run(m),
        "plugin" => plugin::run(m),
        other => Err(ToolError::input(
            anyhow::anyhow!("`{other}` is not a tool command ({})", NAMES.join(", ")),
            "",
        )),
    }
}

/// Why a tool command failed: bad input (exit 2) or a failed check or run (exit 1), with a hint
/// for what to do next.
#[derive(Debug)]
pub struct ToolError {
    source: anyhow::Error,
    bad_input: bool,
    hint: &'static str,
}

impl ToolError {
    /// The user asked for something impossible (a missing file, a bad flag value): exit 2.
    pub fn input(source: impl Into<anyhow::Error>, hint: &'static str) -> Self {
        ToolError {
            source: source.into(),
            bad_input: true,
            hint,
        }
    }

    /// The command ran and failed (a failing check, no GPU, a plugin trap): exit 1.
    pub fn failed(source: impl Into<anyhow::Error>, hint: &'static str) -> Self {
        ToolError {
            source: source.into(),
            bad_input: false,
            hint,
        }
    }

    pub fn exit_code(&self) -> u8 {
        if self.bad_input { 2 } else { 1 }
    }

    pub fn hint(&self) -> &'static str {
        self.hint
    }
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for ToolError {
    /// The rest of the chain (this error's own text is the outermost context's).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

/// Help text of every `--device` flag.
pub(crate) const DEVICE_HELP: &str = "cpu, cuda (the GPU of LOCAL_RANK, default 0, among CUDA_VISIBLE_DEVICES), cuda:N, or emu (the CUDA backend on the CPU device emulator: the same kernels, slowly, no GPU needed)";

/// Parses `--device`: `cpu`, `cuda` or `cuda:N`.
pub(crate) fn parse_device(s: &str) -> Result<Device, ToolError> {
    const HINT: &str = "hint: --device takes cpu, cuda, cuda:N or emu";
    match s {
        "cpu" => Ok(Device::Cpu),
        "emu" => Ok(Device::Emu),
        "cuda" => lora_engine::cuda::local_rank_ordinal()
            .map(Device::Cuda)
            .map_err(|e| ToolError::input(e, HINT)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => Err(ToolError::input(
                anyhow::anyhow!("--device: expected cpu, cuda, cuda:N or emu, got `{s}`"),
                HINT,
            )),
        },
    }
}

/// The hint after a CUDA device could not be opened.
pub(crate) fn device_hint(device: Device) -> &'static str {
    match device {
        Device::Cpu => "",
        Device::Emu => "hint: --device emu needs a build with a C++17 compiler (LORA_EMU unset); LORA_EMU_SCHEDULE takes forward, reverse or shuffled:<seed>; --device cpu runs without either",
        Device::Cuda(_) => {
            "hint: a GPU needs the NVIDIA driver (libcuda.so) on the library path and a visible device (nvidia-smi lists them); --device cpu runs without one"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_commands() {
        let names: Vec<String> = commands()
            .iter()
            .map(|c| c.get_name().to_string())
            .collect();
        assert_eq!(names, NAMES);
    }

    #[test]
    fn device_flag_forms() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("cuda:3").unwrap(), Device::Cuda(3));
        assert_eq!(parse_device("emu").unwrap(), Device::Emu);
        for bad in ["", "CPU", "cuda:", "cuda:x", "tpu", "cuda:-1"] {
            let e = parse_device(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.to_string().contains("--device"), "{bad}: {e}");
        }
    }
}
