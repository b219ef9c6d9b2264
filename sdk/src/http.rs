//! Outbound HTTP requests, for extensions whose sidecar grants `http` (the
//! `http` feature of this crate; a component that sends a request imports
//! `wasi:http/outgoing-handler`, and the host refuses to load it without
//! the grant).
//!
//! ```no_run
//! use sandboxer_sdk::http;
//! use std::collections::BTreeMap;
//!
//! fn create_then_delete() -> Result<u16, http::HttpError> {
//!     let body = BTreeMap::from([("templateID", "base")]);
//!     let created = http::post_json("https://api.example.com/sandboxes", &body)?;
//!     let deleted = http::Request::delete("https://api.example.com/sandboxes/1")
//!         .secret_header("X-API-KEY", "api_key") // the host fills in [secrets] api_key
//!         .send()?;
//!     Ok(created.status.max(deleted.status))
//! }
//! ```
//!
//! The host checks every request against its egress policy (the grant's
//! destinations, the addresses a name resolves to, a request budget per
//! call, a byte budget for responses, deadlines inside the call's) and
//! follows no redirect: a 3xx comes back as it is. A request the host
//! refuses fails with an [`HttpError`] whose message names the rule.

use std::fmt;

/// Longest piece written to a request body at once (what
/// `blocking-write-and-flush` accepts).
const WRITE_CHUNK: usize = 4096;
/// Bytes asked for per read of a response body.
const READ_CHUNK: u64 = 64 * 1024;

/// An answer: its status, headers and whole body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Response {
    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first value of header `name` (any case), as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|error| HttpError {
            message: format!(
                "the answer (status {}) is not the JSON expected: {error}",
                self.status
            ),
            refused_by_host: false,
            sent: true,
        })
    }
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// One line: the host's reason (naming the egress rule when it refused
    /// the request), or the transport's.
    pub message: String,
    /// The host's egress policy refused or ended the request.
    pub refused_by_host: bool,
    /// The request may have reached the server (it was being sent or
    /// answered when it failed): the server may have acted on it.
    pub sent: bool,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HttpError {}

/// `GET url`.
pub fn get(url: &str) -> Result<Response, HttpError> {
    Request::get(url).send()
}

/// `POST url` with `body` as JSON.
pub fn post_json(url: &str, body: &impl serde::Serialize) -> Result<Response, HttpError> {
    Request::post(url).json(body)?.send()
}

/// `DELETE url`.
pub fn delete(url: &str) -> Result<Response, HttpError> {
    Request::delete(url).send()
}

/// A request to build up and [`send`](Request::send).
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Option<Vec<u8>>,
    timeout: Option<std::time::Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Request {
    fn new(method: Method, url: &str) -> Self {
        Self {
            method,
            url: url.to_string(),
            headers: Vec::new(),
            body: None,
            timeout: None,
        }
    }

    pub fn get(url: &str) -> Self {
        Self::new(Method::Get, url)
    }

    pub fn post(url: &str) -> Self {
        Self::new(Method::Post, url)
    }

    pub fn put(url: &str) -> Self {
        Self::new(Method::Put, url)
    }

    pub fn delete(url: &str) -> Self {
        Self::new(Method::Delete, url)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_string(), value.as_bytes().to_vec()));
        self
    }

    /// A header whose value is the secret `secret` of the sidecar's
    /// `[secrets]`: the host puts the value in on the way out (only to a
    /// destination the secret is granted to). The extension never sees it.
    pub fn secret_header(self, name: &str, secret: &str) -> Self {
        let reference = format!("{{{{secret:{secret}}}}}");
        self.header(name, &reference)
    }

    /// Gives up connecting, and waiting for the answer's status and
    /// headers, after `timeout` each (the host's own deadlines still apply,
    /// and end the request sooner when they come first). Use it to keep
    /// time in the call for what must follow a failed request.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.body = Some(body);
        self
    }

    /// `body` as JSON, with its content type.
    pub fn json(self, body: &impl serde::Serialize) -> Result<Self, HttpError> {
        let bytes = serde_json::to_vec(body).map_err(|error| HttpError {
            message: format!("cannot write the request body as JSON: {error}"),
            refused_by_host: false,
            sent: false,
        })?;
        Ok(self.header("content-type", "application/json").body(bytes))
    }

    /// Sends the request and reads the whole answer. Blocks the call until
    /// then (the host bounds how long).
    pub fn send(self) -> Result<Response, HttpError> {
        wire::send(self)
    }
}

/// Splits `scheme://authority/path?query`.
fn split_url(url: &str) -> Result<(&str, &str, &str), HttpError> {
    let invalid = |why: &str| HttpError {
        message: format!("invalid URL {url:?}: {why}"),
        refused_by_host: false,
        sent: false,
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid("it has no scheme"))?;
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.is_empty() {
        return Err(invalid("it has no host"));
    }
    Ok((scheme, authority, if path.is_empty() { "/" } else { path }))
}

mod wire {
    //! The request over `wasi:http`, with the resources dropped children
    //! first, as the component model requires.

    use super::{HttpError, Method, READ_CHUNK, Request, Response, WRITE_CHUNK, split_url};
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{
        ErrorCode, Fields, IncomingBody, Method as WasiMethod, OutgoingBody, OutgoingRequest,
        RequestOptions, Scheme,
    };
    use wasip2::io::streams::StreamError;

