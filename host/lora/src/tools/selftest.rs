//! `lora selftest --device cpu|cuda[:N]|emu [--seed N] [--stage env|ops|training|all]
//! [--family NAME]...`: runs `lora_engine::selftest` and prints its table (op, shape, max abs
//! err, max rel err, wall time, pass), one row as soon as it is known, and fails when any row
//! failed.
//!
//! Each family (`env`, one per op family, one per training variant) runs in a child process of
//! this binary (`--child`), watched: a line on stderr every 15 s says what is still running, a
//! family past `--family-timeout` is killed, and a child that dies (a sticky device fault, a
//! crash) becomes a failed row naming the family and the check it was running; the next family
//! starts on a fresh device context either way. `--in-process` runs everything in this process.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command as Proc, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Arg, ArgAction, ArgMatches, Command};
use lora_engine::Device;
use lora_engine::selftest::{self as st, Event, Row, Stage};

use super::{DEVICE_HELP, ToolError, device_hint, parse_device};

pub(super) fn command() -> Command {
    Command::new("selftest")
        .about("Check every engine op on random inputs: cpu against float64 formulas (and finite differences), cuda or emu against the cpu backend with CUDA's bf16 rounding, then a training comparison; prints each row as it finishes, exits 1 on any failure")
        .arg(Arg::new("device").long("device").value_name("DEVICE").default_value("cpu").help(DEVICE_HELP))
        .arg(
            Arg::new("seed")
                .long("seed")
                .value_name("N")
                .value_parser(clap::value_parser!(u64))
                .help("Seed of the random inputs (default: drawn from the clock and printed, so a failure can be rerun)"),
        )
        .arg(
            Arg::new("stage")
                .long("stage")
                .value_name("STAGE")
                .default_value("all")
                .help("env (what the device is: versions, SMs, shared memory), ops (every op), training (gradients, loss curve, rerun bytes), or all"),
        )
        .arg(
            Arg::new("family")
                .long("family")
                .value_name("NAME")
                .action(ArgAction::Append)
                .help("Run only this family (repeatable): env, an op family (gemm, attention, ...) or training:<variant>; an unknown name lists them"),
        )
        .arg(
            Arg::new("family-timeout")
                .long("family-timeout")
                .value_name("SECS")
                .value_parser(clap::value_parser!(u64).range(1..))
                .default_value("600")
                .help("Seconds one family's child process may run before it is killed and recorded as failed"),
        )
        .arg(
            Arg::new("in-process")
                .long("in-process")
                .action(ArgAction::SetTrue)
                .help("Run every family in this process (no child processes, no watchdog)"),
        )
        .arg(Arg::new("child").long("child").action(ArgAction::SetTrue).hide(true))
}

fn stage_of(m: &ArgMatches) -> Result<Stage, ToolError> {
    let s = m.get_one::<String>("stage").map_or("all", String::as_str);
    Stage::parse(s).ok_or_else(|| {
        ToolError::input(anyhow::anyhow!("--stage: expected env, ops, training or all, got `{s}`"), "hint: --stage env|ops|training|all")
    })
}

/// The families to run: `--family` names (checked) or those of the stage.
fn families_of(m: &ArgMatches, device: Device, stage: Stage) -> Result<Vec<String>, ToolError> {
    let all = st::families(device, Stage::All);
    match m.get_many::<String>("family") {
        None => Ok(st::families(device, stage)),
        Some(names) => {
            let names: Vec<String> = names.cloned().collect();
            if let Some(bad) = names.iter().find(|n| !all.contains(n)) {
                return Err(ToolError::input(
                    anyhow::anyhow!("--family: no family `{bad}` on {device} (families: {})", all.join(", ")),
                    "hint: --family takes one of the names listed",
                ));
            }
            Ok(names)
        }
    }
}

/// Refuses early, with the device's own message, when the device cannot be there at all.
fn preflight(device: Device) -> lora_engine::Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(i) => {
            lora_engine::cuda::open(i)?;
            Ok(())
        }
        Device::Emu => {
            lora_engine::cuda::open_emulated()?;
            Ok(())
        }
    }
}

pub(super) fn run(m: &ArgMatches) -> Result<(), ToolError> {
    let device = parse_device(m.get_one::<String>("device").map_or("cpu", String::as_str))?;
    let seed = m.get_one::<u64>("seed").copied();
    let stage = stage_of(m)?;
    let families = families_of(m, device, stage)?;
    if m.get_flag("child") {
        return child(device, seed.unwrap_or(0), &families);
    }
    preflight(device).map_err(|e| {
        ToolError::failed(anyhow::Error::new(e).context(format!("selftest on {device} could not start")), device_hint(device))
    })?;
    let seed = st::seed_or_clock(seed);
    let timeout = Duration::from_secs(m.get_one::<u64>("family-timeout").copied().unwrap_or(600));
    let started = Instant::now();
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{}", st::title(&device.to_string(), st::oracle_name(device), seed));
    let _ = writeln!(out, "{}", st::HEADER);
    let _ = out.flush();
    let mut rows: Vec<Row> = Vec::new();
    let print = |e: Event<'_>, rows: &mut Vec<Row>| {
        let mut out = std::io::stdout();
        match e {
            Event::Row(r) => {
                let _ = writeln!(out, "{r}");
                rows.push(r.clone());
            }
            Event::Info(k, v) => {
                let _ = writeln!(out, "# {k}: {v}");
            }
            Event::Start(_) => {}
        }
        let _ = out.flush();
    };
    for family in &families {
        if m.get_flag("in-process") {
            let r = st::run_family(device, seed, family, &mut |e| print(e, &mut rows));
            if let Err(e) = r {
                print(Event::Row(&Row::error(family, "", e.to_string())), &mut rows);
            }
        } else {
            run_child(device, seed, family, timeout, &mut |e| print(e, &mut rows));
        }
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{} ({:.1} s)", st::summary(&rows), started.elapsed().as_secs_f64());
    let _ = out.flush();
    let failures = rows.iter().filter(|r| !r.pass).count();
    if !rows.is_empty() && failures == 0 {
        Ok(())
    } else {
        Err(ToolError::failed(
            anyhow::anyhow!(
                "selftest on {device}: {failures} of {} checks failed (seed {seed}; the FAIL rows above name the op and shape)",
                rows.len()
            ),
            "hint: rerun with the same --seed (and --family NAME) to reproduce; LORA_CUDA_SYNC=1 names the op of an asynchronous GPU fault",
        ))
    }
}

