//! The fusing phase's work: read the accepted member checkpoints from the
//! object store, fuse them with every method of the plan on a blocking
//! thread (the exactness guard runs below its size limit), and store the
//! fused models in the members' float dtype (or the plan's). Each method's
//! peak heap is measured (one fusion at a time in a process: they use every
//! core anyway, and the measure is process-wide). What to do with the
//! outcome is the runbook's business.

use std::time::Instant;

use bytes::Bytes;
use fusion::checkpoint::{self, Precision};
use nt_common::{layout, Storage};
use nt_spec::Plan;
use tracing::info;

use super::checkpoints;
use super::document::{FusedRecord, GroupKept};

/// Fuses the members `keys` of run `run_id` with every method of `plan`;
/// the error says which member or method failed and why. Members are read
/// into f32 (one file or sharded, f32, bf16 or f16; they must agree), fused
/// in f32, and the fused models stored in the members' dtype unless the
/// plan names another.
pub async fn fuse_members(
    storage: &Storage,
    run_id: &str,
    keys: &[String],
    plan: &Plan,
) -> Result<Vec<FusedRecord>, String> {
    let mut members = Vec::with_capacity(keys.len());
    for key in keys {
        members.push(checkpoints::fetch(storage, key).await?);
    }
    info!(
        members = members.len(),
        methods = plan.methods.len(),
        "fusing"
    );
    let methods = plan.methods.clone();
    let arch = plan.arch.clone();
    let fused_precision = plan.fused_precision;
    let lineage_members = keys.to_vec();
    let fused = tokio::task::spawn_blocking(move || -> Result<Vec<_>, String> {
        let loaded = members
            .into_iter()
            .map(checkpoints::Fetched::load)
            .collect::<fusion::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        let stored: Vec<(&str, Precision)> = lineage_members
            .iter()
            .zip(&loaded)
            .map(|(key, l)| (key.as_str(), l.precision))
            .collect();
        let members_precision = checkpoint::common_precision(&stored).map_err(|e| e.to_string())?;
        let precision = fused_precision.unwrap_or(members_precision);
        let states: Vec<_> = loaded.into_iter().map(|l| l.state).collect();
        let refs: Vec<_> = states.iter().collect();
        let mut out = Vec::new();
        for method in methods {
            let (fused, peak_bytes) = fusion::heap::measure_peak(|| {
                nt_runtime::fuse(method, &arch, &refs, &nt_runtime::FuseOptions::default())
            });
            let mut fused = fused.map_err(|e| format!("{method}: {e}"))?;
            let mut lineage = fused.state.lineage().unwrap_or_default();
            lineage.members = lineage_members.clone();
            lineage
                .metrics
                .insert("fusion_seconds".into(), fused.report.seconds);
            fused.state.set_lineage(&lineage);
            let bytes =
                checkpoint::to_bytes_as(&fused.state, precision).map_err(|e| e.to_string())?;
            let record = FusedRecord {
                method,
                key: String::new(),
                seconds: fused.report.seconds,
                peak_bytes: peak_bytes.unwrap_or(0),
                parameters: fused.report.parameters as u64,
                groups: fused
                    .report
                    .groups
                    .iter()
                    .map(|g| GroupKept {
                        layers: g.layers.clone(),
                        width: g.width as u32,
                        per_member: g.kept_per_member.iter().map(|&k| k as u32).collect(),
                    })
                    .collect(),
            };
            out.push((record, bytes));
        }
        Ok(out)
    })
    .await
    .map_err(|e| format!("the fusion thread failed: {e}"))??;
    let start = Instant::now();
    let mut records = Vec::new();
    for (mut record, bytes) in fused {
        let key = layout::fused(run_id, record.method.as_str());
        storage
            .put(&key, Bytes::from(bytes))
            .await
            .map_err(|e| format!("storing `{key}`: {e}"))?;
        record.key = key;
        records.push(record);
    }
    info!(store_seconds = start.elapsed().as_secs_f64(), "fused");
    Ok(records)
}
