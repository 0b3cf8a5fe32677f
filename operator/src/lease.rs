//! Leader election over a `coordination.k8s.io/v1` Lease: several operator
//! replicas may run at once (a rolling update, a partitioned node that
//! still runs its pod), and exactly one of them reconciles.
//!
//! The holder renews the Lease every `renew_every`. Another replica takes
//! it over once it has seen the Lease unchanged (the same resourceVersion)
//! for the lease duration, measured by its own clock (as client-go does),
//! so clock skew between nodes does not matter. Every write carries the
//! resourceVersion it read: of two replicas racing for an expired Lease,
//! the API server lets one write win and answers the other 409.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;

/// Errors talking to the API server about the Lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease {name}: {source}")]
    Kube {
        name: String,
        #[source]
        source: kube::Error,
    },
}

pub type Result<T> = std::result::Result<T, LeaseError>;

/// How the election runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Lease's name (in the operator's own namespace).
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    /// How long a holder that stopped renewing keeps the Lease.
    pub duration: Duration,
    /// How often the holder renews, and others try.
    pub renew_every: Duration,
}

/// What this replica last saw of the Lease (its resourceVersion changes
/// with every write, a renewal included), and when it saw it change.
#[derive(Debug)]
struct Observed {
    version: Option<String>,
    at: Instant,
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    config: Config,
    observed: Option<Observed>,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    pub fn new(api: Api<Lease>, config: Config) -> Self {
        Self {
            api,
            config,
            observed: None,
        }
    }

    fn error(&self, source: kube::Error) -> LeaseError {
        LeaseError::Kube {
            name: self.config.name.clone(),
            source,
        }
    }

    async fn read(&self) -> Result<Option<Lease>> {
        self.api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.error(e))
    }

    fn seconds(&self) -> i32 {
        i32::try_from(self.config.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Notes the Lease as it is now; returns since when it has been so.
    fn observe(&mut self, lease: &Lease) -> Instant {
        let version = lease.metadata.resource_version.clone();
        match &self.observed {
            Some(o) if o.version == version => o.at,
            _ => {
                let at = Instant::now();
                self.observed = Some(Observed { version, at });
                at
            }
        }
    }

    /// One attempt to take or renew the Lease: true when this replica holds
    /// it afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let identity = self.config.identity.clone();
        let Some(mut lease) = self.read().await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(identity),
                    lease_duration_seconds: Some(self.seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(self.error(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(identity.as_str());
        let since = self.observe(&lease);
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.config.duration, Duration::from_secs);
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        if !mine && !free && since.elapsed() < duration {
            return Ok(false);
        }
        let mut next = spec.clone();
        if !mine {
            next.acquire_time = Some(now.clone());
            next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        next.holder_identity = Some(identity);
        next.renew_time = Some(now);
        next.lease_duration_seconds = Some(self.seconds());
        lease.spec = Some(next);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observe(&written);
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Waits until this replica holds the Lease. API errors are logged and
    /// tried again: an operator that cannot reach its API server has
    /// nothing better to do.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.config.renew_every).await;
        }
    }

    /// Renews the Lease until leadership is lost: another replica holds it,
    /// or no renewal has succeeded for the lease duration (by then another
    /// replica may have taken it, so this one must stop reconciling).
    pub async fn hold(&mut self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => return,
                Err(e) => tracing::warn!(error = %e, "lease renewal"),
            }
            if renewed.elapsed() >= self.config.duration {
                return;
            }
        }
    }

    /// Gives the Lease up (at shutdown), so that another replica takes over
    /// at once instead of after the lease duration.
    pub async fn release(&mut self) -> Result<()> {
        let Some(mut lease) = self.read().await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            // Someone else wrote it since: it is not ours to give up.
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }
}
