//! JSON that nt wrote before it used the proto3 mapping still reads: the
//! fixtures are what the previous ntctl printed for a real `ntctl run
//! --local` of a small synthetic spec (`get --output json` of a run that
//! succeeded and of one whose training diverged to NaN, its event lines) and
//! the `report.json` it stored. Each is read as the message it is, written
//! again in proto3 JSON, and read back to the same message.

#![allow(clippy::unwrap_used)]

use nt_proto::prost::Message;
use nt_proto::v1 as pb;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/legacy/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Reads old JSON as `M`, then checks that its proto3 JSON reads back to
/// the same message (compared encoded, since NaN != NaN).
fn read<M: Message + Default + Serialize + DeserializeOwned>(text: &str, message: &str) -> M {
    let mut value: serde_json::Value = serde_json::from_str(text).unwrap();
    nt_proto::legacy::respell(&mut value, message).unwrap();
    let m: M = serde_json::from_value(value).unwrap_or_else(|e| panic!("{message}: {e}"));
    let again: M = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(again.encode_to_vec(), m.encode_to_vec());
    m
}

#[test]
fn an_old_run_reads_with_every_value() {
    let text = fixture("get-succeeded.json");
    let old: serde_json::Value = serde_json::from_str(&text).unwrap();
    // Not readable as it is ("succeeded"): that is why `respell` exists.
    assert!(serde_json::from_str::<pb::Run>(&text).is_err());
    let run: pb::Run = read(&text, "nt.v1.Run");
    assert_eq!(run.run_id, old["run_id"].as_str().unwrap());
    assert_eq!(run.state(), pb::RunState::Succeeded);
    assert_eq!(
        run.created_unix_ms,
        old["created_unix_ms"].as_i64().unwrap()
    );
    let spec = run.spec.as_ref().unwrap();
    assert_eq!(
        spec.fusion().collect::<Vec<_>>(),
        [pb::FusionMethod::Nt, pb::FusionMethod::Average]
    );
    assert_eq!(spec.device(), pb::DeviceRequirement::Cpu);
    assert_eq!(spec.labels["purpose"], "fixture");
    assert_eq!(
        spec.architecture.as_ref().unwrap().kind,
        Some(pb::architecture::Kind::Preset(
            "mlp:input=1x4x4,hidden=16,depth=1".into()
        ))
    );
    assert_eq!(
        spec.data
            .as_ref()
            .unwrap()
            .synthetic
            .as_ref()
            .unwrap()
            .noise,
        Some(0.3)
    );
    assert_eq!(run.tasks.len(), 8);
    assert!(run
        .tasks
        .iter()
        .all(|t| t.state() == pb::TaskState::Succeeded));
    assert_eq!(run.tasks[2].kind(), pb::TaskKind::FineTune);
    let report = run.report.as_ref().unwrap();
    let fused: Vec<_> = report.fused.iter().map(|f| f.method()).collect();
    assert_eq!(fused, [pb::FusionMethod::Nt, pb::FusionMethod::Average]);
    for (m, o) in report
        .members
        .iter()
        .zip(old["report"]["members"].as_array().unwrap())
    {
        assert_eq!(m.accuracy, o["accuracy"].as_f64().unwrap());
        assert_eq!(m.parameters, o["parameters"].as_u64().unwrap());
    }
}

#[test]
fn an_old_diverged_run_keeps_its_nans() {
    let run: pb::Run = read(&fixture("get-failed.json"), "nt.v1.Run");
    assert_eq!(run.state(), pb::RunState::Failed);
    assert!(run.message.contains("non-finite"), "{}", run.message);
    let losses: Vec<f64> = run
        .tasks
        .iter()
        .filter_map(|t| t.progress.as_ref().map(|p| p.loss))
        .collect();
    assert!(
        !losses.is_empty() && losses.iter().all(|l| l.is_nan()),
        "{losses:?}"
    );
    // Written again: as proto3 JSON spells NaN.
    let json = serde_json::to_value(&run).unwrap();
    assert_eq!(json["tasks"][0]["progress"]["loss"], "NaN");
}

#[test]
fn an_old_report_and_old_events_read() {
    let report: pb::RunReport = read(&fixture("report.json"), "nt.v1.RunReport");
    assert_eq!(report.members.len(), 2);
    assert_eq!(report.fused.len(), 2);
    assert!(report.fused[0].after_distilled_fine_tuning.is_some());
    assert!(report.baseline.is_some());
    assert!(report.timings.as_ref().unwrap().wall_seconds > 0.0);
    let events: Vec<pb::RunEvent> = fixture("events.jsonl")
        .lines()
        .map(|l| read(l, "nt.v1.RunEvent"))
        .collect();
    assert!(events.len() > 10);
    assert!(events.windows(2).all(|w| w[0].sequence < w[1].sequence));
    let states: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::run_event::Event::StateChanged(s)) => Some(s.state()),
            _ => None,
        })
        .collect();
    assert_eq!(states.first(), Some(&pb::RunState::Queued));
    assert_eq!(states.last(), Some(&pb::RunState::Succeeded));
    assert!(events.iter().any(
        |e| matches!(&e.event, Some(pb::run_event::Event::TaskProgress(p)) if p.progress.is_some())
    ));
}
