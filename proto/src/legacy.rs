//! Reading JSON that nt wrote before it used the proto3 mapping
//! ([`crate::json`]): serde's derives with short enum names
//! (`"succeeded"`, `"nt-iterative"`, `"fine-tuning"`), non-finite floats as
//! `"inf"`/`"-inf"` (or `null` for NaN, before that), and oneofs as
//! `{"kind": {"Preset": "mlp"}}`. [`respell`] rewrites such a value into
//! proto3 JSON in place, led by the message's descriptor, so no field or
//! enum is listed by hand here either; JSON already in the proto3 spelling
//! passes through unchanged. Stored run documents of formats 1 to 3 and
//! `ntctl experiment`'s saved runs are read this way.

use std::collections::HashMap;
use std::sync::OnceLock;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use serde_json::{Map, Value};

struct Index {
    messages: HashMap<String, DescriptorProto>,
    enums: HashMap<String, EnumDescriptorProto>,
}

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut index = Index {
            messages: HashMap::new(),
            enums: HashMap::new(),
        };
        // Built by build.rs from the protos in this crate: they decode. The
        // store's set repeats the nt/v1 files it imports; the first wins.
        let files = [
            crate::v1::FILE_DESCRIPTOR_SET,
            crate::store::v1::FILE_DESCRIPTOR_SET,
        ]
        .into_iter()
        .flat_map(|set| FileDescriptorSet::decode(set).unwrap_or_default().file);
        for file in files {
            let scope = format!(".{}", file.package());
            for e in &file.enum_type {
                let name = format!("{scope}.{}", e.name());
                index.enums.entry(name).or_insert_with(|| e.clone());
            }
            for m in &file.message_type {
                add(&mut index, &scope, m);
            }
        }
        index
    })
}

fn add(index: &mut Index, scope: &str, m: &DescriptorProto) {
    let name = format!("{scope}.{}", m.name());
    for e in &m.enum_type {
        index
            .enums
            .insert(format!("{name}.{}", e.name()), e.clone());
    }
    for nested in &m.nested_type {
        add(index, &name, nested);
    }
    index.messages.entry(name).or_insert_with(|| m.clone());
}

/// Rewrites `value`, JSON of the message `message` (a full name such as
/// `nt.v1.Run`) in nt's former spelling, into proto3 JSON. What it does not
/// recognise it leaves for the parser to report.
pub fn respell(value: &mut Value, message: &str) -> Result<(), String> {
    let name = format!(".{}", message.trim_start_matches('.'));
    let m = index()
        .messages
        .get(&name)
        .ok_or_else(|| format!("no message {message} in nt's protos"))?;
    respell_message(value, m);
    Ok(())
}

fn respell_message(value: &mut Value, m: &DescriptorProto) {
    let Value::Object(map) = value else { return };
    unnest_oneofs(map, m);
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let Some(field) = m
            .field
            .iter()
            .find(|f| f.name() == key || f.json_name() == key)
        else {
            continue;
        };
        let optional = field.proto3_optional();
        let Some(v) = map.get_mut(&key) else { continue };
        if field.r#type() == Type::Double || field.r#type() == Type::Float {
            if v.is_null() && optional {
                // serde wrote an unset `optional double` as null: unset.
                map.remove(&key);
            } else {
                each(v, field, respell_float);
            }
            continue;
        }
        match field.r#type() {
            Type::Enum => {
                if let Some(e) = index().enums.get(field.type_name()) {
                    each(v, field, |v| respell_enum(v, e));
                }
            }
            Type::Message => respell_message_field(v, field),
            _ => {}
        }
    }
}

/// A repeated field's elements, or the value itself.
fn each(v: &mut Value, field: &FieldDescriptorProto, mut f: impl FnMut(&mut Value)) {
    match v {
        Value::Array(items) if field.label() == Label::Repeated => items.iter_mut().for_each(f),
        v => f(v),
    }
}

fn respell_message_field(v: &mut Value, field: &FieldDescriptorProto) {
    let Some(m) = index().messages.get(field.type_name()) else {
        return;
    };
    if m.options.as_ref().is_some_and(|o| o.map_entry()) {
        // A map: respell each value as the entry's `value` field.
        let Some(value_field) = m.field.iter().find(|f| f.name() == "value") else {
            return;
        };
        if let Value::Object(entries) = v {
            for entry in entries.values_mut() {
                match value_field.r#type() {
                    Type::Message => respell_message_field(entry, value_field),
                    Type::Enum => {
                        if let Some(e) = index().enums.get(value_field.type_name()) {
                            respell_enum(entry, e);
                        }
                    }
                    Type::Double | Type::Float => respell_float(entry),
                    _ => {}
                }
            }
        }
        return;
    }
    each(v, field, |v| respell_message(v, m));
}

