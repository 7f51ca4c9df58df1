//! Stored run documents: the current format is the proto3 JSON of
//! `nt.store.v1.RunDocument`, and documents that earlier coordinators
//! wrote still load with every value. The fixtures are real: a small
//! synthetic run that succeeded and one whose members diverged to NaN, run
//! with `ntctl run --local` by the coordinator that wrote format 3 (its
//! documents as stored, and what it answered to GetRun for them), and the
//! succeeded run in format 2 (assembled from the same run in that format's
//! layout, and read by that coordinator as the same run).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nt_common::{layout, Storage};
use nt_proto::v1 as pb;
use nt_spec::TaskWork;
use tokio_util::sync::CancellationToken;

use crate::coordinator::document::{RunState, TaskState, FORMAT};
use crate::coordinator::upgrade::read;
use crate::coordinator::{Coordinator, CoordinatorConfig, RunApi};
use crate::metrics::Metrics;

const FORMAT_2: &str = include_str!("fixtures/run-format-2.json");
const FORMAT_3: &str = include_str!("fixtures/run-format-3-succeeded.json");
const FORMAT_3_GET: &str = include_str!("fixtures/run-format-3-succeeded.get.json");
const FORMAT_3_NAN: &str = include_str!("fixtures/run-format-3-failed.json");
const FORMAT_3_NAN_GET: &str = include_str!("fixtures/run-format-3-failed.get.json");

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

