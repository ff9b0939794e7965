//! `wasi:http` for reporters: outgoing requests to the hosts in `grants.http`, nothing else.
//!
//! An allow-list entry is `[http://|https://]host[:port]`, where `host` is a DNS name, an IPv4
//! address or a bracketed IPv6 address, and a leading `*.` matches any subdomain (not the name
//! itself). Without a scheme both are allowed; without a port only the scheme's default port
//! (80, 443). A request elsewhere is answered with `HttpRequestDenied` before any connection is
//! made, logged with the plugin's name, and named in the run's error if the call then fails.
//!
//! Every timeout of a request (connect, first byte, between bytes) is capped at 90% of the
//! plugin's per-call deadline, so a request that times out leaves the plugin time to say so; the
//! call as a whole ends at the deadline whatever it waits on (see `Sandbox::call`): a silent
//! server cannot hold a run longer than a looping plugin could.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::sandbox::{LogLevel, LogSink};

/// One parsed `grants.http` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    /// `http` or `https`; `None` allows both.
    scheme: Option<&'static str>,
    /// Lowercase; for a wildcard, the suffix after `*.`.
    host: String,
    wildcard: bool,
    /// `None`: the scheme's default port only.
    port: Option<u16>,
}

impl AllowedHost {
    /// Parses one entry, or says what is wrong with it.
    pub fn parse(entry: &str) -> Result<AllowedHost, String> {
        let e = entry.trim();
        let (scheme, rest) = match e.split_once("://") {
            Some((s, rest)) => match s.to_ascii_lowercase().as_str() {
                "http" => (Some("http"), rest),
                "https" => (Some("https"), rest),
                other => return Err(format!("scheme `{other}` is not http or https")),
            },
            None => (None, e),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err("give a host and optional port only (no path, query or user)".into());
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, after) = v6
                .split_once(']')
                .ok_or("an IPv6 address needs its closing `]`")?;
            addr.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("`{addr}` is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or("expected `:port` after `]`")?),
            };
            (format!("[{}]", addr.to_ascii_lowercase()), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
                None => (rest.to_ascii_lowercase(), None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("port `{p}` is not a number from 1 to 65535"))?,
            ),
        };
        let (wildcard, host) = match host.strip_prefix("*.") {
            Some(h) => (true, h.to_string()),
            None => (false, host),
        };
        let valid_name = !host.is_empty()
            && (host.starts_with('[')
                || host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                }));
        if !valid_name {
            return Err(format!("`{host}` is not a host name or IP address"));
        }
        Ok(AllowedHost {
            scheme,
            host,
            wildcard,
            port,
        })
    }

    /// Whether a request to `scheme://host:port` is allowed by this entry.
    fn permits(&self, scheme: &str, host: &str, port: u16) -> bool {
        if self.scheme.is_some_and(|s| s != scheme) {
            return false;
        }
        let default_port = if scheme == "https" { 443 } else { 80 };
        if self.port.unwrap_or(default_port) != port {
            return false;
        }
        if self.wildcard {
            host.strip_suffix(self.host.as_str())
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
        } else {
            host == self.host
        }
    }
}

/// Parses every entry of a `grants.http` list, naming the first bad one.
pub fn parse_allow_list(entries: &[String]) -> Result<Vec<AllowedHost>, String> {
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| AllowedHost::parse(e).map_err(|m| format!("entry {} `{e}`: {m}", i + 1)))
        .collect()
}

/// The `wasi:http` hooks of one plugin: the allow-list check, the deadline cap, and a record of
/// what was denied (for the error message of the call).
pub(crate) struct HttpPolicy {
    allowed: Vec<AllowedHost>,
    granted: String,
    deadline: Duration,
    plugin: String,
    log: LogSink,
    denied: Arc<Mutex<Vec<String>>>,
}

impl HttpPolicy {
    pub(crate) fn new(
        allowed: Vec<AllowedHost>,
        granted: &[String],
        deadline: Duration,
        plugin: &str,
        log: LogSink,
    ) -> HttpPolicy {
        HttpPolicy {
            allowed,
            granted: granted.join(", "),
            deadline: deadline.mul_f64(0.9),
            plugin: plugin.to_string(),
            log,
            denied: Arc::default(),
        }
    }

