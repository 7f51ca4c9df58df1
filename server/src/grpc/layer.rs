//! What every call to an nt service passes through before its handler: it is
//! timed into `nt_rpc_duration_seconds{method}`, then its bearer token is
//! checked, then tonic decodes it (refusing messages over
//! `--max-message-bytes` with `OUT_OF_RANGE`). Health and reflection are
//! served beside the nt services, not through this layer: they stay open
//! and untimed.

use std::sync::Arc;
use std::task::{Context, Poll};

use nt_common::auth;
use nt_proto::tonic::codegen::{http, BoxFuture, Service};
use nt_proto::tonic::server::NamedService;
use nt_proto::tonic::service::{interceptor::InterceptedService, Interceptor};
use nt_proto::tonic::{Request, Status};
use prometheus::HistogramVec;

/// An nt service behind the layer.
pub type Guarded<S> = Timed<InterceptedService<S, RequireToken>>;

/// Puts `service` behind the layer: calls must carry `token` (empty: every
/// call passes), named `who` in refusals ("client", "worker"); the calls to
/// `methods` (the short names in the service's proto) are timed.
pub fn guard<S: NamedService>(
    service: S,
    token: &str,
    who: &'static str,
    methods: &'static [&'static str],
    rpc_duration: HistogramVec,
) -> Guarded<S> {
    let require = RequireToken {
        expected: (!token.is_empty()).then(|| Arc::from(token)),
        who,
    };
    Timed {
        inner: InterceptedService::new(service, require),
        methods,
        rpc_duration,
    }
}

/// Refuses a call without the expected bearer token, with
/// [`auth::check`]'s `UNAUTHENTICATED` status. It runs on the headers, so an
/// unauthenticated request body is never decoded.
#[derive(Clone)]
pub struct RequireToken {
    expected: Option<Arc<str>>,
    who: &'static str,
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        auth::check(request.metadata(), self.expected.as_deref(), self.who)?;
        Ok(request)
    }
}

/// Observes each call's handling time (until the response headers: a
/// stream's setup, not its life) under the method's short name. Refused
/// calls are timed too. A path naming no method of the service is not timed,
/// so callers cannot grow the label set.
#[derive(Clone)]
pub struct Timed<S> {
    inner: S,
    methods: &'static [&'static str],
    rpc_duration: HistogramVec,
}

impl<S: NamedService> Timed<S> {
    /// `/nt.v1.RunService/SubmitRun` → `SubmitRun`, when it is one of `methods`.
    fn method(&self, path: &str) -> Option<&'static str> {
        let name = path
            .strip_prefix('/')?
            .strip_prefix(S::NAME)?
            .strip_prefix('/')?;
        self.methods.iter().copied().find(|m| *m == name)
    }
}

