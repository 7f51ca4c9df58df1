//! Thin tonic adapters: extract the request, call the coordinator through
//! [`RunApi`] / [`WorkerApi`], convert the result. No logic lives here;
//! authentication and timing are one [`layer`] around each service.
//! `UploadCheckpoint` and `DownloadCheckpoint` call [`TransferApi`] (their
//! message conversions are in [`transfer`]).

pub mod layer;
pub mod transfer;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use nt_proto::tonic::{self, Request, Response, Status, Streaming};
use nt_proto::v1 as pb;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

use crate::coordinator::transfer::{TransferApi, Transfers};
use crate::coordinator::{Coordinator, RunApi, WorkerApi};

/// `nt.v1.RunService`'s methods, as its proto names them: the `method`
/// labels of `nt_rpc_duration_seconds`.
pub const RUN_METHODS: &[&str] = &[
    "SubmitRun",
    "GetRun",
    "ListRuns",
    "WatchRun",
    "CancelRun",
    "UploadCheckpoint",
    "DownloadCheckpoint",
];

/// `nt.v1.WorkerService`'s methods, as its proto names them.
pub const WORKER_METHODS: &[&str] = &[
    "RegisterWorker",
    "LeaseTask",
    "Heartbeat",
    "ReportProgress",
    "CompleteTask",
    "FailTask",
];

pub struct RunService {
    pub coordinator: Arc<Coordinator>,
    /// Checkpoint uploads and downloads.
    pub transfers: Arc<Transfers>,
    /// Ends live watches on shutdown, so open streams do not hold it up.
    pub shutdown: tokio_util::sync::CancellationToken,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RunEvent, Status>> + Send>>;

fn is_final_event(ev: &pb::RunEvent) -> bool {
    match &ev.event {
        Some(pb::run_event::Event::StateChanged(s)) => matches!(
            pb::RunState::try_from(s.state),
            Ok(pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled)
        ),
        _ => false,
    }
}

#[tonic::async_trait]
impl pb::run_service_server::RunService for RunService {
    async fn submit_run(
        &self,
        req: Request<pb::SubmitRunRequest>,
    ) -> Result<Response<pb::SubmitRunResponse>, Status> {
        let r = req.into_inner();
        let spec = match (r.spec, r.spec_file.is_empty()) {
            (Some(spec), true) => spec,
            (None, false) => spec_from_file(&r.spec_file)?,
            (Some(_), false) => {
                return Err(Status::invalid_argument(
                    "spec and spec_file: give one of them, not both",
                ))
            }
            (None, true) => return Err(Status::invalid_argument("spec: missing")),
        };
        let (run, created) = self.coordinator.submit(spec, r.request_id).await?;
        Ok(Response::new(pb::SubmitRunResponse {
            run: Some(run),
            created,
        }))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        Ok(Response::new(
            self.coordinator.get(&req.into_inner().run_id).await?,
        ))
    }

    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let r = req.into_inner();
        let state = pb::RunState::try_from(r.state)
            .map_err(|_| Status::invalid_argument("state: unknown value"))?;
        let (runs, next_page_token) = self
            .coordinator
            .list(r.page_size as usize, &r.page_token, state)
            .await?;
        Ok(Response::new(pb::ListRunsResponse {
            runs,
            next_page_token,
        }))
    }

    type WatchRunStream = EventStream;

    async fn watch_run(
        &self,
        req: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let r = req.into_inner();
        let (past, live) = self.coordinator.watch(&r.run_id, r.after_sequence).await?;
        let last = past.last().map_or(r.after_sequence, |e| e.sequence);
        let ended = past.iter().any(is_final_event);
        let past_stream = tokio_stream::iter(past.into_iter().map(Ok));
        let live_stream: EventStream = match (live, ended) {
            (Some(rx), false) => live_events(rx, r.run_id, last, self.shutdown.clone()),
            _ => Box::pin(tokio_stream::empty()),
        };
        Ok(Response::new(Box::pin(past_stream.chain(live_stream))))
    }

    async fn cancel_run(
        &self,
        req: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.coordinator.cancel(&r.run_id, &r.reason).await?,
        ))
    }

    async fn upload_checkpoint(
        &self,
        req: Request<Streaming<pb::UploadCheckpointRequest>>,
    ) -> Result<Response<pb::UploadCheckpointResponse>, Status> {
        let (header, data) = transfer::split_upload(req.into_inner()).await?;
        let uploaded = self.transfers.upload(header, data).await?;
        Ok(Response::new(transfer::uploaded(uploaded)))
    }

    type DownloadCheckpointStream = transfer::DownloadStream;

    async fn download_checkpoint(
        &self,
        req: Request<pb::DownloadCheckpointRequest>,
    ) -> Result<Response<Self::DownloadCheckpointStream>, Status> {
        let r = req.into_inner();
        let download = self.transfers.download(&r.run_id, &r.model).await?;
        Ok(Response::new(transfer::download_stream(download)))
    }
}