/// Equal, but for numbers within a few ULPs: the coordinator that wrote
/// the fixtures read its documents back with serde_json's default float
/// parser, which may land an ULP off, so its GetRun answers (and the format 2
/// fixture made from them) differ there from the documents, which this one
/// reads exactly.
fn assert_close(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs()),
                "{at}: {x} != {y}"
            );
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                assert_close(x, y, &format!("{at}[{i}]"));
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{at}"
            );
            for (k, v) in x {
                assert_close(v, &y[k], &format!("{at}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

/// What the format 3 coordinator answered to GetRun, in its spelling.
fn old_get(text: &str) -> pb::Run {
    let mut v = json(text);
    nt_proto::legacy::respell(&mut v, "nt.v1.Run").unwrap();
    serde_json::from_value(v).unwrap()
}

#[test]
fn a_format_3_document_loads_with_every_value() {
    let old = json(FORMAT_3);
    let doc = read(FORMAT_3.as_bytes()).unwrap();
    assert_eq!(doc.format, FORMAT);
    assert_eq!(doc.run_id, old["run_id"].as_str().unwrap());
    assert_eq!(doc.state, RunState::Succeeded);
    assert_eq!((doc.revision, doc.epoch, doc.event_sequence), (27, 1, 39));
    assert_eq!(doc.writer, old["writer"].as_str().unwrap());
    assert_eq!(doc.finished_ms, old["finished_ms"].as_i64());
    assert_eq!(doc.spec.0.name, "fixture-synthetic");
    assert_eq!(doc.member_keys.len(), 2);
    let works: Vec<String> = doc.tasks.iter().map(|t| t.work.local_name()).collect();
    assert_eq!(
        works,
        [
            "member-0",
            "member-1",
            "fine-tune-nt",
            "fine-tune-nt-distilled",
            "fine-tune-average",
            "fine-tune-average-distilled",
            "baseline",
            "evaluate"
        ]
    );
    assert!(doc.tasks.iter().all(|t| t.state == TaskState::Succeeded));
    let t = &doc.tasks[0];
    let o = &old["tasks"][0];
    let p = t.progress.as_ref().unwrap();
    assert_eq!(p.loss, o["progress"]["loss"].as_f64().unwrap());
    assert_eq!(p.eval_accuracy, o["progress"]["eval_accuracy"].as_f64());
    assert_eq!(t.curve.len(), 2);
    assert_eq!(
        t.curve[0].eval_loss,
        o["curve"][0]["eval_loss"].as_f64().unwrap()
    );
    assert_eq!(t.resume.as_deref(), o["resume"].as_str());
    assert_eq!(t.compute_seconds, o["compute_seconds"].as_f64().unwrap());
    let evaluations = &doc.tasks[7].outcome.as_ref().unwrap().evaluations;
    assert_eq!(evaluations[0].parameters, 416);
    assert_eq!(
        doc.fused
            .iter()
            .map(|f| f.method.as_str())
            .collect::<Vec<_>>(),
        ["nt", "average"]
    );
    assert_eq!(doc.fused[0].groups[0].per_member, [9, 7]);
    assert_eq!(doc.fused[0].peak_bytes, 6727);
}

#[test]
fn a_format_3_document_keeps_its_nans_and_infinities() {
    let doc = read(FORMAT_3_NAN.as_bytes()).unwrap();
    assert_eq!(doc.state, RunState::Failed);
    assert!(
        doc.message.contains("non-finite weights"),
        "{}",
        doc.message
    );
    for t in &doc.tasks {
        assert!(t.progress.as_ref().unwrap().loss.is_nan());
        assert!(t.curve.iter().all(|c| c.train_loss.is_nan()));
        assert!(t.resume.is_some());
    }
    // Format 3 wrote infinities as "inf" and "-inf".
    let mut old = json(FORMAT_3_NAN);
    old["tasks"][0]["curve"][0]["train_loss"] = "inf".into();
    old["tasks"][0]["curve"][0]["eval_loss"] = "-inf".into();
    let doc = read(&serde_json::to_vec(&old).unwrap()).unwrap();
    let c = &doc.tasks[0].curve[0];
    assert_eq!(
        (c.train_loss, c.eval_loss),
        (f64::INFINITY, f64::NEG_INFINITY)
    );
}

#[test]
fn a_format_2_document_loads_as_the_same_run() {
    let two = read(FORMAT_2.as_bytes()).unwrap();
    let three = read(FORMAT_3.as_bytes()).unwrap();
    assert_eq!(two.format, FORMAT);
    assert_eq!(
        (&two.run_id, two.state, &two.spec, &two.member_keys),
        (&three.run_id, three.state, &three.spec, &three.member_keys)
    );
    let (a, b) = (json_of(&two), json_of(&three));
    assert_close(&a["tasks"], &b["tasks"], "tasks");
    for (a, b) in two.fused.iter().zip(&three.fused) {
        // Format 2 did not measure the fusion's peak memory.
        assert_eq!(
            (a.method, &a.key, a.parameters, &a.groups, a.peak_bytes),
            (b.method, &b.key, b.parameters, &b.groups, 0)
        );
    }
}

fn json_of(doc: &crate::coordinator::document::RunDocument) -> serde_json::Value {
    serde_json::from_slice(&doc.to_json().unwrap()).unwrap()
}

/// The document as stored now: proto3 JSON, and read back the same.
#[test]
fn the_current_format_is_proto3_json_and_round_trips() {
    let doc = read(FORMAT_3.as_bytes()).unwrap();
    let bytes = doc.to_json().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["format"], FORMAT);
    assert_eq!(v["state"], "RUN_STATE_SUCCEEDED");
    assert_eq!(v["runId"], doc.run_id.as_str());
    assert_eq!(v["revision"], "27");
    assert_eq!(v["tasks"][0]["state"], "TASK_STATE_SUCCEEDED");
    assert_eq!(v["tasks"][0]["work"], serde_json::json!({"train": {}}));
    assert_eq!(
        v["tasks"][1]["work"],
        serde_json::json!({"train": {"member": 1}})
    );
    assert_eq!(
        v["tasks"][3]["work"],
        serde_json::json!({"fineTune": {"method": "nt", "distilled": true}})
    );
    assert_eq!(v["tasks"][6]["work"], serde_json::json!({"baseline": {}}));
    // The spec as the client sent it, protobuf in base64, as format 3 had it.
    assert_eq!(v["spec"], json(FORMAT_3)["spec"]);
    assert_eq!(read(&bytes).unwrap(), doc);

    let diverged = read(FORMAT_3_NAN.as_bytes()).unwrap();
    let bytes = diverged.to_json().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["tasks"][0]["progress"]["loss"], "NaN");
    assert_eq!(v["tasks"][0]["curve"][0]["trainLoss"], "NaN");
    // NaN != NaN: compare what it writes again.
    assert_eq!(read(&bytes).unwrap().to_json().unwrap(), bytes);
    assert!(matches!(
        read(&bytes).unwrap().tasks[0].work,
        TaskWork::Train { member: 0 }
    ));
}

#[test]
fn a_current_document_with_a_bad_value_is_an_error_naming_it() {
    let doc = read(FORMAT_3.as_bytes()).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&doc.to_json().unwrap()).unwrap();
    v["tasks"][2]["work"]["fineTune"]["method"] = "blend".into();
    let e = read(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(e.contains("blend"), "{e}");
    v["state"] = "RUN_STATE_SLEEPING".into();
    let e = read(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(e.contains("RUN_STATE_SLEEPING"), "{e}");
}

async fn coordinator_on(docs: &[&str]) -> (Arc<Coordinator>, Storage) {
    let storage = Storage::open(&nt_common::storage::StorageArgs {
        url: "memory://".into(),
        ..nt_common::storage::StorageArgs::local(std::path::Path::new("."))
    })
    .unwrap();
    for text in docs {
        let v = json(text);
        let run_id = v["run_id"]
            .as_str()
            .or(v["run"]["run_id"].as_str())
            .unwrap();
        storage
            .put(&layout::run_doc(run_id), Bytes::from(text.to_string()))
            .await
            .unwrap();
    }
    let config = CoordinatorConfig {
        sweep_interval: Duration::from_secs(3600),
        ..CoordinatorConfig::default()
    };
    let c = Coordinator::start(
        storage.clone(),
        config,
        Metrics::new(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    (c, storage)
}

/// A coordinator started on a store of old documents serves their runs as
/// the coordinator that wrote them did (but for its ULPs, see
/// [`assert_close`]).
#[tokio::test]
async fn old_documents_are_served_as_before() {
    let (c, _) = coordinator_on(&[FORMAT_3, FORMAT_3_NAN]).await;
    for (doc, got) in [(FORMAT_3, FORMAT_3_GET), (FORMAT_3_NAN, FORMAT_3_NAN_GET)] {
        let run_id = json(doc)["run_id"].as_str().unwrap().to_string();
        let run = serde_json::to_value(c.get(&run_id).await.unwrap()).unwrap();
        let want = serde_json::to_value(old_get(got)).unwrap();
        assert_close(&run, &want, &run_id);
    }
    let (c, _) = coordinator_on(&[FORMAT_2]).await;
    let run = c
        .get(json(FORMAT_2)["run"]["run_id"].as_str().unwrap())
        .await
        .unwrap();
    let mut want = old_get(FORMAT_3_GET);
    // Format 2 did not measure the fusion's peak memory.
    for f in &mut want.report.as_mut().unwrap().fused {
        f.fusion_peak_bytes = 0;
    }
    let want = serde_json::to_value(&want).unwrap();
    assert_close(&serde_json::to_value(&run).unwrap(), &want, "format 2");
}
