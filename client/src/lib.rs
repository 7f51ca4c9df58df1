//! The Rust client of nt: connect to a coordinator and call its run
//! service, and move checkpoints through it ([`transfer`]). `ntctl` is
//! built on it; other programs can use it the same way.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let mut client = nt_client::connect(&nt_client::ConnectArgs::default()).await?;
//! let runs = client.list_runs(nt_client::pb::ListRunsRequest::default()).await?;
//! println!("{} runs", runs.into_inner().runs.len());
//! # Ok(()) }
//! ```

pub mod config;
pub mod experiment;
pub mod follow;
pub mod report;
pub mod specfile;
pub mod transfer;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use nt_common::auth::BearerToken;
use nt_common::tls::ClientTlsArgs;
use nt_proto::tonic::codegen::InterceptedService;
use nt_proto::tonic::transport::{Channel, Endpoint};

pub use nt_proto::v1 as pb;

/// A run-service client that sends the bearer token with every call.
pub type RunClient =
    pb::run_service_client::RunServiceClient<InterceptedService<Channel, BearerToken>>;

/// Where the coordinator is and how to talk to it. Flags, environment
/// variables, or the config file (`~/.config/nt/ntctl.yaml`) set these.
#[derive(Args, Clone, Debug)]
pub struct ConnectArgs {
    /// The coordinator's gRPC address (https:// for TLS).
    #[arg(
        long,
        global = true,
        env = "NT_ENDPOINT",
        default_value = "http://127.0.0.1:7070"
    )]
    pub endpoint: String,
    /// Bearer token of the run service.
    #[arg(
        long,
        global = true,
        env = "NT_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub token: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

impl Default for ConnectArgs {
    fn default() -> Self {
        ConnectArgs {
            endpoint: "http://127.0.0.1:7070".into(),
            token: String::new(),
            tls: ClientTlsArgs::default(),
        }
    }
}

/// Connects, failing with a message that says what to check.
pub async fn connect(args: &ConnectArgs) -> Result<RunClient> {
    let mut endpoint = Endpoint::from_shared(args.endpoint.clone())
        .with_context(|| {
            format!(
                "`{}` is not a valid endpoint (e.g. http://host:7070)",
                args.endpoint
            )
        })?
        .connect_timeout(Duration::from_secs(5))
        // Checkpoint downloads stream 1 MiB messages: a window of several
        // keeps the server sending, and frames of a whole message save framing.
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size((1 << 20) + 1024);
    if args.endpoint.starts_with("https://") {
        endpoint = endpoint.tls_config(args.tls.config()?)?;
    }
    let channel = endpoint.connect().await.with_context(|| {
        format!(
            "cannot reach the coordinator at {}: is nt-server running there? (set --endpoint or NT_ENDPOINT)",
            args.endpoint
        )
    })?;
    let token = BearerToken::new(Some(&args.token))?;
    Ok(
        pb::run_service_client::RunServiceClient::with_interceptor(channel, token)
            .max_decoding_message_size(64 << 20),
    )
}

/// A gRPC error as a sentence for people, with what to do about it.
pub fn explain(status: &nt_proto::tonic::Status) -> String {
    use nt_proto::tonic::Code;
    // An outage the coordinator itself reports (its object store, say) is
    // not a connection problem: only a failed connection gets the hint.
    let message = status.message().to_lowercase();
    let connection = ["connect", "transport", "connection", "broken pipe", "dns"]
        .iter()
        .any(|w| message.contains(w))
        || message.is_empty();
    let hint = match status.code() {
        Code::Unauthenticated => " (check --token or NT_TOKEN)",
        Code::Unavailable if connection => " (is the coordinator up? check --endpoint)",
        // What a plain-text client sees from a TLS port.
        _ if status.message().contains("h2 protocol error") => {
            " (does the coordinator serve TLS? then use an https:// endpoint)"
        }
        _ => "",
    };
    format!("{:?}: {}{hint}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nt_proto::tonic::Status;

    #[test]
    fn only_a_failed_connection_is_blamed_on_the_endpoint() {
        let down = explain(&Status::unavailable(
            "error trying to connect: tcp connect error",
        ));
        assert!(down.contains("is the coordinator up?"), "{down}");
        let disk = explain(&Status::unavailable(
            "object store: Generic LocalFileSystem error: No space left on device",
        ));
        assert!(!disk.contains("is the coordinator up?"), "{disk}");
        assert!(disk.contains("No space left"), "{disk}");
    }
}