    /// The requests denied since the last call, as `scheme://host:port`.
    pub(crate) fn take_denied(&self) -> Vec<String> {
        std::mem::take(&mut *self.denied.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn capped(&self, options: Option<RequestOptions>) -> RequestOptions {
        let cap = |t: Option<Duration>| Some(t.map_or(self.deadline, |t| t.min(self.deadline)));
        let o = options.unwrap_or_default();
        RequestOptions {
            connect_timeout: cap(o.connect_timeout),
            first_byte_timeout: cap(o.first_byte_timeout),
            between_bytes_timeout: cap(o.between_bytes_timeout),
        }
    }
}

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

impl WasiHttpHooks for HttpPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        drop(fut);
        let uri = request.uri();
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        let host = uri.host().unwrap_or("").to_ascii_lowercase();
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        let target = format!("{scheme}://{host}:{port}");
        if !self.allowed.iter().any(|a| a.permits(&scheme, &host, port)) {
            let why = if self.allowed.is_empty() {
                "the plugin has no `grants.http`".to_string()
            } else {
                format!("not in `grants.http` ({})", self.granted)
            };
            (self.log)(
                &self.plugin,
                LogLevel::Warn,
                &format!("denied a request to {target}: {why}"),
            );
            self.denied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{target}: {why}"));
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let options = self.capped(options);
        let deadline = self.deadline;
        Box::new(async move {
            let sent = tokio::time::timeout(
                deadline,
                wasmtime_wasi_http::default_send_request(request, Some(options)),
            )
            .await;
            let (response, io) = match sent {
                Ok(r) => r?,
                Err(_) => return Err(HttpError::HttpResponseTimeout),
            };
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(entry: &str, scheme: &str, host: &str, port: u16) -> bool {
        AllowedHost::parse(entry)
            .unwrap()
            .permits(scheme, host, port)
    }

    #[test]
    fn entries_match_scheme_host_and_port_exactly() {
        assert!(allows("api.wandb.ai", "https", "api.wandb.ai", 443));
        assert!(allows("api.wandb.ai", "http", "api.wandb.ai", 80));
        assert!(!allows("api.wandb.ai", "https", "api.wandb.ai", 8443));
        assert!(!allows("api.wandb.ai", "https", "evil-api.wandb.ai", 443));
        assert!(!allows("api.wandb.ai", "https", "api.wandb.ai.evil.com", 443));
        assert!(allows("https://API.wandb.ai", "https", "api.wandb.ai", 443));
        assert!(!allows("https://api.wandb.ai", "http", "api.wandb.ai", 443));
        assert!(allows("http://127.0.0.1:5000", "http", "127.0.0.1", 5000));
        assert!(!allows("http://127.0.0.1:5000", "http", "127.0.0.1", 5001));
        assert!(allows("[::1]:8080", "http", "[::1]", 8080));
        assert!(allows("mlflow.internal:5000/", "http", "mlflow.internal", 5000));
    }

    #[test]
    fn a_wildcard_matches_subdomains_only() {
        assert!(allows("*.example.com", "https", "a.example.com", 443));
        assert!(allows("*.example.com", "https", "a.b.example.com", 443));
        assert!(!allows("*.example.com", "https", "example.com", 443));
        assert!(!allows("*.example.com", "https", "badexample.com", 443));
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        for (entry, needle) in [
            ("ftp://host", "scheme `ftp`"),
            ("https://host/api/2.0", "no path"),
            ("user@host", "no path, query or user"),
            ("host:0", "port `0`"),
            ("host:http", "port `http`"),
            ("", "is not a host name"),
            ("bad_host!", "is not a host name"),
            ("[::1", "closing `]`"),
            ("[nonsense]", "not an IPv6 address"),
        ] {
            let e = AllowedHost::parse(entry).unwrap_err();
            assert!(e.contains(needle), "{entry}: {e}");
        }
        let e = parse_allow_list(&["ok.example".into(), "ftp://x".into()]).unwrap_err();
        assert!(e.starts_with("entry 2 `ftp://x`"), "{e}");
    }
}
