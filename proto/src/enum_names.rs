//! Enum fields in JSON by short name (`"succeeded"` for `RUN_STATE_SUCCEEDED`,
//! `"nt-iterative"` for `FUSION_METHOD_NT_ITERATIVE`: the value name without
//! the enum's prefix, lowercase, with hyphens), as ntctl prints them and run
//! specs spell them, instead of prost's bare numbers. Reading accepts the
//! short name, the full proto name or the number, so documents written with
//! numbers still load; an unknown number is kept as a number.

use serde::{Deserialize, Deserializer, Serializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum NameOrNumber {
    Number(i32),
    Name(String),
}

fn short(full: &str, prefix: &str) -> String {
    full.trim_start_matches(prefix)
        .to_lowercase()
        .replace('_', "-")
}

fn full(name: &str, prefix: &str) -> String {
    if name.starts_with(prefix) {
        name.to_string()
    } else {
        format!("{prefix}{}", name.to_uppercase().replace('-', "_"))
    }
}

fn read<E: serde::de::Error>(
    v: NameOrNumber,
    from_name: fn(&str) -> Option<i32>,
    what: &str,
) -> Result<i32, E> {
    match v {
        NameOrNumber::Number(n) => Ok(n),
        NameOrNumber::Name(s) => {
            from_name(&s).ok_or_else(|| E::custom(format!("unknown {what} `{s}`")))
        }
    }
}

macro_rules! enum_names {
    ($($module:ident: $ty:ident = $prefix:literal),* $(,)?) => {$(
        /// Serde for one enum field (and `list` for a repeated one).
        pub mod $module {
            use super::*;
            use crate::v1::$ty;

            /// The short name of `v`, if it is a known value.
            pub fn name(v: i32) -> Option<String> {
                $ty::try_from(v).ok().map(|e| short(e.as_str_name(), $prefix))
            }

            fn from_name(s: &str) -> Option<i32> {
                $ty::from_str_name(&full(s, $prefix)).map(|e| e as i32)
            }

            pub fn serialize<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
                match name(*v) {
                    Some(n) => s.serialize_str(&n),
                    None => s.serialize_i32(*v),
                }
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
                read(NameOrNumber::deserialize(d)?, from_name, stringify!($ty))
            }

            pub mod list {
                use super::*;
                use serde::ser::SerializeSeq;

                pub fn serialize<S: Serializer>(v: &[i32], s: S) -> Result<S::Ok, S::Error> {
                    let mut seq = s.serialize_seq(Some(v.len()))?;
                    for &x in v {
                        match name(x) {
                            Some(n) => seq.serialize_element(&n)?,
                            None => seq.serialize_element(&x)?,
                        }
                    }
                    seq.end()
                }

                pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i32>, D::Error> {
                    Vec::<NameOrNumber>::deserialize(d)?
                        .into_iter()
                        .map(|v| read(v, from_name, stringify!($ty)))
                        .collect()
                }
            }
        }
    )*};
}

enum_names!(
    run_state: RunState = "RUN_STATE_",
    task_kind: TaskKind = "TASK_KIND_",
    task_state: TaskState = "TASK_STATE_",
    fusion_method: FusionMethod = "FUSION_METHOD_",
    device_requirement: DeviceRequirement = "DEVICE_REQUIREMENT_",
    task_directive: TaskDirective = "TASK_DIRECTIVE_",
);

#[cfg(test)]
mod tests {
    use crate::v1 as pb;

    #[test]
    fn enums_are_written_by_name_and_read_either_way() {
        let run = pb::Run {
            state: pb::RunState::Succeeded as i32,
            ..Default::default()
        };
        let json = serde_json::to_value(&run).unwrap();
        assert_eq!(json["state"], "succeeded");
        let back: pb::Run = serde_json::from_value(json).unwrap();
        assert_eq!(back.state(), pb::RunState::Succeeded);
        // Documents written before, with numbers, still load.
        let old: pb::Run = serde_json::from_str(r#"{"state": 6}"#).unwrap();
        assert_eq!(old.state(), pb::RunState::Succeeded);
        let spec: pb::RunSpec =
            serde_json::from_str(r#"{"fusion": ["FUSION_METHOD_AVERAGE", "nt-iterative", 1]}"#)
                .unwrap();
        assert_eq!(
            spec.fusion().collect::<Vec<_>>(),
            [
                pb::FusionMethod::Average,
                pb::FusionMethod::NtIterative,
                pb::FusionMethod::Nt
            ]
        );
        assert_eq!(
            serde_json::to_value(&spec).unwrap()["fusion"],
            serde_json::json!(["average", "nt-iterative", "nt"])
        );
        let status = pb::TaskStatus {
            state: pb::TaskState::Running as i32,
            kind: 99,
            ..Default::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            (json["state"].as_str(), json["kind"].as_i64()),
            (Some("running"), Some(99))
        );
        let e = serde_json::from_str::<pb::Run>(r#"{"state": "RUN_STATE_SLEEPING"}"#).unwrap_err();
        assert!(e.to_string().contains("RUN_STATE_SLEEPING"), "{e}");
    }
}
