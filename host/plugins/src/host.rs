//! lora's own host functions for guests (`lora:plugin/host`, `lora:plugin/text-tools`), each
//! bounded: log lines are escaped, size-capped and counted per call and per run; text-tools
//! inputs are capped and every call first checks the deadline, so host work a guest triggers
//! cannot outrun the plugin's limits. The guest's stderr is kept as a short tail for error
//! messages.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::bindings::v0_1_0 as wit;
use crate::sandbox::{LogLevel, State};

/// Bytes of one log message kept (the rest is cut, on a character boundary).
pub(crate) const LOG_LINE_BYTES: usize = 4096;
/// Log lines and bytes one call may emit before further lines of that call are suppressed.
pub(crate) const LOG_LINES_PER_CALL: u64 = 256;
pub(crate) const LOG_BYTES_PER_CALL: u64 = 64 << 10;
/// Log lines and bytes one plugin may emit over the whole run; then its log is closed.
pub(crate) const LOG_LINES_PER_RUN: u64 = 10_000;
pub(crate) const LOG_BYTES_PER_RUN: u64 = 4 << 20;

/// Text that came from a guest, made safe to print on one line: control characters (newlines,
/// carriage returns, ANSI escapes, ...) and bidirectional-override characters become visible
/// escapes (`\n`, `\u{1b}`), so a plugin cannot start a line of its own, move the cursor or
/// pose as another plugin or as lora.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    let bad =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if bad(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `s` cut to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What a plugin has logged, per call and over the run.
#[derive(Debug, Default)]
pub(crate) struct LogBudget {
    call_lines: u64,
    call_bytes: u64,
    run_lines: u64,
    run_bytes: u64,
    /// Lines of the current call not printed.
    pub(crate) suppressed: u64,
    /// The run's cap was reached and announced: nothing more is printed.
    closed: bool,
}

impl LogBudget {
    /// Starts counting a new call.
    pub(crate) fn begin_call(&mut self) {
        self.call_lines = 0;
        self.call_bytes = 0;
        self.suppressed = 0;
    }

    /// Whether a line of `bytes` may be printed; `Some(notice)` when this line is the first one
    /// over a cap (the notice is printed instead of it).
    fn admit(&mut self, bytes: u64) -> Result<(), Option<String>> {
        if self.closed {
            self.suppressed += 1;
            return Err(None);
        }
        if self.run_lines >= LOG_LINES_PER_RUN || self.run_bytes + bytes > LOG_BYTES_PER_RUN {
            self.closed = true;
            self.suppressed += 1;
            return Err(Some(format!(
                "log limit reached: {} lines / {} MiB per plugin and run; its further log lines are dropped",
                LOG_LINES_PER_RUN,
                LOG_BYTES_PER_RUN >> 20
            )));
        }
        if self.call_lines >= LOG_LINES_PER_CALL || self.call_bytes + bytes > LOG_BYTES_PER_CALL {
            self.suppressed += 1;
            return Err((self.suppressed == 1).then(|| {
                format!(
                    "log limit reached: {} lines / {} KiB per call; the rest of this call's lines are suppressed",
                    LOG_LINES_PER_CALL,
                    LOG_BYTES_PER_CALL >> 10
                )
            }));
        }
        self.call_lines += 1;
        self.call_bytes += bytes;
        self.run_lines += 1;
        self.run_bytes += bytes;
        Ok(())
    }
}

/// Bytes of guest stderr kept: the end of the current call's output (a panic message).
const STDERR_TAIL_BYTES: usize = 8 << 10;

/// The guest's stderr: accepts every write (a chatty plugin never fails on a full pipe) and
/// keeps the last [`STDERR_TAIL_BYTES`] of the current call for its error message.
#[derive(Clone, Default)]
pub(crate) struct StderrTail(Arc<Mutex<Vec<u8>>>);

impl StderrTail {
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, bytes: &[u8]) {
        let mut buf = self.lock();
        let keep = &bytes[bytes.len().saturating_sub(STDERR_TAIL_BYTES)..];
        let over = (buf.len() + keep.len()).saturating_sub(STDERR_TAIL_BYTES);
        let over = over.min(buf.len());
        buf.drain(..over);
        buf.extend_from_slice(keep);
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

impl OutputStream for StderrTail {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(1 << 20)
    }
}

