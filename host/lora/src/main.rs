//! The `lora` binary: parse the command line, run it, print the whole error chain and a hint
//! on failure. Exit codes: 0 success, 2 bad parameters or input, 1 a failed run.
//!
//! The environment is read as `OsString` (`std::env::vars` panics on a non-UTF-8 value, even of a
//! variable lora never reads); [`lora::cli::run`] decides which values must be text.

use std::process::ExitCode;

fn main() -> ExitCode {
    match lora::cli::run(std::env::args_os(), std::env::vars_os()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(lora::cli::CliError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            eprintln!("{}", e.hint());
            ExitCode::from(e.exit_code())
        }
    }
}
