//! Example preprocessor: support tickets → chat samples, with e-mail addresses and phone numbers
//! redacted before anything reaches the tokenizer.
//!
//! Input record (one JSON object per line):
//! `{"id": "T-1", "subject": "...", "messages": [{"from": "customer", "body": "..."},
//! {"from": "agent", "body": "..."}]}`. Customer turns become `user` messages, agent turns
//! `assistant` messages; a ticket without an agent reply is dropped (zero samples).
//!
//! Settings: `system_prompt` (a system message to prepend), `email_token` (default `[EMAIL]`),
//! `phone_token` (default `[PHONE]`), `max_tokens` (drop tickets whose rendered chat is longer,
//! counted with the run's tokenizer; 0 = no limit).

mod redact;

use std::borrow::Cow;

use lora_plugin::Settings;
use lora_plugin::preprocessor::{Message, Preprocessor, RawRecord, Sample, text};
use serde::Deserialize;

pub use redact::redact;

/// The fields of a ticket this plugin reads (others are ignored); strings borrow from the record
/// where they have no escapes.
#[derive(Deserialize)]
struct Ticket<'a> {
    #[serde(borrow)]
    messages: Vec<Turn<'a>>,
}

#[derive(Deserialize)]
struct Turn<'a> {
    #[serde(borrow)]
    from: Cow<'a, str>,
    #[serde(borrow)]
    body: Cow<'a, str>,
}

struct TicketRedactor {
    system_prompt: Option<String>,
    email_token: String,
    phone_token: String,
    max_tokens: u32,
}

impl Preprocessor for TicketRedactor {
    fn configure(settings: &Settings) -> Result<Self, String> {
        settings.allow_only(&["system_prompt", "email_token", "phone_token", "max_tokens"])?;
        Ok(TicketRedactor {
            system_prompt: settings.get("system_prompt").map(str::to_string),
            email_token: settings.get("email_token").unwrap_or("[EMAIL]").to_string(),
            phone_token: settings.get("phone_token").unwrap_or("[PHONE]").to_string(),
            max_tokens: settings.parse_or("max_tokens", 0)?,
        })
    }

    fn process_record(&mut self, record: &RawRecord) -> Result<Vec<Sample>, String> {
        let ticket: Ticket =
            serde_json::from_str(&record.json).map_err(|e| format!("not a ticket: {e}"))?;
        let mut messages = Vec::with_capacity(ticket.messages.len() + 1);
        if let Some(system) = &self.system_prompt {
            messages.push(Message {
                role: "system".into(),
                content: system.clone(),
            });
        }
        for (i, turn) in ticket.messages.iter().enumerate() {
            let role = match turn.from.as_ref() {
                "customer" => "user",
                "agent" => "assistant",
                other => {
                    return Err(format!(
                        "messages[{i}].from is `{other}`; expected `customer` or `agent`"
                    ));
                }
            };
            let content = redact(&turn.body, &self.email_token, &self.phone_token);
            messages.push(Message {
                role: role.into(),
                content,
            });
        }
        if !messages.iter().any(|m| m.role == "assistant") {
            return Ok(Vec::new());
        }
        if self.max_tokens > 0 {
            let rendered = text::apply_chat_template(&messages, false)?;
            if text::count_tokens(&rendered)? > self.max_tokens {
                return Ok(Vec::new());
            }
        }
        Ok(vec![Sample::Chat(messages)])
    }
}

lora_plugin::export_preprocessor!(TicketRedactor);
