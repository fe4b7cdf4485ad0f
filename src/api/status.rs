//! The one place where errors of the inner layers become gRPC statuses.

use tonic::Status;

use crate::index::{IndexError, IndexErrorKind};
use crate::pipeline::BatchError;
use crate::usecase::UseCaseError;

impl From<IndexError> for Status {
    fn from(e: IndexError) -> Self {
        bounded(index_status(e))
    }
}

fn index_status(e: IndexError) -> Status {
    match e.kind() {
        IndexErrorKind::NotFound => Status::not_found(e.to_string()),
        IndexErrorKind::AlreadyExists => Status::already_exists(e.to_string()),
        IndexErrorKind::InvalidArgument => Status::invalid_argument(e.to_string()),
        IndexErrorKind::Unavailable => Status::unavailable(e.to_string()),
        IndexErrorKind::Exhausted => Status::resource_exhausted(e.to_string()),
        IndexErrorKind::Precondition => Status::failed_precondition(e.to_string()),
        IndexErrorKind::Damaged => {
            tracing::error!(error = %e, "stored data failed a check");
            Status::data_loss(e.to_string())
        }
        IndexErrorKind::Storage => {
            tracing::error!(error = %e, "storage failure");
            Status::internal(format!("storage failure: {e}"))
        }
    }
}

impl From<UseCaseError> for Status {
    fn from(e: UseCaseError) -> Self {
        bounded(use_case_status(e))
    }
}

fn use_case_status(e: UseCaseError) -> Status {
    match e {
        UseCaseError::Index(e) => e.into(),
        UseCaseError::Batch(e) => e.into(),
        UseCaseError::NoModel => Status::failed_precondition(e.to_string()),
        UseCaseError::NotSupported(_) => Status::failed_precondition(e.to_string()),
        UseCaseError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        UseCaseError::TooLarge(_) => Status::resource_exhausted(e.to_string()),
        UseCaseError::Internal(_) => {
            tracing::error!(error = %e, "blocking task failed");
            Status::internal("internal error")
        }
    }
}

impl From<BatchError> for Status {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::QueueFull(_) => busy(e.to_string()),
            BatchError::Stopped => Status::unavailable(e.to_string()),
            BatchError::Inference(_) => {
                tracing::error!(error = %e, "inference failed");
                Status::internal(e.to_string())
            }
        }
    }
}

/// The wait a busy server suggests before a retry, seconds (`retry-after`, as in HTTP): the
/// model's queue and the call limits drain within about a second under load.
pub const RETRY_AFTER_SECS: u32 = 1;

/// RESOURCE_EXHAUSTED for a bound that frees itself soon (calls, streams, the model's queue),
/// with a `retry-after` the clients honour.
pub fn busy(message: String) -> Status {
    let mut status = Status::resource_exhausted(message);
    status.metadata_mut().insert("retry-after", tonic::metadata::MetadataValue::from(RETRY_AFTER_SECS));
    status
}

/// The longest status message sent, bytes: messages travel in HTTP/2 headers, and one that
/// echoed a large input would exceed the client's metadata limit (16 KiB) and reach it as the
/// transport's RESOURCE_EXHAUSTED instead of the code meant. Inner layers quote client input
/// briefly (`limits::quote`); this is the backstop.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// `status` with its message cut to `MAX_STATUS_MESSAGE_BYTES` (at a character boundary).
pub fn bounded(status: Status) -> Status {
    let message = status.message();
    if message.len() <= MAX_STATUS_MESSAGE_BYTES {
        return status;
    }
    let mut cut = MAX_STATUS_MESSAGE_BYTES;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    Status::new(status.code(), format!("{}… (message cut)", &message[..cut]))
}

#[cfg(test)]
mod tests {
    // Store errors reach the api only inside `IndexError`, classified by `IndexError::kind`.
    use super::*;
    use crate::store::StoreError;
    use tonic::Code;

    #[test]
    fn busy_statuses_say_when_to_retry() {
        let status = busy("queue full".into());
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(crate::client::retry_after(&status), Some(std::time::Duration::from_secs(1)));
        let refused = Status::from(UseCaseError::TooLarge(crate::limits::OverLimit {
            what: "items",
            value: 2,
            limit: 1,
            flag: "--max-batch-items",
        }));
        assert_eq!(crate::client::retry_after(&refused), None, "a request over a bound fails the same way again");
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let status = bounded(Status::invalid_argument("é".repeat(10_000)));
        assert!(status.message().len() <= MAX_STATUS_MESSAGE_BYTES + 20);
        assert_eq!(status.code(), Code::InvalidArgument);
    }

    #[test]
    fn domain_errors_map_to_the_documented_codes() {
        let cases = [
            (IndexError::NotFound("a".into()), Code::NotFound),
            (IndexError::ItemNotFound { index: "a".into(), id: "b".into() }, Code::NotFound),
            (IndexError::AlreadyExists("a".into()), Code::AlreadyExists),
            (IndexError::InvalidArgument("x".into()), Code::InvalidArgument),
            (IndexError::Store(StoreError::Corrupt("x".into())), Code::DataLoss),
            (IndexError::Store(StoreError::Io(std::io::Error::other("disk"))), Code::Internal),
            (IndexError::Store(StoreError::LayoutTooNew { found: 2, supported: 1 }), Code::FailedPrecondition),
        ];
        for (error, code) in cases {
            assert_eq!(Status::from(error).code(), code);
        }
        assert_eq!(Status::from(BatchError::QueueFull(std::time::Duration::ZERO)).code(), Code::ResourceExhausted);
        assert_eq!(Status::from(BatchError::Stopped).code(), Code::Unavailable);
    }
}
