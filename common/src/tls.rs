//! Optional TLS for the gRPC endpoints.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use nt_proto::tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Server TLS: a certificate and key turn TLS on.
#[derive(Args, Clone, Debug, Default)]
pub struct ServerTlsArgs {
    /// PEM certificate chain; with --tls-key, serve TLS.
    #[arg(long, env = "NT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long, env = "NT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// Makes ring the process's rustls crypto provider (once; later calls do
/// nothing). Two providers are linked (ring through tonic, aws-lc-rs through
/// reqwest), and a rustls server config built without a default panics.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl ServerTlsArgs {
    pub fn config(&self) -> Result<Option<ServerTlsConfig>> {
        match (&self.tls_cert, &self.tls_key) {
            (None, None) => Ok(None),
            (Some(c), Some(k)) => {
                install_crypto_provider();
                let cert = std::fs::read(c).with_context(|| format!("reading {}", c.display()))?;
                let key = std::fs::read(k).with_context(|| format!("reading {}", k.display()))?;
                Ok(Some(
                    ServerTlsConfig::new().identity(Identity::from_pem(cert, key)),
                ))
            }
            _ => anyhow::bail!("TLS needs both --tls-cert and --tls-key"),
        }
    }
}

/// Client TLS: used for `https://` endpoints.
#[derive(Args, Clone, Debug, Default)]
pub struct ClientTlsArgs {
    /// PEM CA certificate to trust (default: the system's roots).
    #[arg(long, env = "NT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Server name to verify (default: the endpoint's host).
    #[arg(long, env = "NT_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

impl ClientTlsArgs {
    pub fn config(&self) -> Result<ClientTlsConfig> {
        install_crypto_provider();
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &self.tls_ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let Some(d) = &self.tls_domain {
            tls = tls.domain_name(d.clone());
        }
        Ok(tls)
    }
}