/// A run spec file's wire message, converted as ntctl converts it; every
/// error names the field (`spec_file: members.count: ...`).
fn spec_from_file(text: &str) -> Result<pb::RunSpec, Status> {
    let bad = |e: nt_spec::SpecError| Status::invalid_argument(format!("spec_file: {e}"));
    let file = nt_spec::file::RunSpecFile::from_yaml(text).map_err(bad)?;
    if let nt_spec::file::ArchitectureFile::File(path) = &file.architecture {
        return Err(Status::invalid_argument(format!(
            "spec_file: architecture.file: `{path}` is a file on the client; inline it as architecture: {{spec: ...}}"
        )));
    }
    file.to_proto(std::path::Path::new("")).map_err(bad)
}

pub struct WorkerService {
    pub coordinator: Arc<Coordinator>,
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerService {
    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.coordinator
                .register(&r.name, r.capabilities.unwrap_or_default(), &r.worker_id)
                .await?,
        ))
    }

    async fn lease_task(
        &self,
        req: Request<pb::LeaseTaskRequest>,
    ) -> Result<Response<pb::LeaseTaskResponse>, Status> {
        let r = req.into_inner();
        let task = self
            .coordinator
            .lease(&r.worker_id, Duration::from_millis(u64::from(r.wait_ms)))
            .await?;
        Ok(Response::new(pb::LeaseTaskResponse { task }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let tasks = self.coordinator.heartbeat(&r.worker_id, &r.tasks).await?;
        Ok(Response::new(pb::HeartbeatResponse { tasks }))
    }

    async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let r = req.into_inner();
        let worker = r.worker_id.clone();
        let directive = self.coordinator.progress(&worker, r).await?;
        Ok(Response::new(pb::ReportProgressResponse {
            directive: directive as i32,
        }))
    }

    async fn complete_task(
        &self,
        req: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let r = req.into_inner();
        self.coordinator
            .complete(
                &r.worker_id,
                &r.task_id,
                r.attempt,
                r.result.unwrap_or_default(),
            )
            .await?;
        Ok(Response::new(pb::CompleteTaskResponse {}))
    }

    async fn fail_task(
        &self,
        req: Request<pb::FailTaskRequest>,
    ) -> Result<Response<pb::FailTaskResponse>, Status> {
        let r = req.into_inner();
        self.coordinator
            .fail(
                &r.worker_id,
                &r.task_id,
                r.attempt,
                &r.error,
                r.retryable,
                r.split,
            )
            .await?;
        Ok(Response::new(pb::FailTaskResponse {}))
    }
}

/// The live events after sequence `last`, ending right after the final state
/// (not at the next event, which never comes), or with `UNAVAILABLE` when
/// the coordinator shuts down.
fn live_events(
    rx: tokio::sync::broadcast::Receiver<pb::RunEvent>,
    run_id: String,
    last: u64,
    shutdown: tokio_util::sync::CancellationToken,
) -> EventStream {
    Box::pin(futures_util::stream::unfold(
        (BroadcastStream::new(rx), last, false),
        move |(mut rx, mut last, done)| {
            let run_id = run_id.clone();
            let shutdown = shutdown.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let next = tokio::select! {
                        next = rx.next() => next,
                        _ = shutdown.cancelled() => {
                            let status = Status::unavailable(format!(
                                "the coordinator is shutting down; watch run `{run_id}` again from sequence {last}"
                            ));
                            return Some((Err(status), (rx, last, true)));
                        }
                    };
                    match next {
                        None => return None,
                        Some(Ok(ev)) if ev.sequence <= last => continue,
                        Some(Ok(ev)) => {
                            last = ev.sequence;
                            let end = is_final_event(&ev);
                            return Some((Ok(ev), (rx, last, end)));
                        }
                        Some(Err(BroadcastStreamRecvError::Lagged(n))) => {
                            let status = Status::data_loss(format!(
                                    "watcher of run `{run_id}` fell {n} events behind; watch again from sequence {last}"
                                ));
                            return Some((Err(status), (rx, last, true)));
                        }
                    }
                }
            }
        },
    ))
}
