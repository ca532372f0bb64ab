//! Budgets checked before a request costs anything.
//!
//! - **Intake**: requests admitted to the model routes at once — being read, having their
//!   image decoded and prompt prepared, or waiting in the model's queue — at most the queue's
//!   size. A request beyond is answered 429 before its body is read. A request leaves the
//!   intake when the model takes it.
//! - **Image memory**: the bytes that admitted requests' images take, first decoded (from the
//!   size in the image's header, before decoding), then as the model's input. A request that
//!   could never fit is answered 413; one that does not fit now, 503.
//! - **Constraint builds**: one at a time (they take up to a few tenths of a second each,
//!   bounded by [`simpleseg_engine::runtime::constraint::PatternLimits`]), so they cannot occupy every
//!   core.

use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{ApiError, ServeOptions};

pub struct Budgets {
    intake: Arc<Semaphore>,
    intake_size: usize,
    memory: Arc<Semaphore>,
    memory_kib: u64,
    pub builds: Semaphore,
}

/// What an admitted request holds until the model takes it (dropping it frees the budgets).
pub struct Admission {
    _intake: OwnedSemaphorePermit,
    memory: Vec<OwnedSemaphorePermit>,
}

/// Memory is counted in KiB (a semaphore's permits are counted in u32 at once).
fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

impl Budgets {
    pub fn new(options: &ServeOptions) -> Self {
        let intake_size = options.scheduler.queue.max(1);
        let memory_kib = kib(options.image_memory).clamp(1, Semaphore::MAX_PERMITS as u64);
        Budgets {
            intake: Arc::new(Semaphore::new(intake_size)),
            intake_size,
            memory: Arc::new(Semaphore::new(memory_kib as usize)),
            memory_kib,
            builds: Semaphore::new(1),
        }
    }

    /// Admits a request, or answers 429 when the intake is full.
    pub fn admit(&self) -> Result<Admission, ApiError> {
        match self.intake.clone().try_acquire_owned() {
            Ok(permit) => Ok(Admission {
                _intake: permit,
                memory: Vec::new(),
            }),
            Err(_) => Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the server is busy ({} requests waiting for the model); retry later",
                    self.intake_size
                ),
            )
            .retry_after(1)),
        }
    }

    /// Requests being admitted or waiting, for metrics.
    pub fn admitted(&self) -> usize {
        self.intake_size - self.intake.available_permits()
    }

    /// Image memory in use, in bytes, for metrics.
    pub fn memory_in_use(&self) -> u64 {
        (self.memory_kib - self.memory.available_permits() as u64) * 1024
    }

    /// Reserves `bytes` of image memory for `what`: 413 when more than the whole budget,
    /// 503 when the budget is taken by other requests now.
    pub fn reserve(&self, bytes: u64, what: &str) -> Result<OwnedSemaphorePermit, ApiError> {
        let need = kib(bytes);
        let total = self.memory_kib * 1024;
        if need > self.memory_kib || need > u64::from(u32::MAX) {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{what} needs {bytes} bytes of memory; this server allows {total} for images (--image-memory)"
                ),
            ));
        }
        self.memory
            .clone()
            .try_acquire_many_owned(need as u32)
            .map_err(|_| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "{what} needs {bytes} bytes of memory and other requests' images hold the server's {total} (--image-memory); retry later"
                    ),
                )
                .retry_after(1)
            })
    }
}

impl Admission {
    /// Keeps `permit` until the model takes the request.
    pub fn hold(&mut self, permit: OwnedSemaphorePermit) {
        self.memory.push(permit);
    }
}
