//! The fuzz targets. Each reads bytes as its untrusted input would arrive,
//! runs the code that must refuse bad input, and checks what it may assert
//! without a model of the right answer: no panic, a clear error, and the
//! agreements between two readers of the same input (a checkpoint header
//! accepted at submission loads at fusion; an architecture survives its own
//! JSON round trip).

use fusion::arch::{preset, ArchSpec, Architecture};
use fusion::checkpoint;
use nt_proto::prost::Message;
use nt_proto::v1 as pb;
use nt_spec::{DataSpec, Limits, Plan, RunSpecFile, SyntheticSpec};

/// The longest error a target may return: longer ones echo their input
/// (a gRPC status message travels in a header; a terminal shows it whole).
pub const MAX_ERROR_BYTES: usize = 1024;

/// The checkpoint target reads files as this architecture (a file's `nt.arch`
/// metadata is checked against it).
const GOLDEN_MLP: &str = include_str!("../../examples/arch/golden-mlp.json");

/// What a target did with an input: accepted it or refused it, and a short
/// signature of the path it took (the error with numbers and quoted names
/// blanked), which the driver uses as a cheap proxy for coverage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub accepted: bool,
    pub signature: String,
}

impl Outcome {
    fn accepted(stage: &str) -> Self {
        Outcome {
            accepted: true,
            signature: format!("{stage}: ok"),
        }
    }

    /// A refusal; panics when the message is not a clear one.
    fn refused(stage: &str, message: &str) -> Self {
        assert!(
            !message.trim().is_empty(),
            "{stage}: an empty error message"
        );
        assert!(
            message.len() <= MAX_ERROR_BYTES,
            "{stage}: an error of {} bytes, over {MAX_ERROR_BYTES} (does it echo its input?): {}",
            message.len(),
            clip(message, 300)
        );
        Outcome {
            accepted: false,
            signature: format!("{stage}: {}", normalize(message)),
        }
    }

    fn then(self, next: Outcome) -> Outcome {
        Outcome {
            accepted: next.accepted,
            signature: format!("{} | {}", self.signature, next.signature),
        }
    }
}

/// The fuzz targets, by their corpus folder names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A safetensors checkpoint: header length, header JSON and `nt.arch`
    /// metadata as submission checks them, then the whole file as loaded.
    Checkpoint,
    /// A run spec file (YAML) through to a validated plan within the limits.
    RunSpec,
    /// An architecture: a preset string (`mlp:hidden=200,depth=2`) or an
    /// `nt.arch/v1` JSON spec; also the `--data` short forms.
    ArchSpec,
    /// An encoded `SubmitRunRequest`, validated as the coordinator does.
    Request,
}

impl Target {
    pub const ALL: [Target; 4] = [
        Target::Checkpoint,
        Target::RunSpec,
        Target::ArchSpec,
        Target::Request,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Checkpoint => "checkpoint",
            Target::RunSpec => "run_spec",
            Target::ArchSpec => "arch_spec",
            Target::Request => "request",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether the input is text, so that token-level mutations apply.
    pub fn is_text(self) -> bool {
        matches!(self, Target::RunSpec | Target::ArchSpec)
    }

    pub fn run(self, data: &[u8]) -> Outcome {
        match self {
            Target::Checkpoint => checkpoint_target(data),
            Target::RunSpec => run_spec_target(data),
            Target::ArchSpec => arch_spec_target(data),
            Target::Request => request_target(data),
        }
    }
}

fn checkpoint_target(data: &[u8]) -> Outcome {
    let name = "fuzz.safetensors";
    let file_len = data.len() as u64;
    let n = match checkpoint::header_len(name, data, file_len) {
        Ok(n) => n,
        Err(e) => return Outcome::refused("header_len", &e.to_string()),
    };
    let header = usize::try_from(n)
        .ok()
        .and_then(|n| data.get(8..8 + n))
        .unwrap_or_else(|| panic!("header_len accepted {n} for a file of {file_len} bytes"));
    let arch =
        Architecture::from_json(GOLDEN_MLP).unwrap_or_else(|e| panic!("golden-mlp.json: {e}"));
    let submitted = match checkpoint::validate_header(name, header, file_len, &arch) {
        Ok(()) => Outcome::accepted("validate_header"),
        Err(e) => Outcome::refused("validate_header", &e.to_string()),
    };
    let loaded = match checkpoint::load_bytes(name, data.to_vec()) {
        Ok(state) => {
            if let Some(Err(e)) = state.arch() {
                Outcome::refused("arch metadata", &e.to_string());
            }
            let _ = (state.lineage(), state.input());
            match checkpoint::validate(&state, &arch, name) {
                Ok(()) => Outcome::accepted("load"),
                Err(e) => Outcome::refused("validate", &e.to_string()),
            }
        }
        Err(e) => Outcome::refused("load", &e.to_string()),
    };
    // A header accepted at submission must load and validate at fusion.
    assert!(
        !submitted.accepted || loaded.accepted,
        "validate_header accepted a checkpoint that loading refuses: {}",
        loaded.signature
    );
    submitted.then(loaded)
}

fn run_spec_target(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Outcome::refused("utf-8", "not UTF-8");
    };
    let file = match RunSpecFile::from_yaml(text) {
        Ok(file) => file,
        Err(e) => return Outcome::refused("yaml", &e.to_string()),
    };
    if let nt_spec::file::ArchitectureFile::File(_) = file.architecture {
        // Read from the client's disk; not a parser.
        return Outcome::accepted("yaml (architecture file)");
    }
    match file.to_proto(std::path::Path::new("/nonexistent")) {
        Ok(spec) => Outcome::accepted("yaml").then(validate_request(&spec)),
        Err(e) => Outcome::refused("to_proto", &e.to_string()),
    }
}

