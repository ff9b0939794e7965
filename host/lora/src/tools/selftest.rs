//! `lora selftest --device cpu|cuda[:N] [--seed N]`: runs `lora_engine::selftest`, prints its
//! table (op, shape, max abs err, max rel err, pass) and fails when any row failed.

use clap::{Arg, ArgMatches, Command};

use super::{DEVICE_HELP, ToolError, device_hint, parse_device};

pub(super) fn command() -> Command {
    Command::new("selftest")
        .about("Check every engine op on random inputs: cpu against float64 formulas (and finite differences), cuda against the cpu backend; prints one table, exits 1 on any failure")
        .arg(Arg::new("device").long("device").value_name("DEVICE").default_value("cpu").help(DEVICE_HELP))
        .arg(
            Arg::new("seed")
                .long("seed")
                .value_name("N")
                .value_parser(clap::value_parser!(u64))
                .help("Seed of the random inputs (default: drawn from the clock and printed, so a failure can be rerun)"),
        )
}

pub(super) fn run(m: &ArgMatches) -> Result<(), ToolError> {
    let device = parse_device(m.get_one::<String>("device").map_or("cpu", String::as_str))?;
    let seed = m.get_one::<u64>("seed").copied();
    let report = lora_engine::selftest::run(device, seed).map_err(|e| {
        ToolError::failed(
            anyhow::Error::new(e).context(format!("selftest on {device} could not start")),
            device_hint(device),
        )
    })?;
    println!("{report}");
    if report.passed() {
        Ok(())
    } else {
        Err(ToolError::failed(
            anyhow::anyhow!(
                "selftest on {device}: {} of {} checks failed (seed {}; the FAIL rows above name the op and shape)",
                report.failures(),
                report.rows.len(),
                report.seed
            ),
            "hint: rerun with the same --seed to reproduce",
        ))
    }
}
