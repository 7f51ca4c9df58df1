//! The conversions of `UploadCheckpoint` and `DownloadCheckpoint`: a
//! stream of `UploadCheckpointRequest`s into a header and a byte stream, a
//! [`Download`] into a stream of `DownloadCheckpointResponse`s.

use std::pin::Pin;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use nt_proto::tonic::{Status, Streaming};
use nt_proto::v1 as pb;
use pb::download_checkpoint_response::Part as DownPart;
use pb::upload_checkpoint_request::Part as UpPart;
use tokio_stream::Stream;

use crate::coordinator::transfer::{Download, DownloadPart, UploadHeader, Uploaded};
use crate::error::CoordinatorError;

pub type DownloadStream =
    Pin<Box<dyn Stream<Item = Result<pb::DownloadCheckpointResponse, Status>> + Send>>;

fn invalid(why: &str) -> CoordinatorError {
    CoordinatorError::InvalidArgument(why.to_string())
}

/// The header (the first message) and the data after it. A second header,
/// an empty message or a broken stream end the data with an error.
pub async fn split_upload(
    mut stream: Streaming<pb::UploadCheckpointRequest>,
) -> Result<
    (
        UploadHeader,
        BoxStream<'static, Result<Bytes, CoordinatorError>>,
    ),
    Status,
> {
    let header = match stream.message().await?.and_then(|m| m.part) {
        Some(UpPart::Header(h)) => h,
        Some(UpPart::Data(_)) => {
            return Err(invalid("the first message of an upload must be its header").into())
        }
        None => return Err(invalid("an upload starts with a header message").into()),
    };
    let data = futures_util::stream::unfold(Some(stream), |stream| async move {
        let mut stream = stream?;
        let item = match stream.message().await {
            Ok(None) => return None,
            Ok(Some(pb::UploadCheckpointRequest {
                part: Some(UpPart::Data(d)),
            })) => Ok(Bytes::from(d)),
            Ok(Some(pb::UploadCheckpointRequest {
                part: Some(UpPart::Header(_)),
            })) => Err(invalid("an upload carries one header, first")),
            Ok(Some(pb::UploadCheckpointRequest { part: None })) => {
                Err(invalid("an upload message carries no data"))
            }
            Err(s) => Err(CoordinatorError::RequestStream(
                s.code(),
                format!("the upload's stream broke: {}", s.message()),
            )),
        };
        // Nothing is read after an error.
        let next = item.is_ok().then_some(stream);
        Some((item, next))
    })
    .boxed();
    let header = UploadHeader {
        file_name: header.file_name,
        size: header.size,
        architecture: header.architecture,
        sha256: header.sha256,
    };
    Ok((header, data))
}

pub fn uploaded(u: Uploaded) -> pb::UploadCheckpointResponse {
    pb::UploadCheckpointResponse {
        key: u.key,
        size: u.size,
        sha256: u.sha256,
        dtype: u.precision.name().to_string(),
        tensors: u32::try_from(u.tensors).unwrap_or(u32::MAX),
        created: u.created,
        architecture: u.architecture,
    }
}

/// The info message, then the parts as they are read.
pub fn download_stream(d: Download) -> DownloadStream {
    let info = pb::DownloadCheckpointResponse {
        part: Some(DownPart::Info(pb::DownloadInfo {
            model: d.info.model,
            key: d.info.key,
            size: d.info.size,
            file_name: d.info.file_name,
        })),
    };
    let parts = futures_util::stream::unfold(d.parts, |mut rx| async move {
        let part = rx.recv().await?;
        let message = part.map_err(Status::from).map(|p| match p {
            DownloadPart::Data(bytes) => pb::DownloadCheckpointResponse {
                part: Some(DownPart::Data(bytes)),
            },
            DownloadPart::End { sha256 } => pb::DownloadCheckpointResponse {
                part: Some(DownPart::End(pb::DownloadEnd { sha256 })),
            },
        });
        Some((message, rx))
    });
    Box::pin(futures_util::stream::iter([Ok(info)]).chain(parts))
}