fn arch_spec_target(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Outcome::refused("utf-8", "not UTF-8");
    };
    // The `--data` short forms share the preset strings' `key=value` syntax.
    let data_outcome = match DataSpec::parse_short(text) {
        Ok(_) => Outcome::accepted("data"),
        Err(e) => Outcome::refused("data", &e.to_string()),
    };
    if let Err(e) = SyntheticSpec::parse(text).and_then(|s| s.validate()) {
        Outcome::refused("synthetic", &e.to_string());
    }
    let spec = if text.trim_start().starts_with('{') {
        ArchSpec::from_json(text)
    } else {
        preset(text)
    };
    let arch = match spec.and_then(Architecture::new) {
        Ok(arch) => arch,
        Err(e) => return data_outcome.then(Outcome::refused("arch", &e.to_string())),
    };
    let again = ArchSpec::from_json(&arch.spec().to_json())
        .unwrap_or_else(|e| panic!("an accepted architecture does not read back: {e}"));
    assert_eq!(
        &again,
        arch.spec(),
        "an architecture changed in its JSON round trip"
    );
    let _ = arch.params();
    let coupled = match fusion::coupling::Coupling::derive(&arch) {
        Ok(_) => Outcome::accepted("coupling"),
        Err(e) => Outcome::refused("coupling", &e.to_string()),
    };
    data_outcome.then(coupled)
}

fn request_target(data: &[u8]) -> Outcome {
    match pb::SubmitRunRequest::decode(data) {
        Ok(request) => {
            Outcome::accepted("decode").then(validate_request(&request.spec.unwrap_or_default()))
        }
        Err(e) => Outcome::refused("decode", &e.to_string()),
    }
}

/// What the coordinator does with a submitted spec before storing it.
pub fn validate_request(spec: &pb::RunSpec) -> Outcome {
    let plan = match Plan::from_wire(spec, &key_of) {
        Ok(plan) => plan,
        Err(e) => return Outcome::refused("plan", &e.to_string()),
    };
    match Limits::default().check(&plan) {
        Ok(()) => Outcome::accepted("limits"),
        Err(e) => Outcome::refused("limits", &e.to_string()),
    }
}

/// Checkpoint references as a store would resolve them: under `uploads/`.
fn key_of(reference: &str) -> Result<String, String> {
    match reference.strip_prefix("uploads/") {
        Some(rest) if !rest.is_empty() && !rest.contains("..") => Ok(reference.to_string()),
        _ => Err("not under uploads/".to_string()),
    }
}

/// An error with its numbers, quoted names and option values blanked, at most 60 bytes.
pub fn normalize(message: &str) -> String {
    let mut out = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in message.chars() {
        match (quote, c) {
            (Some(_), _) if escaped => escaped = false,
            (Some(_), '\\') => escaped = true,
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '`' | '"') => {
                quote = Some(c);
                out.push('…');
            }
            (None, '0'..='9') => {
                if !out.ends_with('#') {
                    out.push('#');
                }
            }
            (None, _) => out.push(c),
        }
    }
    // Words holding `=` echo an option and its value; keep the option's name.
    let words: Vec<&str> = out
        .split_whitespace()
        .map(|w| w.split_once('=').map_or(w, |(k, _)| k))
        .collect();
    clip(&words.join(" "), 60).to_string()
}

/// The longest prefix of `s` of at most `max` bytes, on a char boundary.
pub fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
