//! Blocking HTTP requests for reporters (feature `http`, over `wasi:http` 0.2).
//!
//! The run must grant the hosts: `"grants": {"http": ["https://api.example.com"]}` in
//! `training_plugin_config`. A request to any other host fails with an error that says so, and
//! lora names the host in the run's error. Every timeout is capped by the plugin's per-call
//! deadline (`deadline_ms`).
//!
//! ```ignore
//! let reply = lora_plugin::http::post_json("https://mlflow.internal/api/2.0/mlflow/runs/log-batch",
//!     &[("authorization", &format!("Bearer {token}"))], &body)?;
//! reply.ok()?; // Err unless the status is 2xx
//! ```

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
};
use wasip2::io::streams::StreamError;

/// Bytes of a response body kept; the rest is read and dropped.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// A response: its status and (up to 1 MiB of) its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// `Ok` for a 2xx status, else an error with the status and the start of the body.
    pub fn ok(self) -> Result<Response, String> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let text = String::from_utf8_lossy(&self.body);
        let mut end = text.len().min(300);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Err(format!("HTTP {}: {}", self.status, text[..end].trim()))
    }
}

/// A URL split into what `wasi:http` takes.
struct Url<'a> {
    https: bool,
    authority: &'a str,
    path_and_query: &'a str,
}

fn parse_url(url: &str) -> Result<Url<'_>, String> {
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("`{url}` is not an http:// or https:// URL"));
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("`{url}` has no host (or has user info, which is not supported)"));
    }
    Ok(Url {
        https,
        authority,
        path_and_query: if path.is_empty() { "/" } else { path },
    })
}

fn describe(e: &ErrorCode) -> String {
    match e {
        ErrorCode::HttpRequestDenied => {
            "the run denied the request (is the host in this reporter's `grants.http`?)".into()
        }
        ErrorCode::ConnectionRefused => "connection refused".into(),
        ErrorCode::ConnectionTimeout => "connection timed out".into(),
        ErrorCode::HttpResponseTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout => {
            "no response within the deadline (the plugin's `deadline_ms` caps every timeout)".into()
        }
        ErrorCode::DnsError(_) => "the host name could not be resolved".into(),
        ErrorCode::TlsCertificateError => "the server's TLS certificate was not accepted".into(),
        other => format!("{other:?}"),
    }
}

/// Sends one request and waits for the whole response.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, String> {
    let what = format!("{method} {url}");
    let fail = |m: String| format!("{what}: {m}");
    let u = parse_url(url)?;
    let mut fields: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
        .collect();
    if !body.is_empty() && !fields.iter().any(|(k, _)| k == "content-length") {
        fields.push(("content-length".into(), body.len().to_string().into_bytes()));
    }
    let fields = Fields::from_list(&fields).map_err(|e| fail(format!("bad header: {e:?}")))?;
    let req = OutgoingRequest::new(fields);
    let method = match method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "PATCH" => Method::Patch,
        "DELETE" => Method::Delete,
        other => Method::Other(other.to_string()),
    };
    req.set_method(&method)
        .map_err(|()| fail("invalid method".into()))?;
    req.set_scheme(Some(if u.https { &Scheme::Https } else { &Scheme::Http }))
        .map_err(|()| fail("invalid scheme".into()))?;
    req.set_authority(Some(u.authority))
        .map_err(|()| fail("invalid host".into()))?;
    req.set_path_with_query(Some(u.path_and_query))
        .map_err(|()| fail("invalid path".into()))?;
    let out = req
        .body()
        .map_err(|()| fail("the request body was already taken".into()))?;
    let pending = outgoing_handler::handle(req, None).map_err(|e| fail(describe(&e)))?;

    // Stream the body after `handle`, so the host is already reading it; a failure to write is
    // reported only if the request itself did not fail (a denied request closes the stream).
    let mut write_error = None;
    match out.write() {
        Ok(stream) => {
            for chunk in body.chunks(4096) {
                if let Err(e) = stream.blocking_write_and_flush(chunk) {
                    write_error = Some(format!("sending the body: {e:?}"));
                    break;
                }
            }
        }
        Err(()) => write_error = Some("the body stream was already taken".into()),
    }
    if let Err(e) = OutgoingBody::finish(out, None) {
        write_error.get_or_insert(format!("finishing the body: {}", describe(&e)));
    }

    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(e))) => return Err(fail(describe(&e))),
        Some(Err(())) => return Err(fail("the response was already taken".into())),
        None => return Err(fail("no response".into())),
    };
    if let Some(e) = write_error {
        return Err(fail(e));
    }
    let status = response.status();
    let incoming = response
        .consume()
        .map_err(|()| fail("the response body was already taken".into()))?;
    let mut data = Vec::new();
    {
        let stream = incoming
            .stream()
            .map_err(|()| fail("the response body stream was already taken".into()))?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(bytes) => {
                    let room = MAX_RESPONSE_BYTES.saturating_sub(data.len());
                    data.extend_from_slice(&bytes[..bytes.len().min(room)]);
                }
                Err(StreamError::Closed) => break,
                Err(e) => return Err(fail(format!("reading the response: {e:?}"))),
            }
        }
    }
    drop(IncomingBody::finish(incoming));
    Ok(Response { status, body: data })
}

/// `POST` of a JSON document (`content-type: application/json`).
pub fn post_json(url: &str, headers: &[(&str, &str)], json: &str) -> Result<Response, String> {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request("POST", url, &all, json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let u = parse_url("https://api.example.com:8443/v1/log?x=1").unwrap();
        assert!(u.https);
        assert_eq!(u.authority, "api.example.com:8443");
        assert_eq!(u.path_and_query, "/v1/log?x=1");
        let u = parse_url("http://127.0.0.1:9").unwrap();
        assert_eq!((u.https, u.authority, u.path_and_query), (false, "127.0.0.1:9", "/"));
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("http:///path").is_err());
        assert!(parse_url("http://user@host/").is_err());
    }
}
