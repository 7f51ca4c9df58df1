//! The coordinator's Prometheus metrics (units in the names) and the
//! `/metrics` endpoint.

use std::collections::HashMap;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Tasks waiting for a worker.
    pub queue_depth: IntGauge,
    runs: IntGaugeVec,
    tasks: IntGaugeVec,
    pub workers: IntGauge,
    /// 1 while the object store answers the coordinator (its lease renewals;
    /// set at each scrape, as `/healthz` says).
    pub store_up: IntGauge,
    pub lease_expiries: IntCounter,
    pub leases: IntCounter,
    pub runs_submitted: IntCounter,
    /// Runs that reached a final state, by state (for alerts on failures).
    runs_finished: IntCounterVec,
    /// Accepted tasks' compute time, by kind.
    pub task_duration: HistogramVec,
    pub fusion_duration: Histogram,
    /// gRPC handling time, by method.
    pub rpc_duration: HistogramVec,
    samples_per_second: GaugeVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are static: a failure here is a programming error.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let queue_depth = must(IntGauge::new(
            "nt_queue_depth_tasks",
            "Tasks waiting for a worker",
        ));
        let runs = must(IntGaugeVec::new(
            Opts::new("nt_runs", "Runs by state"),
            &["state"],
        ));
        let tasks = must(IntGaugeVec::new(
            Opts::new("nt_tasks", "Tasks by state"),
            &["state"],
        ));
        let workers = must(IntGauge::new("nt_workers", "Registered workers"));
        let store_up = must(IntGauge::new(
            "nt_store_up",
            "1 while the object store answers the coordinator, 0 while it does not",
        ));
        let lease_expiries = must(IntCounter::new(
            "nt_lease_expiries_total",
            "Leases that expired without a heartbeat",
        ));
        let leases = must(IntCounter::new("nt_leases_total", "Task attempts leased"));
        let runs_submitted = must(IntCounter::new("nt_runs_submitted_total", "Runs created"));
        let runs_finished = must(IntCounterVec::new(
            Opts::new(
                "nt_runs_finished_total",
                "Runs that reached a final state in this process, by state",
            ),
            &["state"],
        ));
        for state in ["succeeded", "failed", "cancelled"] {
            runs_finished.with_label_values(&[state]);
        }
        let buckets = vec![
            0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
        ];
        let task_duration = must(HistogramVec::new(
            HistogramOpts::new(
                "nt_task_duration_seconds",
                "Compute time of completed tasks",
            )
            .buckets(buckets.clone()),
            &["kind"],
        ));
        let fusion_duration = must(Histogram::with_opts(
            HistogramOpts::new("nt_fusion_duration_seconds", "Time of the fusing phase")
                .buckets(buckets),
        ));
        let rpc_duration = must(HistogramVec::new(
            HistogramOpts::new("nt_rpc_duration_seconds", "gRPC handling time").buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 30.0,
            ]),
            &["method"],
        ));
        let samples_per_second = must(GaugeVec::new(
            Opts::new(
                "nt_samples_per_second",
                "Training samples per second last reported, by worker",
            ),
            &["worker"],
        ));
        for c in [
            Box::new(queue_depth.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(runs.clone()),
            Box::new(tasks.clone()),
            Box::new(workers.clone()),
            Box::new(store_up.clone()),
            Box::new(lease_expiries.clone()),
            Box::new(leases.clone()),
            Box::new(runs_submitted.clone()),
            Box::new(runs_finished.clone()),
            Box::new(task_duration.clone()),
            Box::new(fusion_duration.clone()),
            Box::new(rpc_duration.clone()),
            Box::new(samples_per_second.clone()),
        ] {
            must(registry.register(c));
        }
        Metrics {
            registry,
            queue_depth,
            runs,
            tasks,
            workers,
            store_up,
            lease_expiries,
            leases,
            runs_submitted,
            runs_finished,
            task_duration,
            fusion_duration,
            rpc_duration,
            samples_per_second,
        }
    }

    pub fn run_finished(&self, state: &str) {
        self.runs_finished.with_label_values(&[state]).inc();
    }

    pub fn set_runs(&self, counts: &HashMap<&'static str, i64>) {
        self.runs.reset();
        for (state, n) in counts {
            self.runs.with_label_values(&[state]).set(*n);
        }
    }

    pub fn set_tasks(&self, counts: &HashMap<&'static str, i64>) {
        self.tasks.reset();
        for (state, n) in counts {
            self.tasks.with_label_values(&[state]).set(*n);
        }
    }

    pub fn set_samples_per_second(&self, worker: &str, value: f64) {
        self.samples_per_second
            .with_label_values(&[worker])
            .set(value);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Serves `/metrics` (and `/healthz`) on `listener` until `shutdown`.
/// `/healthz` answers 200 `ok`, or 503 naming the store's error while the
/// store does not answer (the process is alive either way: the probes of
/// the deployment use gRPC health, not this).
pub async fn serve(
    metrics: Metrics,
    listener: tokio::net::TcpListener,
    store_error: impl Fn() -> Option<String> + Clone + Send + Sync + 'static,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let store_error_of_scrape = store_error.clone();
    let health = move || {
        let store_error = store_error.clone();
        async move {
            match store_error() {
                None => (StatusCode::OK, "ok".to_string()),
                Some(e) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("store unavailable: {e}\n"),
                ),
            }
        }
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                let store_error = store_error_of_scrape.clone();
                async move {
                    // The same answer as /healthz, at the moment of the scrape.
                    m.store_up.set(i64::from(store_error().is_none()));
                    m.render()
                }
            }),
        )
        .route("/healthz", get(health));
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}