    fn message_of(code: &ErrorCode) -> String {
        match code {
            ErrorCode::InternalError(Some(message)) => message.clone(),
            other => format!("{other:?}"),
        }
    }

    fn failed(code: &ErrorCode, sent: bool) -> HttpError {
        let message = message_of(code);
        HttpError {
            refused_by_host: message.starts_with("refused by the host's egress policy"),
            // A refused connection never carried the request.
            sent: sent && !matches!(code, ErrorCode::ConnectionRefused),
            message,
        }
    }

    fn stream_failed(error: StreamError, doing: &str) -> HttpError {
        let message = match error {
            StreamError::LastOperationFailed(error) => {
                match wasip2::http::types::http_error_code(&error) {
                    Some(code) => message_of(&code),
                    None => error.to_debug_string(),
                }
            }
            StreamError::Closed => "the stream closed early".to_string(),
        };
        HttpError {
            refused_by_host: message.contains("refused by the host's egress policy"),
            sent: true,
            message: format!("{doing}: {message}"),
        }
    }

    fn local(message: String) -> HttpError {
        HttpError {
            message,
            refused_by_host: false,
            sent: false,
        }
    }

    pub fn send(request: Request) -> Result<Response, HttpError> {
        let (scheme, authority, path) = split_url(&request.url)?;
        let scheme = match scheme {
            "https" => Scheme::Https,
            "http" => Scheme::Http,
            other => Scheme::Other(other.to_string()),
        };
        let headers = Fields::from_list(&request.headers)
            .map_err(|error| local(format!("invalid request headers: {error:?}")))?;
        let outgoing = OutgoingRequest::new(headers);
        let method = match request.method {
            Method::Get => WasiMethod::Get,
            Method::Post => WasiMethod::Post,
            Method::Put => WasiMethod::Put,
            Method::Delete => WasiMethod::Delete,
        };
        let invalid = |part: &str| local(format!("invalid URL {:?}: its {part}", request.url));
        outgoing
            .set_method(&method)
            .map_err(|()| invalid("method"))?;
        outgoing
            .set_scheme(Some(&scheme))
            .map_err(|()| invalid("scheme"))?;
        outgoing
            .set_authority(Some(authority))
            .map_err(|()| invalid("host"))?;
        outgoing
            .set_path_with_query(Some(path))
            .map_err(|()| invalid("path"))?;
        let body = outgoing
            .body()
            .map_err(|()| local("the request body was taken twice".into()))?;

        let options = request.timeout.map(|timeout| {
            let nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
            let options = RequestOptions::new();
            // Each setter fails only when the host does not support that
            // timeout; the host's own deadlines apply regardless.
            let _ = options.set_connect_timeout(Some(nanos));
            let _ = options.set_first_byte_timeout(Some(nanos));
            let _ = options.set_between_bytes_timeout(Some(nanos));
            options
        });
        let future =
            outgoing_handler::handle(outgoing, options).map_err(|code| failed(&code, false))?;
        {
            let stream = body
                .write()
                .map_err(|()| local("the request body stream was taken twice".into()))?;
            for chunk in request
                .body
                .as_deref()
                .unwrap_or_default()
                .chunks(WRITE_CHUNK)
            {
                stream
                    .blocking_write_and_flush(chunk)
                    .map_err(|error| stream_failed(error, "sending the request body"))?;
            }
        }
        OutgoingBody::finish(body, None).map_err(|code| failed(&code, true))?;

        future.subscribe().block();
        let incoming = match future.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(failed(&code, true)),
            Some(Err(())) | None => return Err(local("the response was taken twice".into())),
        };
        let status = incoming.status();
        let headers = incoming.headers().entries();
        let incoming_body: IncomingBody = incoming
            .consume()
            .map_err(|()| local("the response body was taken twice".into()))?;
        let mut body = Vec::new();
        {
            let stream = incoming_body
                .stream()
                .map_err(|()| local("the response body stream was taken twice".into()))?;
            loop {
                match stream.blocking_read(READ_CHUNK) {
                    Ok(bytes) => body.extend_from_slice(&bytes),
                    Err(StreamError::Closed) => break,
                    Err(error) => return Err(stream_failed(error, "reading the response")),
                }
            }
        }
        drop(IncomingBody::finish(incoming_body));
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_host_and_path() {
        assert_eq!(
            split_url("https://api.e2b.dev/v2/sandboxes?metadata=a%3Db").unwrap(),
            ("https", "api.e2b.dev", "/v2/sandboxes?metadata=a%3Db")
        );
        assert_eq!(
            split_url("http://127.0.0.1:3999").unwrap(),
            ("http", "127.0.0.1:3999", "/")
        );
        assert_eq!(split_url("http://h?x=1").unwrap(), ("http", "h", "?x=1"));
        assert!(
            split_url("api.e2b.dev/x")
                .unwrap_err()
                .message
                .contains("no scheme")
        );
    }

    #[test]
    fn secret_headers_carry_a_reference_not_a_value() {
        let request = Request::get("https://h/").secret_header("X-API-KEY", "api_key");
        assert_eq!(request.headers[0].1, b"{{secret:api_key}}");
    }
}
