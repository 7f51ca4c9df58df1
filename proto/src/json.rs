//! The proto3 JSON mapping of nt's messages: the serde impls pbjson-build
//! generates for every `nt.v1` and `nt.store.v1` message (see `build.rs`),
//! so `serde_json::to_string(&run)` writes what protobuf's own parsers read
//! (`json_format.Parse` in Python, protojson in Go) and `serde_json::from_str`
//! reads what they write:
//!
//! * field names in lowerCamelCase (`runId`); the proto names (`run_id`) are
//!   accepted too;
//! * enums by their full names (`"RUN_STATE_SUCCEEDED"`); numbers accepted;
//! * 64-bit integers as strings (`"416"`); numbers accepted;
//! * non-finite floats as `"NaN"`, `"Infinity"`, `"-Infinity"`;
//! * bytes as base64;
//! * fields at their default value (0, "", false, empty, unset messages)
//!   left out, as `json_format.MessageToJson` does; `optional` fields that
//!   are set are written even at 0;
//! * unknown fields skipped when reading, as binary decoding does.
//!
//! One gap remains from pbjson: an enum field holding a number this build
//! does not know (a newer peer's value) cannot be written and fails to
//! serialize, where proto3 JSON would write the number.
//!
//! JSON that nt wrote before it used this mapping is read with
//! [`crate::legacy`].

use serde::ser::{Serialize, SerializeSeq, Serializer};

/// A float or double field as proto3 JSON writes it. pbjson leaves floats
/// to the serializer, which writes non-finite ones as `null`
/// (influxdata/pbjson#106); the build routes every float field through this.
#[doc(hidden)]
pub struct ProtoFloat<'a, T: ?Sized>(pub &'a T);

fn float<S: Serializer>(v: f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_nan() {
        s.serialize_str("NaN")
    } else if v == f64::INFINITY {
        s.serialize_str("Infinity")
    } else if v == f64::NEG_INFINITY {
        s.serialize_str("-Infinity")
    } else {
        s.serialize_f64(v)
    }
}

impl Serialize for ProtoFloat<'_, f64> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        float(*self.0, s)
    }
}

impl Serialize for ProtoFloat<'_, f32> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_finite() {
            s.serialize_f32(*self.0)
        } else {
            float(f64::from(*self.0), s)
        }
    }
}

impl<T> Serialize for ProtoFloat<'_, Vec<T>>
where
    for<'a> ProtoFloat<'a, T>: Serialize,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for x in self.0 {
            seq.serialize_element(&ProtoFloat(x))?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use crate::v1 as pb;

    /// The mapping, spelled out: what `json_format.MessageToJson` writes for
    /// the same message (with `preserving_proto_field_name=False`).
    #[test]
    fn a_run_is_written_as_proto3_json() {
        let run = pb::Run {
            run_id: "run-1".into(),
            state: pb::RunState::Succeeded as i32,
            created_unix_ms: 1_796_097_294_026,
            tasks: vec![pb::TaskStatus {
                kind: pb::TaskKind::FineTune as i32,
                attempt: 2,
                progress: Some(pb::TaskProgress {
                    loss: f64::NAN,
                    accuracy: 0.5,
                    samples_per_second: f64::INFINITY,
                    lr: f64::NEG_INFINITY,
                    eval_accuracy: Some(0.0),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            report: Some(pb::RunReport {
                members: vec![pb::ModelReport {
                    name: "member 0".into(),
                    accuracy: f64::NAN,
                    parameters: 416,
                    ..Default::default()
                }],
                fused: vec![pb::FusedReport {
                    method: pb::FusionMethod::NtIterative as i32,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            // Unset: `spec`, `message`, `updated_unix_ms`, `storage_prefix`, ...
            ..Default::default()
        };
        let want = r#"{"runId":"run-1","state":"RUN_STATE_SUCCEEDED","createdUnixMs":"1796097294026","tasks":[{"kind":"TASK_KIND_FINE_TUNE","attempt":2,"progress":{"loss":"NaN","accuracy":0.5,"samplesPerSecond":"Infinity","lr":"-Infinity","evalAccuracy":0.0}}],"report":{"members":[{"name":"member 0","accuracy":"NaN","parameters":"416"}],"fused":[{"method":"FUSION_METHOD_NT_ITERATIVE"}]}}"#;
        assert_eq!(serde_json::to_string(&run).unwrap(), want);
        let back: pb::Run = serde_json::from_str(want).unwrap();
        let progress = back.tasks[0].progress.as_ref().unwrap();
        assert!(progress.loss.is_nan());
        assert_eq!(
            (progress.samples_per_second, progress.lr),
            (f64::INFINITY, f64::NEG_INFINITY)
        );
        assert_eq!(progress.eval_accuracy, Some(0.0));
        assert_eq!(back.state(), pb::RunState::Succeeded);
        assert_eq!(back.created_unix_ms, 1_796_097_294_026);
        assert_eq!(back.report.as_ref().unwrap().members[0].parameters, 416);
        assert_eq!(back.spec, None);
    }

    /// serde_json's default float parser may land an ULP off; the workspace
    /// enables `float_roundtrip`, so a stored value reads back as measured.
    #[test]
    fn floats_read_back_exactly() {
        let loss = 3.510_295_152_664_184_6;
        let m = pb::ModelReport {
            loss,
            ..Default::default()
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(text, r#"{"loss":3.5102951526641846}"#);
        let back: pb::ModelReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back.loss.to_bits(), loss.to_bits());
    }

    #[test]
    fn proto_names_numbers_and_unknown_fields_are_read_too() {
        let run: pb::Run = serde_json::from_str(
            r#"{"run_id": "r", "state": 6, "created_unix_ms": 12, "future_field": [1]}"#,
        )
        .unwrap();
        assert_eq!(
            (run.run_id.as_str(), run.state(), run.created_unix_ms),
            ("r", pb::RunState::Succeeded, 12)
        );
        let e = serde_json::from_str::<pb::Run>(r#"{"state": "RUN_STATE_SLEEPING"}"#).unwrap_err();
        assert!(e.to_string().contains("RUN_STATE_SLEEPING"), "{e}");
    }

    #[test]
    fn oneofs_and_maps_follow_the_mapping() {
        let spec = pb::RunSpec {
            architecture: Some(pb::Architecture {
                kind: Some(pb::architecture::Kind::Preset("mlp".into())),
            }),
            fusion: vec![
                pb::FusionMethod::Nt as i32,
                pb::FusionMethod::Average as i32,
            ],
            labels: [("team".to_string(), "vision".to_string())].into(),
            data: Some(pb::DataSpec {
                train_subset: Some(0),
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "data": {"trainSubset": "0"},
                "architecture": {"preset": "mlp"},
                "fusion": ["FUSION_METHOD_NT", "FUSION_METHOD_AVERAGE"],
                "labels": {"team": "vision"},
            })
        );
        let back: pb::RunSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
    }
}
