/// A spec error: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    /// An error; a message longer than [`fusion::bounded`]'s bound is cut in
    /// the middle, so a refused input is never echoed whole.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            message: fusion::bounded(message.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use nt_proto::v1 as pb;

    use crate::{Plan, RunSpecFile, SyntheticSpec};

    /// Found by fuzzing: each of these echoed its whole input in the error.
    #[test]
    fn errors_do_not_echo_long_inputs() {
        let long = "k".repeat(100_000);
        let errors = [
            SyntheticSpec::parse(&long).unwrap_err().to_string(),
            RunSpecFile::from_yaml(&format!("{long}: 1\n"))
                .unwrap_err()
                .to_string(),
            Plan::from_wire(
                &pb::RunSpec {
                    architecture: Some(pb::Architecture {
                        kind: Some(pb::architecture::Kind::Preset(long.clone())),
                    }),
                    ..Default::default()
                },
                &|r| Ok(r.to_string()),
            )
            .unwrap_err()
            .to_string(),
        ];
        for e in errors {
            assert!(e.len() < 1024, "{} bytes: {}", e.len(), &e[..200]);
            assert!(e.contains("bytes cut"), "{e}");
        }
    }
}
