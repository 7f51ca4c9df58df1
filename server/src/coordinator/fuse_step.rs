//! The fusing phase: the coordinator reads the accepted member checkpoints
//! from the object store, fuses them with every method of the run on a
//! blocking thread, stores the fused models and queues their fine-tuning.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use nt_common::layout;
use nt_proto::v1 as pb;
use tracing::{info, instrument, warn};

use super::model::{FusedRecord, TaskWork};
use super::Coordinator;

impl Coordinator {
    pub(super) fn spawn_fusion(self: Arc<Self>, run_id: String) {
        tokio::spawn(async move {
            let outcome = self.fuse_run(&run_id).await;
            self.finish_fusion(&run_id, outcome).await;
        });
    }

    #[instrument(skip_all, fields(run_id = %run_id))]
    async fn fuse_run(&self, run_id: &str) -> Result<Vec<FusedRecord>, String> {
        let (keys, plan) = {
            let st = self.lock();
            let e = st.runs.get(run_id).ok_or("the run vanished")?;
            (e.record.member_keys.clone(), e.plan.clone())
        };
        let mut members = Vec::with_capacity(keys.len());
        for key in &keys {
            match self.storage.get(key).await {
                Ok(Some((bytes, _))) => members.push((key.clone(), bytes)),
                Ok(None) => return Err(format!("member checkpoint `{key}` does not exist")),
                Err(e) => return Err(format!("reading member checkpoint `{key}`: {e}")),
            }
        }
        info!(
            members = members.len(),
            methods = plan.methods.len(),
            "fusing"
        );
        let start = Instant::now();
        let blocking_plan = plan.clone();
        let fused =
            tokio::task::spawn_blocking(move || -> Result<Vec<(FusedRecord, Vec<u8>)>, String> {
                let states = members
                    .into_iter()
                    .map(|(key, bytes)| fusion::checkpoint::load_bytes(&key, Vec::from(bytes)))
                    .collect::<fusion::Result<Vec<_>>>()
                    .map_err(|e| e.to_string())?;
                let refs: Vec<_> = states.iter().collect();
                let mut out = Vec::new();
                for &method in &blocking_plan.methods {
                    let mut fused = nt_runtime::fuse(
                        method,
                        &blocking_plan.arch,
                        &refs,
                        &nt_runtime::FuseOptions::default(),
                    )
                    .map_err(|e| format!("{method}: {e}"))?;
                    let mut lineage = fused.state.lineage().unwrap_or_default();
                    lineage.members = keys.clone();
                    lineage
                        .metrics
                        .insert("fusion_seconds".into(), fused.report.seconds);
                    fused.state.set_lineage(&lineage);
                    let bytes =
                        fusion::checkpoint::to_bytes(&fused.state).map_err(|e| e.to_string())?;
                    let groups = fused
                        .report
                        .groups
                        .iter()
                        .map(|g| pb::GroupKept {
                            layers: g.layers.clone(),
                            width: g.width as u32,
                            per_member: g.kept_per_member.iter().map(|&k| k as u32).collect(),
                        })
                        .collect();
                    out.push((
                        FusedRecord {
                            method,
                            key: String::new(),
                            seconds: fused.report.seconds,
                            parameters: fused.report.parameters as u64,
                            groups,
                        },
                        bytes,
                    ));
                }
                Ok(out)
            })
            .await
            .map_err(|e| format!("the fusion thread failed: {e}"))??;
        let mut records = Vec::new();
        for (mut record, bytes) in fused {
            let key = layout::fused(run_id, record.method.as_str());
            self.storage
                .put(&key, Bytes::from(bytes))
                .await
                .map_err(|e| format!("storing `{key}`: {e}"))?;
            record.key = key;
            records.push(record);
        }
        self.metrics
            .fusion_duration
            .observe(start.elapsed().as_secs_f64());
        info!(seconds = start.elapsed().as_secs_f64(), "fused");
        Ok(records)
    }

    async fn finish_fusion(&self, run_id: &str, outcome: Result<Vec<FusedRecord>, String>) {
        let snap = {
            let mut st = self.lock();
            let Some(entry) = st.runs.get_mut(run_id) else {
                return;
            };
            if entry.record.state() != pb::RunState::Fusing {
                return; // cancelled meanwhile
            }
            match outcome {
                Ok(records) => {
                    let methods: Vec<_> = records.iter().map(|r| r.method).collect();
                    entry.record.fused = records;
                    Self::set_run_state(entry, pb::RunState::FineTuning, "");
                    for method in methods {
                        Self::add_task(&mut st, run_id, TaskWork::FineTune { method });
                    }
                }
                Err(e) => self.fail_run(&mut st, run_id, &format!("fusion failed: {e}")),
            }
            let Some(entry) = st.runs.get_mut(run_id) else {
                return;
            };
            let snap = Self::snapshot(entry);
            self.update_gauges(&st);
            snap
        };
        match snap {
            Ok(s) => {
                if let Err(e) = self.save(s).await {
                    warn!(run_id, error = %e, "saving after fusion");
                }
            }
            Err(e) => warn!(run_id, error = %e, "snapshot after fusion"),
        }
        self.task_ready.notify_waiters();
    }
}
