//! A response body of the `http` capability: it ends with an error naming
//! the rule once the call's responses pass their byte budget or the
//! request's deadline passes, so neither a huge answer nor a server that
//! trickles (or sends nothing) holds the call past its limits.

use super::egress::{EgressRefusal, EgressRule};
use super::http_client::CallBudget;
use bytes::Bytes;
use http_body::{Body, Frame};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use wasmtime_wasi_http::Error as HttpError;

pub(super) fn response_size_refusal(limit: u64, declared: Option<u64>) -> EgressRefusal {
    EgressRefusal::new(
        EgressRule::ResponseSize,
        match declared {
            Some(declared) => format!(
                "a response of {declared} bytes would pass the {} MiB this call's responses may bring (limits.http_response_mb)",
                limit / (1024 * 1024)
            ),
            None => format!(
                "the responses of this call passed {} MiB (limits.http_response_mb)",
                limit / (1024 * 1024)
            ),
        },
    )
}

/// A response body that ends with an error when the call's response bytes
/// pass their budget or the request's deadline passes.
pub(super) struct BudgetedBody {
    inner: hyper::body::Incoming,
    budget: Arc<CallBudget>,
    limit: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
    extension: Arc<str>,
    destination: String,
    reserve: Duration,
    request_timeout: Duration,
    ended: bool,
}

/// What a response body may use: the call's shared byte count and its
/// limit, and the request's deadline (with what it keeps back, and the
/// request's own timeout, for the message).
pub(super) struct ResponseBudget {
    pub bytes: Arc<CallBudget>,
    pub limit: u64,
    pub deadline: Instant,
    pub reserve: Duration,
    pub request_timeout: Duration,
}

impl BudgetedBody {
    pub fn new(
        inner: hyper::body::Incoming,
        budget: ResponseBudget,
        extension: Arc<str>,
        destination: String,
    ) -> Self {
        Self {
            inner,
            budget: budget.bytes,
            limit: budget.limit,
            deadline: Box::pin(tokio::time::sleep_until(budget.deadline)),
            extension,
            destination,
            reserve: budget.reserve,
            request_timeout: budget.request_timeout,
            ended: false,
        }
    }

    fn end(&mut self, refusal: EgressRefusal) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        self.ended = true;
        tracing::warn!(
            extension = &*self.extension,
            destination = %self.destination,
            rule = refusal.rule.name(),
            "http response cut off: {}",
            refusal.detail
        );
        Poll::Ready(Some(Err(HttpError::InternalError(Some(
            refusal.to_string(),
        )))))
    }
}

impl Body for BudgetedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        // Checked before reading, so a server that trickles bytes forever
        // is cut off as surely as one that sends nothing.
        if this.deadline.as_mut().poll(cx).is_ready() {
            let timeout = this.request_timeout.as_millis();
            let reserve = this.reserve.as_millis();
            return this.end(EgressRefusal::new(
                EgressRule::Deadline,
                format!(
                    "the response body did not finish by the request's deadline (limits.http_timeout_ms = {timeout}, or the call's deadline less {reserve} ms kept for the extension to answer)"
                ),
            ));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let size = data.len() as u64;
                    let total = this
                        .budget
                        .response_bytes
                        .fetch_add(size, Ordering::Relaxed)
                        .saturating_add(size);
                    if total > this.limit {
                        return this.end(response_size_refusal(this.limit, None));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.ended = true;
                Poll::Ready(Some(Err(HttpError::InternalError(Some(format!(
                    "reading the response of {} failed: {error}",
                    this.destination
                ))))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}