/// serde's oneof, `{"kind": {"Preset": "mlp"}}` (or `"kind": null`), as
/// proto3 JSON has it: the set field itself, `{"preset": "mlp"}`.
fn unnest_oneofs(map: &mut Map<String, Value>, m: &DescriptorProto) {
    for (i, oneof) in m.oneof_decl.iter().enumerate() {
        let name = oneof.name();
        if m.field
            .iter()
            .any(|f| f.name() == name || f.json_name() == name)
        {
            continue;
        }
        match map.get(name) {
            Some(Value::Null) => {
                map.remove(name);
            }
            Some(Value::Object(inner)) if inner.len() == 1 => {
                let Some((variant, _)) = inner.iter().next() else {
                    continue;
                };
                let Some(field) = m
                    .field
                    .iter()
                    .find(|f| f.oneof_index == Some(i as i32) && upper_camel(f.name()) == *variant)
                else {
                    continue;
                };
                let field = field.name().to_string();
                if let Some(Value::Object(inner)) = map.remove(name) {
                    if let Some((_, v)) = inner.into_iter().next() {
                        map.insert(field, v);
                    }
                }
            }
            _ => {}
        }
    }
}

fn upper_camel(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// `"succeeded"` as `"RUN_STATE_SUCCEEDED"`: proto style prefixes every
/// value with the enum's name in upper snake case.
fn respell_enum(v: &mut Value, e: &EnumDescriptorProto) {
    let Value::String(s) = v else { return };
    if e.value.iter().any(|x| x.name() == s.as_str()) {
        return;
    }
    let mut prefix = String::new();
    for (i, c) in e.name().chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            prefix.push('_');
        }
        prefix.push(c.to_ascii_uppercase());
    }
    let full = format!("{prefix}_{}", s.to_uppercase().replace('-', "_"));
    if e.value.iter().any(|x| x.name() == full) {
        *s = full;
    }
}

/// `"inf"` as `"Infinity"`; `null`, which serde_json wrote for NaN before nt
/// spelled it, as `"NaN"`.
fn respell_float(v: &mut Value) {
    let text = match v {
        Value::Null => "NaN",
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "nan" => "NaN",
            "inf" | "+inf" | "infinity" => "Infinity",
            "-inf" | "-infinity" => "-Infinity",
            _ => return,
        },
        _ => return,
    };
    *v = Value::String(text.into());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1 as pb;

    fn respelled(mut v: Value, message: &str) -> Value {
        respell(&mut v, message).unwrap();
        v
    }

    #[test]
    fn the_former_spelling_becomes_proto3_json() {
        let old = serde_json::json!({
            "run_id": "r",
            "state": "fine-tuning",
            "spec": {
                "architecture": {"kind": {"Preset": "mlp"}},
                "fusion": ["nt-iterative", "FUSION_METHOD_AVERAGE", 1],
                "device": "gpu",
                "members": {"training": {"schedule": {"kind": {"MultiStep": {"milestones": [2], "gamma": 0.1}}}}},
                "labels": {"a": "b"},
            },
            "tasks": [{"kind": "fine-tune", "state": "running",
                       "progress": {"loss": null, "lr": "inf", "accuracy": "-inf", "eval_accuracy": null}}],
        });
        let run: pb::Run = serde_json::from_value(respelled(old, "nt.v1.Run")).unwrap();
        assert_eq!(run.state(), pb::RunState::FineTuning);
        let spec = run.spec.as_ref().unwrap();
        assert_eq!(
            spec.fusion().collect::<Vec<_>>(),
            [
                pb::FusionMethod::NtIterative,
                pb::FusionMethod::Average,
                pb::FusionMethod::Nt
            ]
        );
        assert_eq!(spec.device(), pb::DeviceRequirement::Gpu);
        assert_eq!(
            spec.architecture.as_ref().unwrap().kind,
            Some(pb::architecture::Kind::Preset("mlp".into()))
        );
        let schedule = spec.members.as_ref().unwrap().training.as_ref().unwrap();
        assert!(matches!(
            schedule.schedule.as_ref().unwrap().kind,
            Some(pb::schedule::Kind::MultiStep(_))
        ));
        let t = &run.tasks[0];
        assert_eq!(
            (t.kind(), t.state()),
            (pb::TaskKind::FineTune, pb::TaskState::Running)
        );
        let p = t.progress.as_ref().unwrap();
        assert!(p.loss.is_nan());
        assert_eq!((p.lr, p.accuracy), (f64::INFINITY, f64::NEG_INFINITY));
        assert_eq!(p.eval_accuracy, None);
    }

    #[test]
    fn proto3_json_passes_through_unchanged() {
        let run = pb::Run {
            state: pb::RunState::Succeeded as i32,
            spec: Some(pb::RunSpec {
                architecture: Some(pb::Architecture {
                    kind: Some(pb::architecture::Kind::SpecJson("{}".into())),
                }),
                ..Default::default()
            }),
            tasks: vec![pb::TaskStatus {
                progress: Some(pb::TaskProgress {
                    loss: f64::NAN,
                    eval_accuracy: Some(1.0),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = serde_json::to_value(&run).unwrap();
        assert_eq!(respelled(json.clone(), "nt.v1.Run"), json);
        let events = serde_json::json!({"event": {"StateChanged": {"state": "succeeded"}}});
        assert_eq!(
            respelled(events, "nt.v1.RunEvent"),
            serde_json::json!({"state_changed": {"state": "RUN_STATE_SUCCEEDED"}})
        );
        assert!(respell(&mut Value::Null, "nt.v1.Nothing").is_err());
    }
}