impl<S: NamedService> NamedService for Timed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Timed<S>
where
    S: Service<http::Request<B>> + NamedService,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Observed when dropped: on the response, or when the caller gives up.
        let timer = self
            .method(request.uri().path())
            .map(|m| self.rpc_duration.with_label_values(&[m]).start_timer());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(timer);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use clap::Parser;
    use nt_common::auth::BearerToken;
    use nt_proto::tonic::transport::Channel;
    use nt_proto::tonic::Code;
    use nt_proto::v1 as pb;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::grpc::{RUN_METHODS, WORKER_METHODS};

    type RunClient =
        pb::run_service_client::RunServiceClient<InterceptedService<Channel, BearerToken>>;
    type WorkerClient =
        pb::worker_service_client::WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

    /// Calls every `RunService` method once.
    async fn every_run_method(c: &mut RunClient) -> Vec<(&'static str, Result<(), Status>)> {
        vec![
            (
                "SubmitRun",
                c.submit_run(pb::SubmitRunRequest::default())
                    .await
                    .map(drop),
            ),
            (
                "GetRun",
                c.get_run(pb::GetRunRequest::default()).await.map(drop),
            ),
            (
                "ListRuns",
                c.list_runs(pb::ListRunsRequest::default()).await.map(drop),
            ),
            (
                "WatchRun",
                c.watch_run(pb::WatchRunRequest::default()).await.map(drop),
            ),
            (
                "CancelRun",
                c.cancel_run(pb::CancelRunRequest::default())
                    .await
                    .map(drop),
            ),
            (
                "UploadCheckpoint",
                c.upload_checkpoint(tokio_stream::iter([pb::UploadCheckpointRequest::default()]))
                    .await
                    .map(drop),
            ),
            (
                "DownloadCheckpoint",
                c.download_checkpoint(pb::DownloadCheckpointRequest::default())
                    .await
                    .map(drop),
            ),
        ]
    }

    /// Calls every `WorkerService` method once.
    async fn every_worker_method(c: &mut WorkerClient) -> Vec<(&'static str, Result<(), Status>)> {
        vec![
            (
                "RegisterWorker",
                c.register_worker(pb::RegisterWorkerRequest::default())
                    .await
                    .map(drop),
            ),
            (
                "LeaseTask",
                c.lease_task(pb::LeaseTaskRequest::default())
                    .await
                    .map(drop),
            ),
            (
                "Heartbeat",
                c.heartbeat(pb::HeartbeatRequest::default()).await.map(drop),
            ),
            (
                "ReportProgress",
                c.report_progress(pb::ReportProgressRequest::default())
                    .await
                    .map(drop),
            ),
            (
                "CompleteTask",
                c.complete_task(pb::CompleteTaskRequest::default())
                    .await
                    .map(drop),
            ),
            (
                "FailTask",
                c.fail_task(pb::FailTaskRequest::default()).await.map(drop),
            ),
        ]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_nt_method_checks_its_token_and_is_timed_and_health_is_open() {
        let args = crate::ServerArgs::try_parse_from([
            "nt-server",
            "--store=memory://",
            "--metrics-listen=",
            "--client-token=client-secret",
            "--worker-token=worker-secret",
            "--max-message-bytes=1024",
        ])
        .unwrap();
        let shutdown = CancellationToken::new();
        let coordinator = crate::start_coordinator(&args, shutdown.clone())
            .await
            .unwrap();
        let rpc_duration = coordinator.metrics().rpc_duration.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let channel = Channel::from_shared(format!("http://{}", listener.local_addr().unwrap()))
            .unwrap()
            .connect_lazy();
        let server = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { crate::serve(&args, coordinator, listener, None, shutdown).await }
        });
        let token = |t: &str| BearerToken::new(Some(t)).unwrap();
        let run_client = |t: &str| {
            pb::run_service_client::RunServiceClient::with_interceptor(channel.clone(), token(t))
        };
        let worker_client = |t: &str| {
            pb::worker_service_client::WorkerServiceClient::with_interceptor(
                channel.clone(),
                token(t),
            )
        };

        // Calls made, by method: the histogram must count exactly these.
        let mut made: BTreeMap<&str, u64> = BTreeMap::new();
        let mut count = |calls: &[(&'static str, Result<(), Status>)]| {
            for (m, _) in calls {
                *made.entry(*m).or_default() += 1;
            }
        };

        // No token, a wrong one, the other service's: every method refuses.
        for (client, worker, why) in [
            (
                "",
                "",
                "missing bearer token: this service needs the {} token",
            ),
            ("wrong", "wrong", "invalid {} token"),
            ("worker-secret", "client-secret", "invalid {} token"),
        ] {
            let run_calls = every_run_method(&mut run_client(client)).await;
            let worker_calls = every_worker_method(&mut worker_client(worker)).await;
            count(&run_calls);
            count(&worker_calls);
            for (who, t, calls) in [
                ("client", client, run_calls),
                ("worker", worker, worker_calls),
            ] {
                for (method, r) in calls {
                    let e = r.expect_err(method);
                    assert_eq!(e.code(), Code::Unauthenticated, "{method}, {t:?}: {e:?}");
                    assert_eq!(e.message(), why.replace("{}", who), "{method}, {t:?}");
                }
            }
        }

        // The right token reaches the handlers.
        let (mut run, mut worker) = (run_client("client-secret"), worker_client("worker-secret"));
        let run_calls = every_run_method(&mut run).await;
        let worker_calls = every_worker_method(&mut worker).await;
        count(&run_calls);
        count(&worker_calls);
        for (method, r) in run_calls.into_iter().chain(worker_calls) {
            if let Err(e) = r {
                assert_ne!(e.code(), Code::Unauthenticated, "{method}: {e:?}");
            }
        }
        let err = run.get_run(pb::GetRunRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");

        // The token is checked before the body is decoded; the size limit after.
        let mut spec = pb::RunSpec::default();
        spec.labels.insert("padding".into(), "x".repeat(2000));
        let huge = pb::SubmitRunRequest {
            spec: Some(spec),
            ..Default::default()
        };
        let e = run_client("wrong")
            .submit_run(huge.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let e = run.submit_run(huge).await.unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        assert!(e.message().contains("the limit is: 1024 bytes"), "{e:?}");
        *made.entry("GetRun").or_default() += 1;
        *made.entry("SubmitRun").or_default() += 2;

        // Health stays open (and untimed).
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let serving = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "nt.v1.WorkerService".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            serving.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );

        // One sample per call, under the method's name, and no other label.
        let timed: BTreeMap<String, u64> = prometheus::core::Collector::collect(&rpc_duration)
            .iter()
            .flat_map(|f| f.get_metric().iter())
            .map(|m| {
                let method = m.get_label()[0].value().to_string();
                (method, m.get_histogram().get_sample_count())
            })
            .collect();
        let made: BTreeMap<String, u64> = made.into_iter().map(|(m, n)| (m.into(), n)).collect();
        assert_eq!(timed, made);
        assert_eq!(made.len(), RUN_METHODS.len() + WORKER_METHODS.len());

        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
