//! How verbs print (text for people, JSON for scripts) and how they exit.

use nt_runtime::data::LoadReport;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Prints a value as one JSON document on stdout.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// An ending with a specific exit code: 2 when the run failed or was
/// cancelled, 3 when it missed a quality gate, 130 when Ctrl-C stopped it
/// (other errors exit 1).
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

impl Exit {
    pub fn run_failed(message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Exit {
            code: 2,
            message: message.into(),
        })
    }

    /// Stopped by Ctrl-C: the shell's code for SIGINT.
    pub fn interrupted(message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Exit {
            code: 130,
            message: message.into(),
        })
    }

    pub fn gate(message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Exit {
            code: 3,
            message: message.into(),
        })
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// One line saying how a data set was loaded.
pub fn describe_load(l: &LoadReport) -> String {
    let how = match (l.cache_hit, l.cache_key.is_empty()) {
        (true, _) => format!("read from the decoded cache {}", l.cache_key),
        (false, false) => format!("decoded; cached as {}", l.cache_key),
        (false, true) => "read (no cache)".to_string(),
    };
    let skipped = match l.skipped.len() {
        0 => String::new(),
        n => format!(", {n} undecodable skipped"),
    };
    format!(
        "data: {} images from {} in {:.2} s, {how}{skipped}",
        l.images, l.source, l.seconds
    )
}
