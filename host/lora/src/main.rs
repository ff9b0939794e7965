//! The `lora` binary: parse the command line, run it, print the whole error chain and a hint
//! on failure. Exit codes: 0 success, 2 bad parameters or input, 1 a failed run.

use std::process::ExitCode;

fn main() -> ExitCode {
    let env: Vec<(String, String)> = std::env::vars().collect();
    match lora::cli::run(std::env::args_os(), env) {
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