impl tokio::io::AsyncWrite for StderrTail {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl wit::types::Host for State {}

impl wit::host::Host for State {
    fn log(&mut self, level: wit::types::LogLevel, message: String) -> wasmtime::Result<()> {
        let level = match level {
            wit::types::LogLevel::Debug => LogLevel::Debug,
            wit::types::LogLevel::Info => LogLevel::Info,
            wit::types::LogLevel::Warn => LogLevel::Warn,
            wit::types::LogLevel::Error => LogLevel::Error,
        };
        let line = escape_controls(truncate(&message, LOG_LINE_BYTES)).into_owned();
        match self.log_budget.admit(line.len() as u64) {
            Ok(()) => (self.log)(&self.name, level, &line),
            Err(Some(notice)) => (self.log)(&self.name, LogLevel::Warn, &notice),
            Err(None) => {}
        }
        Ok(())
    }
}

impl wit::text_tools::Host for State {
    fn encode(
        &mut self,
        text: String,
        add_special_tokens: bool,
    ) -> wasmtime::Result<Result<Vec<u32>, String>> {
        self.host_call("encode", text.len() as u64)?;
        Ok(self
            .tools()
            .and_then(|t| t.encode(&text, add_special_tokens)))
    }

    fn decode(
        &mut self,
        ids: Vec<u32>,
        skip_special_tokens: bool,
    ) -> wasmtime::Result<Result<String, String>> {
        self.host_call("decode", 4 * ids.len() as u64)?;
        Ok(self
            .tools()
            .and_then(|t| t.decode(&ids, skip_special_tokens)))
    }

    fn count_tokens(&mut self, text: String) -> wasmtime::Result<Result<u32, String>> {
        self.host_call("count-tokens", text.len() as u64)?;
        Ok(self
            .tools()
            .and_then(|t| t.encode(&text, false))
            .map(|ids| ids.len() as u32))
    }

    fn apply_chat_template(
        &mut self,
        messages: Vec<wit::types::Message>,
        add_generation_prompt: bool,
    ) -> wasmtime::Result<Result<String, String>> {
        let bytes = messages
            .iter()
            .map(|m| (m.role.len() + m.content.len()) as u64)
            .sum();
        self.host_call("apply-chat-template", bytes)?;
        let messages: Vec<lora_api::Message> = messages
            .into_iter()
            .map(|m| lora_api::Message {
                role: m.role,
                content: m.content,
            })
            .collect();
        Ok(self
            .tools()
            .and_then(|t| t.apply_chat_template(&messages, add_generation_prompt)))
    }
}

impl State {
    fn tools(&self) -> Result<&std::sync::Arc<dyn lora_api::TextTools>, String> {
        self.text_tools
            .as_ref()
            .ok_or_else(|| "the run offers no tokenizer to this plugin".to_string())
    }

    /// Before host work on behalf of the guest: the call must still be within its deadline (host
    /// work does not advance the epoch check until the guest runs again) and the input within
    /// `max_text_input_kib`. Either failure ends the call with a limit naming it.
    fn host_call(&mut self, function: &str, input_bytes: u64) -> wasmtime::Result<()> {
        if let Some(message) = self.deadline_passed() {
            return Err(self.limit_hit(message));
        }
        let max = self.limits.max_text_input_bytes;
        if input_bytes > max {
            return Err(self.limit_hit(format!(
                "passed {} KiB to text-tools `{function}`, more than the limit of {} KiB per call (`max_text_input_kib`)",
                input_bytes.div_ceil(1024),
                max >> 10
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible_escapes() {
        assert_eq!(escape_controls("plain text é"), "plain text é");
        assert_eq!(
            escape_controls("ok\nerror: forged\r\x1b[31mred\u{7}\u{202e}"),
            "ok\\nerror: forged\\r\\u{1b}[31mred\\u{7}\\u{202e}"
        );
        assert!(!escape_controls("a\u{85}b").contains('\u{85}'));
    }

    #[test]
    fn log_lines_are_capped_per_call_and_per_run_with_one_notice_each() {
        let mut b = LogBudget::default();
        b.begin_call();
        let mut printed = 0;
        let mut notices = 0;
        for _ in 0..1000 {
            match b.admit(10) {
                Ok(()) => printed += 1,
                Err(Some(_)) => notices += 1,
                Err(None) => {}
            }
        }
        assert_eq!(
            (printed, notices, b.suppressed),
            (LOG_LINES_PER_CALL, 1, 1000 - LOG_LINES_PER_CALL)
        );
        // Over many calls the run's cap closes the log once.
        let mut closed = 0;
        for _ in 0..100 {
            b.begin_call();
            for _ in 0..LOG_LINES_PER_CALL {
                if let Err(Some(n)) = b.admit(10)
                    && n.contains("per plugin and run")
                {
                    closed += 1;
                }
            }
        }
        assert_eq!(closed, 1);
        assert_eq!(b.run_lines, LOG_LINES_PER_RUN);
    }
}
