//! One coordinator per store: the store lease.
//!
//! The coordinator schedules from memory, so two on one store would hand out
//! the same tasks and overwrite each other's runs. Whoever holds the lease
//! object (`coordinator/lease.json`) may write; it renews the lease every
//! third of its time to live with a conditional put, and each holder takes
//! the next epoch, the fencing token every run document it writes carries.
//!
//! * **Taking it.** A lease that is missing or released is taken at once. A
//!   lease someone holds is watched for its holder's time to live: renewed
//!   meanwhile, it belongs to a live coordinator and this one is refused;
//!   unchanged for all of it, its holder is gone and it is taken over with a
//!   conditional put on the version watched. The decision uses only what
//!   this process observed, never another machine's clock.
//! * **Holding it.** Writes are allowed until one time to live after the
//!   start of the last renewal that succeeded (a monotonic clock, so a
//!   stopped process that wakes up finds its time over). A renewal that
//!   meets another holder loses the lease for good: the coordinator stops
//!   writing and shuts down.
//! * **Late writes.** A write of a coordinator that lost the lease can still
//!   land later (sent before, delayed by the store). The run documents carry
//!   the writer's epoch, and the holder overwrites a document of a lower
//!   epoch instead of treating it as a conflict ([`super::store`]).
//! * **Giving it up.** A clean shutdown releases the lease, so a restart
//!   does not wait.
//!
//! On the local filesystem, which cannot compare-and-swap, the lease is read
//! back before each write: it keeps a second coordinator out, but two that
//! start in the same instant could both take it.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nt_common::storage::{Storage, Version, WriteError};
use nt_common::{layout, now_ms};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::error::{CoordinatorError, Result};

/// The lease object as stored.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct LeaseRecord {
    holder: String,
    epoch: u64,
    ttl_ms: u64,
    /// Wall-clock time of the last renewal, for people reading the object.
    renewed_ms: i64,
    #[serde(default)]
    released: bool,
}

impl LeaseRecord {
    /// `holder`'s lease at `epoch`, renewed now.
    fn new(holder: &str, epoch: u64, ttl: Duration, released: bool) -> Self {
        LeaseRecord {
            holder: holder.to_string(),
            epoch,
            ttl_ms: ttl.as_millis() as u64,
            renewed_ms: now_ms(),
            released,
        }
    }

    fn bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec_pretty(self).unwrap_or_default())
    }
}

#[derive(Debug)]
struct Held {
    version: Version,
    /// Writes are allowed until then.
    valid_until: Instant,
    /// Why the lease is lost for good.
    lost: Option<String>,
    /// Given up by a clean shutdown.
    released: bool,
    /// The store's last answer, for `/healthz`.
    store_error: Option<String>,
}

pub struct StoreLease {
    storage: Storage,
    holder: String,
    epoch: u64,
    ttl: Duration,
    held: Mutex<Held>,
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the lease; an unreadable object counts as released (it names no
/// holder that could be alive).
async fn read(storage: &Storage, key: &str) -> Result<Option<(LeaseRecord, Version)>> {
    Ok(storage.get(key).await?.map(|(bytes, version)| {
        let record = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(key, error = %e, "the store lease is unreadable; treating it as released");
            LeaseRecord {
                released: true,
                ..LeaseRecord::default()
            }
        });
        (record, version)
    }))
}

