//! ntctl's config file: `~/.config/nt/ntctl.yaml` (or `$NT_CONFIG`) with the
//! connection settings. Flags win over environment variables, which win
//! over the file.
//!
//! ```yaml
//! endpoint: https://nt.example.com:7070
//! token: s3cret
//! tls_ca: /etc/nt/ca.pem
//! tls_domain: nt.example.com
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub endpoint: Option<String>,
    pub token: Option<String>,
    pub tls_ca: Option<String>,
    pub tls_domain: Option<String>,
}

/// Where the config file is looked for.
pub fn path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NT_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("nt").join("ntctl.yaml"))
}

/// Reads the config file (if any) and exports its settings as the
/// environment variables the flags read, where those are not set already.
/// Call before parsing flags, while the process is single-threaded.
pub fn apply() -> Result<()> {
    let Some(path) = path() else { return Ok(()) };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && std::env::var_os("NT_CONFIG").is_none() =>
        {
            return Ok(())
        }
        Err(e) => {
            return Err(e).with_context(|| format!("reading the config file {}", path.display()))
        }
    };
    let file: ConfigFile =
        serde_yaml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
    for (var, value) in [
        ("NT_ENDPOINT", file.endpoint),
        ("NT_TOKEN", file.token),
        ("NT_TLS_CA", file.tls_ca),
        ("NT_TLS_DOMAIN", file.tls_domain),
    ] {
        if let Some(v) = value {
            if std::env::var_os(var).is_none() {
                // SAFETY: called at start-up, before any thread is spawned.
                unsafe { std::env::set_var(var, v) };
            }
        }
    }
    Ok(())
}
