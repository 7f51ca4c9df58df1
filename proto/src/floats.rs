//! Measured values (losses, accuracies, rates) in JSON that survive NaN and
//! infinity. serde_json writes a non-finite `f64` as `null` and cannot read
//! that back into an `f64`, so a diverged training run (loss NaN) would leave
//! a run document nobody can load. These fields write non-finite values as
//! the strings `"NaN"`, `"inf"` and `"-inf"` and read numbers, those strings,
//! or `null` (as NaN).

use serde::{Deserialize, Deserializer, Serializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum Lenient {
    Number(f64),
    Text(String),
    Null(()),
}

fn write<S: Serializer>(v: f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(v)
    } else if v.is_nan() {
        s.serialize_str("NaN")
    } else if v > 0.0 {
        s.serialize_str("inf")
    } else {
        s.serialize_str("-inf")
    }
}

fn read<E: serde::de::Error>(v: Lenient) -> Result<f64, E> {
    match v {
        Lenient::Number(x) => Ok(x),
        Lenient::Null(()) => Ok(f64::NAN),
        Lenient::Text(t) => match t.as_str() {
            "NaN" | "nan" => Ok(f64::NAN),
            "inf" | "Infinity" => Ok(f64::INFINITY),
            "-inf" | "-Infinity" => Ok(f64::NEG_INFINITY),
            other => Err(E::custom(format!("`{other}` is not a number"))),
        },
    }
}

pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    write(*v, s)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    read(Lenient::deserialize(d)?)
}

/// The same for `optional double` fields (`null` stays `None` there).
pub mod optional {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => write(*x, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match Option::<Lenient>::deserialize(d)? {
            None => Ok(None),
            Some(v) => read(v).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::v1 as pb;

    #[test]
    fn non_finite_measurements_round_trip() {
        let p = pb::TaskProgress {
            loss: f64::NAN,
            accuracy: 0.5,
            samples_per_second: f64::INFINITY,
            eval_accuracy: Some(f64::NAN),
            ..Default::default()
        };
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains(r#""loss":"NaN""#), "{json}");
        let back: pb::TaskProgress = serde_json::from_str(&json).unwrap();
        assert!(back.loss.is_nan() && back.eval_accuracy.unwrap().is_nan());
        assert_eq!(
            (back.accuracy, back.samples_per_second),
            (0.5, f64::INFINITY)
        );
        // What serde_json wrote for NaN before these fields existed.
        let old: pb::ModelReport =
            serde_json::from_str(r#"{"loss": null, "accuracy": 0.1}"#).unwrap();
        assert!(old.loss.is_nan());
        let none: pb::TaskProgress = serde_json::from_str(r#"{"eval_accuracy": null}"#).unwrap();
        assert_eq!(none.eval_accuracy, None);
        assert!(serde_json::from_str::<pb::ModelReport>(r#"{"loss": "lots"}"#).is_err());
    }
}
