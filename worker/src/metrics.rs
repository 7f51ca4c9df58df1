//! The worker's Prometheus metrics and its `/healthz` + `/metrics` endpoint
//! (for Kubernetes probes and scraping; off unless --health-listen is set).

use prometheus::{Encoder, Gauge, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct WorkerMetrics {
    registry: Registry,
    /// 1 once registered with the coordinator.
    pub registered: IntGauge,
    pub running: IntGauge,
    /// Finished attempts by outcome: completed, failed, stopped, released,
    /// split (a joint task whose models could not train jointly here).
    pub tasks: IntCounterVec,
    pub samples_per_second: Gauge,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let registered = must(IntGauge::new(
            "nt_worker_registered",
            "1 once registered with the coordinator",
        ));
        let running = must(IntGauge::new(
            "nt_worker_running_tasks",
            "Task attempts running",
        ));
        let tasks = must(IntCounterVec::new(
            Opts::new("nt_worker_tasks_total", "Finished task attempts by outcome"),
            &["outcome"],
        ));
        let samples_per_second = must(Gauge::new(
            "nt_worker_samples_per_second",
            "Training samples per second last reported",
        ));
        must(registry.register(Box::new(registered.clone())));
        must(registry.register(Box::new(running.clone())));
        must(registry.register(Box::new(tasks.clone())));
        must(registry.register(Box::new(samples_per_second.clone())));
        WorkerMetrics {
            registry,
            registered,
            running,
            tasks,
            samples_per_second,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Serves `/healthz` (200 once registered, 503 before) and `/metrics`.
pub async fn serve(
    metrics: WorkerMetrics,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let ok = m.registered.get() == 1;
                async move {
                    if ok {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not registered yet")
                    }
                }
            }),
        );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}
