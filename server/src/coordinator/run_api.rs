//! The client-facing operations of the coordinator ([`RunApi`]).

use std::sync::Arc;

use nt_common::{layout, now_ms};
use nt_proto::prost::Message;
use nt_proto::v1 as pb;
use nt_spec::{MemberPlan, Plan};
use tokio::sync::broadcast;
use tracing::{info, instrument};

use super::api::RunApi;
use super::runbook::Runbook;
use super::service::Coordinator;
use super::service::{lock, Step};
use crate::error::{CoordinatorError, Result};

/// The most bytes of runs one ListRuns page carries (clients decode up to 64 MiB).
const MAX_PAGE_BYTES: usize = 4 << 20;

fn invalid(msg: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidArgument(msg.into())
}

fn not_found(run_id: &str) -> CoordinatorError {
    CoordinatorError::NotFound(format!("run `{run_id}` does not exist"))
}

impl Coordinator {
    /// The run as clients see it.
    fn run(&self, run_id: &str) -> Option<pb::Run> {
        let slot = self.slot(run_id)?;
        let book = lock(&slot.book);
        Some(super::wire::run(&book.doc, &book.plan))
    }

    /// Checks existing member checkpoints from their headers
    /// ([`super::checkpoints::check_members`]): each exists and fits the
    /// architecture, and they share one float dtype.
    async fn check_existing_members(&self, plan: &Plan) -> Result<()> {
        let MemberPlan::Existing(keys) = &plan.members else {
            return Ok(());
        };
        super::checkpoints::check_members(&self.storage, keys, &plan.arch).await?;
        Ok(())
    }
}

impl RunApi for Coordinator {
    #[instrument(skip_all, fields(run_id, request_id = %request_id))]
    async fn submit(&self, spec: pb::RunSpec, request_id: String) -> Result<(pb::Run, bool)> {
        if request_id.len() > 256 {
            return Err(invalid("request_id: at most 256 bytes"));
        }
        let _serial = self.submit_lock.lock().await;
        // A request id seen before returns its run.
        let mut run_id = layout::new_run_id();
        if !request_id.is_empty() {
            if let Some(existing) = self.store.request(&request_id).await? {
                if let Some(run) = self.run(&existing) {
                    return Ok((run, false));
                }
                // A document there that start-up could not read: never overwrite it.
                if self
                    .storage
                    .size(&layout::run_doc(&existing))
                    .await?
                    .is_some()
                {
                    return Err(CoordinatorError::FailedPrecondition(format!(
                        "request_id `{request_id}` belongs to run {existing}, whose stored \
                         document could not be read at start-up (see the coordinator's log)"
                    )));
                }
                // Claimed by a submission that stopped before storing its run: finish it.
                run_id = existing;
            }
        }
        tracing::Span::current().record("run_id", run_id.as_str());
        let plan = Plan::from_wire(&spec, &|r| self.storage.key_of(r))?;
        self.config.limits.check(&plan)?;
        self.check_existing_members(&plan).await?;
        if !request_id.is_empty() {
            run_id = self.store.claim_request(&request_id, &run_id).await?;
        }
        let budget = self.config.joint_memory_budget;
        let (book, effects) =
            Runbook::submit(&run_id, &request_id, spec, Arc::new(plan), budget, now_ms());
        // Nothing is kept, and nothing runs, unless the run was stored.
        let run = self.insert(book, effects).await?;
        info!(run_id = %run_id, "run submitted");
        self.metrics.runs_submitted.inc();
        Ok((run, true))
    }

    async fn get(&self, run_id: &str) -> Result<pb::Run> {
        self.run(run_id).ok_or_else(|| not_found(run_id))
    }

    async fn list(
        &self,
        page_size: usize,
        page_token: &str,
        state: pb::RunState,
    ) -> Result<(Vec<pb::Run>, String)> {
        let size = if page_size == 0 {
            50
        } else {
            page_size.min(500)
        };
        let slots: Vec<_> = lock(&self.runs)
            .iter()
            .rev()
            .filter(|(id, _)| page_token.is_empty() || id.as_str() < page_token)
            .map(|(id, slot)| (id.clone(), slot.clone()))
            .collect();
        let mut runs = Vec::new();
        let mut bytes = 0;
        let mut last = String::new();
        for (id, slot) in slots {
            let book = lock(&slot.book);
            if state != pb::RunState::Unspecified && pb::RunState::from(book.state()) != state {
                continue;
            }
            let run = super::wire::run(&book.doc, &book.plan);
            let len = run.encoded_len();
            // A page ends at its size in runs or in bytes, whichever comes first.
            if runs.len() == size || (!runs.is_empty() && bytes + len > MAX_PAGE_BYTES) {
                return Ok((runs, last));
            }
            bytes += len;
            last = id;
            runs.push(run);
        }
        Ok((runs, String::new()))
    }

    async fn watch(
        &self,
        run_id: &str,
        after: u64,
    ) -> Result<(Vec<pb::RunEvent>, Option<broadcast::Receiver<pb::RunEvent>>)> {
        let slot = self.slot(run_id).ok_or_else(|| not_found(run_id))?;
        let book = lock(&slot.book);
        let events = lock(&slot.events);
        let mut past: Vec<pb::RunEvent> = events
            .iter()
            .filter(|ev| ev.sequence > after)
            .cloned()
            .collect();
        if past.is_empty() && events.is_empty() && book.doc.event_sequence > after {
            // Events from before a coordinator restart are gone: say where the run is.
            past.push(pb::RunEvent {
                run_id: run_id.to_string(),
                sequence: book.doc.event_sequence,
                time_unix_ms: now_ms(),
                event: Some(pb::run_event::Event::StateChanged(pb::RunStateChanged {
                    state: pb::RunState::from(book.state()) as i32,
                    message: book.doc.message.clone(),
                })),
            });
        }
        let live = if book.state().is_final() {
            None
        } else {
            lock(&slot.tx).as_ref().map(broadcast::Sender::subscribe)
        };
        Ok((past, live))
    }

    #[instrument(skip_all, fields(run_id = %run_id))]
    async fn cancel(&self, run_id: &str, reason: &str) -> Result<pb::Run> {
        let run = self
            .commit(run_id, |book| {
                let effects = book.cancel(reason, now_ms())?;
                Ok(Step::stored((), effects))
            })
            .await;
        run?;
        info!("run cancelled");
        self.get(run_id).await
    }
}