impl StoreLease {
    /// Takes the store's lease for `holder`, waiting out a holder that may
    /// have died; refuses when another coordinator renews it meanwhile. The
    /// lease is renewed until `shutdown`; [`StoreLease::release`] gives it up.
    pub async fn acquire(
        storage: Storage,
        holder: String,
        ttl: Duration,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>> {
        let key = layout::coordinator_lease();
        let ttl = ttl.max(Duration::from_millis(300));
        let (epoch, version, started) = loop {
            let started = Instant::now();
            let Some((record, version)) = read(&storage, &key).await? else {
                let record = LeaseRecord::new(&holder, 1, ttl, false);
                match storage.create(&key, record.bytes()).await {
                    Ok(v) => break (1, v, started),
                    Err(WriteError::AlreadyExists(_)) => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            let version = if record.released {
                version
            } else {
                watch(&storage, &key, &record, version, &shutdown).await?
            };
            let record = LeaseRecord::new(&holder, record.epoch + 1, ttl, false);
            let started = Instant::now();
            match storage.update(&key, record.bytes(), &version).await {
                Ok(v) => break (record.epoch, v, started),
                // Someone else took it first: look again.
                Err(WriteError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        info!(holder = %holder, epoch, "holding the store lease");
        let lease = Arc::new(StoreLease {
            storage,
            holder,
            epoch,
            ttl,
            held: Mutex::new(Held {
                version,
                valid_until: started + ttl,
                lost: None,
                released: false,
                store_error: None,
            }),
            stop: CancellationToken::new(),
        });
        tokio::spawn(renew(Arc::downgrade(&lease), shutdown));
        Ok(lease)
    }

    /// This holder's name, as written in the lease and the run documents.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The fencing token: higher for every new holder.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The epoch to write with, or why this coordinator may not write.
    pub fn check(&self) -> Result<u64> {
        let held = lock(&self.held);
        if let Some(why) = &held.lost {
            return Err(CoordinatorError::Unavailable(why.clone()));
        }
        if held.released {
            return Err(CoordinatorError::Unavailable(
                "this coordinator has shut down".into(),
            ));
        }
        if Instant::now() > held.valid_until {
            return Err(CoordinatorError::Unavailable(format!(
                "the store has not confirmed this coordinator's lease within {} s ({}); \
                 not writing until it does",
                self.ttl.as_secs_f64(),
                held.store_error.as_deref().unwrap_or("no answer yet"),
            )));
        }
        Ok(self.epoch)
    }

    /// Why the lease is lost for good, if it is.
    pub fn lost(&self) -> Option<String> {
        lock(&self.held).lost.clone()
    }

    /// The store's last error while renewals fail, or that it has not
    /// confirmed the lease in time.
    pub fn store_error(&self) -> Option<String> {
        let held = lock(&self.held);
        held.store_error.clone().or_else(|| {
            (Instant::now() > held.valid_until && !held.released).then(|| {
                format!(
                    "no answer from the store for over {} s",
                    self.ttl.as_secs_f64()
                )
            })
        })
    }

    /// Marks the lease lost: a document of a later epoch was found.
    pub fn fence(&self, why: String) {
        let mut held = lock(&self.held);
        if held.lost.is_none() {
            error!(reason = %why, "lost the store lease; no longer writing");
            held.lost = Some(why);
        }
        self.stop.cancel();
    }

    /// Stops renewing and releases the lease (a clean shutdown).
    pub async fn release(&self) {
        self.stop.cancel();
        let version = {
            let mut held = lock(&self.held);
            if held.lost.is_some() || held.released {
                return;
            }
            held.released = true;
            held.version.clone()
        };
        let record = LeaseRecord::new(&self.holder, self.epoch, self.ttl, true);
        let key = layout::coordinator_lease();
        if matches!(self.still_ours(&key).await, Ok(true)) {
            match self.storage.update(&key, record.bytes(), &version).await {
                Ok(_) => info!("released the store lease"),
                Err(e) => warn!(error = %e, "could not release the store lease"),
            }
        }
    }

    /// On a store without compare-and-swap, whether the stored lease is
    /// still this holder's (read back before writing over it).
    /// A store that does not answer is an error (retried), not a lost lease.
    async fn still_ours(&self, key: &str) -> Result<bool> {
        if self.storage.conditional_updates {
            return Ok(true);
        }
        Ok(matches!(read(&self.storage, key).await?,
            Some((r, _)) if r.holder == self.holder && r.epoch == self.epoch && !r.released))
    }

    /// One renewal. `Ok(false)` when the lease turned out to be someone else's.
    pub(crate) async fn renew_once(&self) -> Result<bool> {
        let key = layout::coordinator_lease();
        let version = {
            let held = lock(&self.held);
            if held.released {
                return Ok(true);
            }
            held.version.clone()
        };
        let record = LeaseRecord::new(&self.holder, self.epoch, self.ttl, false);
        let started = Instant::now();
        if !self.still_ours(&key).await? {
            return Ok(false);
        }
        let version = match self.storage.update(&key, record.bytes(), &version).await {
            Ok(v) => v,
            Err(WriteError::Conflict(_)) => match read(&self.storage, &key).await? {
                // Released meanwhile by this process's shutdown.
                Some((r, _)) if r.holder == self.holder && r.released => return Ok(true),
                // An earlier renewal reported failed had landed: adopt it.
                Some((r, v)) if r.holder == self.holder && r.epoch == self.epoch => {
                    self.storage.update(&key, record.bytes(), &v).await?
                }
                _ => return Ok(false),
            },
            Err(e) => return Err(e.into()),
        };
        let mut held = lock(&self.held);
        held.version = version;
        held.valid_until = started + self.ttl;
        held.store_error = None;
        Ok(true)
    }
}

/// Watches a held lease for its holder's time to live. Returns the version to
/// take over from when it stayed unchanged (or was released); refuses when
/// it was renewed.
async fn watch(
    storage: &Storage,
    key: &str,
    record: &LeaseRecord,
    version: Version,
    shutdown: &CancellationToken,
) -> Result<Version> {
    // The holder's own time to live, bounded so a corrupt value cannot make
    // a start wait for hours.
    let wait = Duration::from_millis(record.ttl_ms.clamp(300, 300_000));
    info!(
        holder = %record.holder,
        epoch = record.epoch,
        seconds = wait.as_secs_f64(),
        "the store lease is held; waiting to see whether its holder is alive"
    );
    let poll = wait / 5;
    let until = Instant::now() + wait + poll;
    while Instant::now() < until {
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.cancelled() => {
                return Err(CoordinatorError::Unavailable("shut down while waiting for the store lease".into()));
            }
        }
        match read(storage, key).await? {
            None => return Ok(Version::default()),
            Some((r, v)) if v != version || r.epoch != record.epoch => {
                if r.released {
                    return Ok(v);
                }
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "the store {} is in use by coordinator {} (epoch {}, renewing its lease \
                     every {} ms): only one coordinator may use a store",
                    storage.url,
                    r.holder,
                    r.epoch,
                    r.ttl_ms / 3
                )));
            }
            Some(_) => {}
        }
    }
    warn!(holder = %record.holder, "the store lease was not renewed in its time to live; taking it over");
    Ok(version)
}

/// Renews every third of the time to live until shutdown or until the lease
/// is lost (then shuts the coordinator down).
async fn renew(lease: Weak<StoreLease>, shutdown: CancellationToken) {
    let (period, stop) = match lease.upgrade() {
        Some(l) => (l.ttl / 3, l.stop.clone()),
        None => return,
    };
    let mut delay = period;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
            // `Coordinator::close` releases it.
            _ = shutdown.cancelled() => return,
        }
        let Some(l) = lease.upgrade() else { return };
        // A store that does not answer at all (frozen, a black-holed
        // connection) is an error after one time to live, not a wait of
        // the HTTP client's own timeout. A renewal dropped here may still
        // land; the next one adopts it (see `renew_once`).
        let renewed = match tokio::time::timeout(l.ttl, l.renew_once()).await {
            Ok(r) => r,
            Err(_) => Err(CoordinatorError::Unavailable(format!(
                "the store did not answer within {} s",
                l.ttl.as_secs_f64()
            ))),
        };
        match renewed {
            Ok(true) => {
                delay = period;
            }
            Ok(false) => {
                let who = read(&l.storage, &layout::coordinator_lease())
                    .await
                    .ok()
                    .flatten()
                    .map(|(r, _)| format!("coordinator {} (epoch {})", r.holder, r.epoch))
                    .unwrap_or_else(|| "another coordinator".into());
                l.fence(format!(
                    "this coordinator lost the store lease to {who}; it no longer writes"
                ));
                shutdown.cancel();
                return;
            }
            Err(e) => {
                warn!(error = %e, "renewing the store lease failed; retrying");
                lock(&l.held).store_error = Some(e.to_string());
                // Retry sooner than the period, with jitter, while the store
                // is away.
                let jitter = u64::from(std::process::id() ^ now_ms() as u32) % 250;
                delay =
                    (period / 3).max(Duration::from_millis(100)) + Duration::from_millis(jitter);
            }
        }
    }
}
