//! E-mail and phone-number redaction without a regex engine (keeps the component small).

/// `text` with every e-mail address replaced by `email_token` and every phone number by
/// `phone_token`.
///
/// An e-mail address is `local@domain.tld` (local: letters, digits, `._%+-`; domain: letters,
/// digits, `.-` with at least one dot). A phone number is a run of digits, spaces and `+-.()`
/// holding 7 to 15 digits that starts at a word boundary; ISO dates (`2024-05-01`) are kept.
pub fn redact(text: &str, email_token: &str, phone_token: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if let Some(end) = email_at(&chars, i) {
            out.push_str(email_token);
            i = end;
        } else if let Some(end) = phone_at(&chars, i) {
            out.push_str(phone_token);
            i = end;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn is_local(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._%+-".contains(c)
}

fn is_domain(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '-'
}

/// End of an e-mail address starting exactly at `start`, if one does.
fn email_at(chars: &[char], start: usize) -> Option<usize> {
    if start > 0 && is_local(chars[start - 1]) {
        return None;
    }
    let mut at = start;
    while at < chars.len() && is_local(chars[at]) {
        at += 1;
    }
    if at == start || at >= chars.len() || chars[at] != '@' {
        return None;
    }
    let mut end = at + 1;
    while end < chars.len() && is_domain(chars[end]) {
        end += 1;
    }
    while end > at + 1 && (chars[end - 1] == '.' || chars[end - 1] == '-') {
        end -= 1;
    }
    let domain = &chars[at + 1..end];
    let dot = domain.iter().rposition(|&c| c == '.')?;
    (dot > 0 && dot + 1 < domain.len()).then_some(end)
}

/// End of a phone number starting exactly at `start`, if one does.
fn phone_at(chars: &[char], start: usize) -> Option<usize> {
    let c = chars[start];
    if !(c.is_ascii_digit() || c == '+' || c == '(') {
        return None;
    }
    if start > 0 && (chars[start - 1].is_alphanumeric() || chars[start - 1] == '_') {
        return None;
    }
    let mut end = start;
    while end < chars.len() && (chars[end].is_ascii_digit() || " -.()+".contains(chars[end])) {
        end += 1;
    }
    // Give back trailing separators (a sentence's full stop, a space before the next word).
    while end > start && !chars[end - 1].is_ascii_digit() && chars[end - 1] != ')' {
        end -= 1;
    }
    let digits = chars[start..end]
        .iter()
        .filter(|c| c.is_ascii_digit())
        .count();
    if end < chars.len() && chars[end].is_alphanumeric() {
        return None;
    }
    let s: String = chars[start..end].iter().collect();
    let iso_date = s.len() == 10 && s.as_bytes()[4] == b'-' && s.as_bytes()[7] == b'-';
    ((7..=15).contains(&digits) && !iso_date).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::redact;

    fn r(s: &str) -> String {
        redact(s, "[EMAIL]", "[PHONE]")
    }

    #[test]
    fn emails_and_phones_are_replaced() {
        assert_eq!(r("mail jane.doe+x@example.co.uk now."), "mail [EMAIL] now.");
        assert_eq!(r("call +1 (555) 010-9999."), "call [PHONE].");
        assert_eq!(r("call 555-1234 or 030 1234567"), "call [PHONE] or [PHONE]");
    }

    #[test]
    fn ordinary_numbers_and_dates_are_kept() {
        assert_eq!(
            r("order 12345 on 2024-05-01, v1.2.3"),
            "order 12345 on 2024-05-01, v1.2.3"
        );
        assert_eq!(
            r("user@localhost is no address"),
            "user@localhost is no address"
        );
    }
}
