//! Where a run's objects live in the store (documented in the README):
//!
//! ```text
//! runs/<run>/run.json                                the run document (spec, state, tasks, report)
//! runs/<run>/report.json                             the final report
//! runs/<run>/members/<i>.safetensors                 accepted member checkpoints
//! runs/<run>/fused/<method>.safetensors              fused models, right after fusion
//! runs/<run>/fine-tuned/<method>.safetensors         fused models after fine-tuning
//! runs/<run>/fine-tuned/<method>-distilled.safetensors   ... after fine-tuning with distillation
//! runs/<run>/fine-tuned/baseline.safetensors         member 0 trained on (the comparison's baseline)
//! runs/<run>/tasks/<task>/attempt-<n>/epoch-<e>.state.safetensors   resumable epoch states
//! runs/<run>/tasks/<task>/attempt-<n>/model.safetensors             an attempt's final model
//! requests/<hex of the request id>.json              idempotency: request id -> run id
//! coordinator/lease.json                             the store lease: which coordinator writes
//! cache/data/<sha256>.safetensors                    decoded image folders, by source listing and transform
//! uploads/sha256/<sha256>.safetensors                checkpoints uploaded through the service, by content
//! ```

pub fn run_prefix(run: &str) -> String {
    format!("runs/{run}")
}

pub fn run_doc(run: &str) -> String {
    format!("runs/{run}/run.json")
}

pub fn report(run: &str) -> String {
    format!("runs/{run}/report.json")
}

pub fn member(run: &str, index: usize) -> String {
    format!("runs/{run}/members/{index}.safetensors")
}

pub fn fused(run: &str, method: &str) -> String {
    format!("runs/{run}/fused/{method}.safetensors")
}

pub fn fine_tuned(run: &str, method: &str) -> String {
    format!("runs/{run}/fine-tuned/{method}.safetensors")
}

pub fn fine_tuned_distilled(run: &str, method: &str) -> String {
    format!("runs/{run}/fine-tuned/{method}-distilled.safetensors")
}

pub fn baseline(run: &str) -> String {
    format!("runs/{run}/fine-tuned/baseline.safetensors")
}

/// The folder an attempt writes into (`task` is the task's local name).
pub fn attempt_prefix(run: &str, task: &str, attempt: u32) -> String {
    format!("runs/{run}/tasks/{task}/attempt-{attempt}")
}

pub fn epoch_state(prefix: &str, epoch: usize) -> String {
    format!("{prefix}/epoch-{epoch:04}.state.safetensors")
}

pub fn attempt_model(prefix: &str) -> String {
    format!("{prefix}/model.safetensors")
}

/// A decoded image folder; `digest` hashes its listing and transform.
pub fn data_cache(digest: &str) -> String {
    format!("cache/data/{digest}.safetensors")
}

/// A checkpoint uploaded through the service, named by the SHA-256 of its
/// bytes (64 lowercase hex digits): the same bytes always get the same key.
pub fn upload(sha256_hex: &str) -> String {
    format!("uploads/sha256/{sha256_hex}.safetensors")
}

/// The store lease: which coordinator may write to this store.
pub fn coordinator_lease() -> String {
    "coordinator/lease.json".into()
}

/// Request ids up to this many bytes name their record in hex, as they
/// always have; longer ones (up to the API's 256) by their SHA-256, so every
/// key stays short enough for any S3 server (SeaweedFS refuses object names
/// over 255 bytes).
const HEX_REQUEST_ID_BYTES: usize = 100;

/// The idempotency record of a client request id.
pub fn request(request_id: &str) -> String {
    let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    if request_id.len() <= HEX_REQUEST_ID_BYTES {
        format!("requests/{}.json", hex(request_id.as_bytes()))
    } else {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(request_id.as_bytes());
        format!("requests/sha256-{}.json", hex(&digest))
    }
}

/// A new run id: time-ordered (lexicographic order is creation order) and unique.
pub fn new_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(ms);
    h.write_u32(std::process::id());
    format!("run-{ms:012x}-{:08x}", h.finish() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_keys_stay_short_and_distinct_for_every_allowed_id() {
        assert_eq!(
            request("ab"),
            "requests/6162.json",
            "short ids keep their keys"
        );
        let long_a = "a".repeat(256);
        let mut long_b = long_a.clone();
        long_b.replace_range(255.., "b");
        let (ka, kb) = (request(&long_a), request(&long_b));
        assert_ne!(ka, kb);
        assert!(ka.len() < 100, "{ka}");
        assert!(request(&"x".repeat(100)).len() <= 215);
    }

    #[test]
    fn run_ids_sort_by_creation_and_request_keys_are_safe() {
        let a = new_run_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_run_id();
        assert!(a < b, "{a} {b}");
        assert_eq!(request("a/b"), "requests/612f62.json");
    }
}
