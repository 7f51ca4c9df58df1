//! A simulated worker: a WorkerService client of its own that registers,
//! leases tasks, heartbeats, reports progress once per attempt, and delivers
//! what the coordinator checks: a real checkpoint of the run's architecture
//! under the attempt's output prefix for training and fine-tuning (fusion
//! reads the members), scores for evaluations. The work itself is a sleep of
//! a few seconds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use bytes::Bytes;
use nt_common::{layout, Storage};
use nt_proto::v1 as pb;
use nt_testkit::cluster::{register_request, WorkerClient};

use super::record::Tally;

/// Valid checkpoints per architecture (its nt.arch/v1 JSON), made once:
/// two differently seeded networks, so fusion has distinct members.
#[derive(Default)]
pub struct Checkpoints {
    made: Mutex<HashMap<String, [Bytes; 2]>>,
}

impl Checkpoints {
    pub async fn get(&self, arch_json: &str) -> Result<[Bytes; 2]> {
        if let Some(c) = self.lock().get(arch_json) {
            return Ok(c.clone());
        }
        let json = arch_json.to_string();
        let made = tokio::task::spawn_blocking(move || -> Result<[Bytes; 2]> {
            let arch = fusion::arch::Architecture::from_json(&json)?;
            let one = |seed: u64| -> Result<Bytes> {
                let net = nt_runtime::model::Network::init(&arch, tch::Device::Cpu, seed)?;
                Ok(fusion::checkpoint::to_bytes(&net.to_state()?)?.into())
            };
            Ok([one(1)?, one(2)?])
        })
        .await??;
        self.lock().insert(arch_json.to_string(), made.clone());
        Ok(made)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, [Bytes; 2]>> {
        self.made.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A small deterministic generator (SplitMix64) for work times.
struct Rng(u64);

impl Rng {
    /// Uniform in [lo, hi).
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        lo + (hi - lo) * (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct SimWorker {
    pub name: String,
    pub client: WorkerClient,
    pub storage: Storage,
    pub checkpoints: Arc<Checkpoints>,
    pub tally: Arc<Tally>,
    pub stop: Arc<AtomicBool>,
    /// Multiplies the work times (1: training 3-9 s, fine-tuning 2-5 s,
    /// evaluation 0.5-1.5 s).
    pub work_scale: f64,
}

impl SimWorker {
    /// Leases and works until `stop` is set.
    pub async fn run(mut self, seed: u64) -> Result<()> {
        let reg = self
            .tally
            .timed(
                "RegisterWorker",
                self.client.register_worker(register_request(&self.name, 0)),
            )
            .await?
            .into_inner();
        let heartbeat = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.max(100)));
        let mut rng = Rng(seed);
        while !self.stop.load(Ordering::Relaxed) {
            let leased = self
                .tally
                .timed(
                    "LeaseTask",
                    self.client.lease_task(pb::LeaseTaskRequest {
                        worker_id: reg.worker_id.clone(),
                        wait_ms: 2_000,
                    }),
                )
                .await;
            let task = match leased {
                Ok(r) => r.into_inner().task,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if let Some(task) = task {
                self.tally.leased(&task.task_id, task.attempt);
                self.work(&reg.worker_id, &task, heartbeat, &mut rng)
                    .await?;
            }
        }
        Ok(())
    }

    /// One attempt: heartbeats while "working", one progress report half
    /// way, then the output and the completion.
    async fn work(
        &mut self,
        worker_id: &str,
        task: &pb::Task,
        heartbeat: Duration,
        rng: &mut Rng,
    ) -> Result<()> {
        let kind = pb::TaskKind::try_from(task.kind).unwrap_or(pb::TaskKind::Unspecified);
        let (lo, hi) = match kind {
            pb::TaskKind::Train => (3.0, 9.0),
            pb::TaskKind::FineTune => (2.0, 5.0),
            _ => (0.5, 1.5),
        };
        let seconds = rng.between(lo, hi) * self.work_scale;
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(seconds);
        let half = start + Duration::from_secs_f64(seconds / 2.0);
        let mut reported = false;
        loop {
            let now = Instant::now();
            let next = if reported { now + heartbeat } else { half };
            let next = next.min(now + heartbeat).min(end);
            tokio::time::sleep_until(next.into()).await;
            if Instant::now() >= end {
                break;
            }
            let directive = if !reported && Instant::now() >= half {
                reported = true;
                self.progress(worker_id, task, kind).await?
            } else {
                self.heartbeat(worker_id, task).await
            };
            if directive != pb::TaskDirective::Continue {
                self.tally.abandoned();
                return Ok(());
            }
        }
        if !reported && self.progress(worker_id, task, kind).await? != pb::TaskDirective::Continue {
            self.tally.abandoned();
            return Ok(());
        }
        let result = match self.result(task, kind, seconds).await {
            Ok(r) => r,
            Err(e) => {
                self.tally.failed();
                let _ = self
                    .tally
                    .timed(
                        "FailTask",
                        self.client.fail_task(pb::FailTaskRequest {
                            worker_id: worker_id.into(),
                            task_id: task.task_id.clone(),
                            attempt: task.attempt,
                            error: format!("soak worker: {e}"),
                            retryable: true,
                            split: false,
                        }),
                    )
                    .await;
                return Ok(());
            }
        };
        let done = self
            .tally
            .timed(
                "CompleteTask",
                self.client.complete_task(pb::CompleteTaskRequest {
                    worker_id: worker_id.into(),
                    task_id: task.task_id.clone(),
                    attempt: task.attempt,
                    result: Some(result),
                }),
            )
            .await;
        match done {
            Ok(_) => self.tally.completed(&task.task_id, task.attempt),
            Err(status) => {
                eprintln!(
                    "completion of {} attempt {} refused: {status:?}",
                    task.task_id, task.attempt
                );
                self.tally.refused();
            }
        }
        Ok(())
    }

    async fn heartbeat(&mut self, worker_id: &str, task: &pb::Task) -> pb::TaskDirective {
        let answer = self
            .tally
            .timed(
                "Heartbeat",
                self.client.heartbeat(pb::HeartbeatRequest {
                    worker_id: worker_id.into(),
                    tasks: vec![pb::TaskLease {
                        task_id: task.task_id.clone(),
                        attempt: task.attempt,
                    }],
                }),
            )
            .await;
        match answer {
            Ok(r) => r
                .into_inner()
                .tasks
                .first()
                .and_then(|i| pb::TaskDirective::try_from(i.directive).ok())
                .unwrap_or(pb::TaskDirective::LeaseLost),
            // A transport error: carry on, the lease outlives one missed beat.
            Err(_) => pb::TaskDirective::Continue,
        }
    }

    /// Epoch 1 of 2 finished; training also writes its resumable epoch state.
    async fn progress(
        &mut self,
        worker_id: &str,
        task: &pb::Task,
        kind: pb::TaskKind,
    ) -> Result<pb::TaskDirective> {
        let mut checkpoint = String::new();
        if kind == pb::TaskKind::Train {
            let bytes = self.checkpoint(task, kind).await?;
            let key = layout::epoch_state(&task.output_prefix, 1);
            if self.put(&key, bytes).await.is_ok() {
                checkpoint = key;
            }
        }
        let answer = self
            .tally
            .timed(
                "ReportProgress",
                self.client.report_progress(pb::ReportProgressRequest {
                    worker_id: worker_id.into(),
                    task_id: task.task_id.clone(),
                    attempt: task.attempt,
                    progress: Some(pb::TaskProgress {
                        epoch: 1,
                        epochs: 2,
                        step: 4,
                        steps: 4,
                        loss: 1.2,
                        accuracy: 0.6,
                        samples_per_second: if kind == pb::TaskKind::Evaluate {
                            0.0
                        } else {
                            1000.0
                        },
                        lr: 0.05,
                        eval_accuracy: Some(0.55),
                    }),
                    checkpoint_epoch: u32::from(!checkpoint.is_empty()),
                    checkpoint,
                    epoch: (kind != pb::TaskKind::Evaluate).then(|| curve_point(1)),
                    part: None,
                }),
            )
            .await;
        Ok(match answer {
            Ok(r) => pb::TaskDirective::try_from(r.into_inner().directive)
                .unwrap_or(pb::TaskDirective::LeaseLost),
            Err(_) => pb::TaskDirective::Continue,
        })
    }

    /// What the attempt delivers; training and fine-tuning upload their model.
    async fn result(
        &mut self,
        task: &pb::Task,
        kind: pb::TaskKind,
        seconds: f64,
    ) -> Result<pb::TaskResult> {
        let score = |name: &str, checkpoint: &str| pb::ModelReport {
            name: name.into(),
            accuracy: 0.6,
            loss: 1.1,
            parameters: 6_442,
            checkpoint: checkpoint.into(),
            data: None,
        };
        let mut result = pb::TaskResult {
            compute_seconds: seconds,
            ..Default::default()
        };
        if kind == pb::TaskKind::Evaluate {
            result.evaluations = task
                .evaluate
                .iter()
                .map(|item| {
                    score(
                        &item.name,
                        item.checkpoints.first().map_or("", String::as_str),
                    )
                })
                .collect();
            return Ok(result);
        }
        let key = layout::attempt_model(&task.output_prefix);
        let bytes = self.checkpoint(task, kind).await?;
        self.put(&key, bytes).await?;
        result.curve = vec![curve_point(1), curve_point(2)];
        result.after = Some(score(&task.label, &key));
        if kind == pb::TaskKind::FineTune {
            result.before = Some(score(&task.label, &task.init_checkpoint));
        }
        result.samples_per_second = 1000.0;
        result.checkpoint = key;
        Ok(result)
    }

    /// Member i gets checkpoint i % 2; fine-tuned models the first.
    async fn checkpoint(&self, task: &pb::Task, kind: pb::TaskKind) -> Result<Bytes> {
        let made = self.checkpoints.get(&task.architecture_json).await?;
        let member = task
            .label
            .strip_prefix("member ")
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|_| kind == pb::TaskKind::Train)
            .unwrap_or(0);
        Ok(made[member % 2].clone())
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        self.tally
            .timed("store put (not an RPC)", self.storage.put(key, bytes))
            .await
            .map(|_| ())
            .map_err(|e| anyhow!("storing {key}: {e}"))
    }
}

fn curve_point(epoch: u32) -> pb::CurvePoint {
    pb::CurvePoint {
        epoch,
        train_loss: 1.3 - 0.1 * f64::from(epoch),
        train_accuracy: 0.5 + 0.05 * f64::from(epoch),
        eval_accuracy: 0.5 + 0.04 * f64::from(epoch),
        eval_loss: 1.35 - 0.1 * f64::from(epoch),
    }
}