/// `--child`: runs the families in this process and writes each event as one line for the
/// parent (`@start`, `@info`, `@row` + JSON).
fn child(device: Device, seed: u64, families: &[String]) -> Result<(), ToolError> {
    let mut out = std::io::stdout();
    let mut emit = |e: Event<'_>| {
        let line = match e {
            Event::Start(s) => format!("@start\t{}", s.replace(['\n', '\t'], " ")),
            Event::Info(k, v) => format!("@info\t{}\t{}", k.replace(['\n', '\t'], " "), v.replace(['\n', '\t'], " ")),
            Event::Row(r) => format!("@row\t{}", serde_json::to_string(r).unwrap_or_default()),
        };
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    for f in families {
        st::run_family(device, seed, f, &mut emit).map_err(|e| ToolError::failed(anyhow::Error::new(e), ""))?;
    }
    Ok(())
}

enum Msg {
    Line(String),
    Eof,
}

/// Runs `family` in a child process, forwarding its events; a hang, a crash or an error of the
/// child becomes a failed row.
fn run_child(device: Device, seed: u64, family: &str, timeout: Duration, sink: &mut dyn FnMut(Event<'_>)) {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            sink(Event::Row(&Row::error(family, "", format!("cannot find this binary to start a child: {e}"))));
            return;
        }
    };
    let dev = match device {
        Device::Cpu => "cpu".to_string(),
        Device::Emu => "emu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
    };
    let spawned = Proc::new(&exe)
        .args(["selftest", "--child", "--device", &dev, "--seed", &seed.to_string(), "--family", family])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut proc = match spawned {
        Ok(p) => p,
        Err(e) => {
            sink(Event::Row(&Row::error(family, "", format!("starting the child process: {e}"))));
            return;
        }
    };
    let (tx, rx) = mpsc::channel();
    let stdout = proc.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(Msg::Line(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(Msg::Eof);
    });
    let mut stderr = proc.stderr.take().expect("piped stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let start = Instant::now();
    let mut last_start = String::from("(starting)");
    let mut last_note = Instant::now();
    let mut rows = 0usize;
    let mut killed = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(Msg::Line(l)) => {
                if let Some(s) = l.strip_prefix("@start\t") {
                    last_start = s.to_string();
                } else if let Some(kv) = l.strip_prefix("@info\t") {
                    let (k, v) = kv.split_once('\t').unwrap_or((kv, ""));
                    sink(Event::Info(k, v));
                } else if let Some(j) = l.strip_prefix("@row\t") {
                    match serde_json::from_str::<Row>(j) {
                        Ok(r) => {
                            rows += 1;
                            sink(Event::Row(&r));
                        }
                        Err(e) => sink(Event::Row(&Row::error(family, "", format!("unreadable row from the child ({e}): {j}")))),
                    }
                } else {
                    // Anything else the child printed: pass it on as a comment.
                    sink(Event::Info("child output", &l));
                }
            }
            Ok(Msg::Eof) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if start.elapsed() > timeout {
            let _ = proc.kill();
            killed = true;
            break;
        }
        if last_note.elapsed() > Duration::from_secs(15) {
            eprintln!("selftest: {family} still running after {:.0} s: {last_start}", start.elapsed().as_secs_f64());
            last_note = Instant::now();
        }
    }
    let status = proc.wait();
    if !matches!(&status, Ok(s) if s.success()) {
        // A killed or crashed child cannot remove the model folder its training family wrote.
        let prefix = format!("lora-selftest-model-{}-", proc.id());
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let err_text = err_reader.join().unwrap_or_default();
    let tail: String = {
        let t = err_text.trim();
        let cut = t.char_indices().rev().nth(600).map_or(0, |(i, _)| i);
        t[cut..].replace('\n', " | ")
    };
    let secs = start.elapsed().as_secs_f64();
    let mut fail = |note: String| {
        let mut r = Row::error(&format!("{family} (child process)"), "", note);
        r.secs = secs;
        sink(Event::Row(&r));
    };
    if killed {
        fail(format!("killed after {:.0} s (--family-timeout) while running {last_start}, {rows} rows done", timeout.as_secs_f64()));
        return;
    }
    match status {
        Ok(s) if s.success() => {
            if rows == 0 {
                fail(format!("the child produced no rows; stderr: {tail}"));
            }
        }
        Ok(s) => {
            #[cfg(unix)]
            let sig = std::os::unix::process::ExitStatusExt::signal(&s).map(|n| format!("signal {n}"));
            #[cfg(not(unix))]
            let sig: Option<String> = None;
            let how = sig.unwrap_or_else(|| format!("exit code {}", s.code().unwrap_or(-1)));
            fail(format!("died ({how}) while running {last_start}, {rows} rows done; stderr: {tail}"));
        }
        Err(e) => fail(format!("waiting for the child: {e}")),
    }
}
