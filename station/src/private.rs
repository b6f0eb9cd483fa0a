//! Differentially private fragments at the station: the ε of the query (the policy's
//! rules in `railyard_policy::gate`), its durable charge to the researcher's budget, the
//! exact aggregate, OpenDP's noise ([`crate::dp`]) and the audit record with the ε.
//!
//! The order does not bend: the charge is committed (fsync) before the aggregate runs, and
//! the audit record is durable before the noised states leave. A charge that a crash left
//! without its audit record gets one when the station starts ([`Station::reconcile_ledger`];
//! the order and what each crash leaves are in [`crate::ledger`]). A caller that hangs up
//! cannot stop a fragment between the two: the Flight service runs every fragment on its
//! own task, to its end. The ledger's SQLite
//! writes run on tokio's blocking pool, never on an async worker.

use std::sync::Arc;

use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::memory::MemoryStream;
use railyard_contract::FragmentTicket;
use railyard_policy::dp::DpRelease;
use railyard_policy::gate;
use tracing::{info, warn};

use railyard_audit::{Decision, Entry};

use crate::fragment::Approved;

/// The rule of the audit record a charge left without one gets at the next start.
pub const RECOVERED: &str = "recovered";
use crate::{Error, Result, Station, blocking, dp, ledger};

impl Station {
    /// Gives every charge since the last start that has no audit record one: `failed`,
    /// rule `recovered`, with its ε (nothing was released under it: a release waits for
    /// its record). Runs before the station serves; returns how many it recovered.
    pub(crate) async fn reconcile_ledger(&self) -> Result<usize> {
        let Some(ledger) = &self.ledger else {
            return Ok(0);
        };
        let pending = {
            let ledger = Arc::clone(ledger);
            blocking(&self.name, move || Ok(ledger.unreconciled()?)).await?
        };
        let Some(last) = pending.last().map(|c| c.seq) else {
            return Ok(0);
        };
        let wanted: std::collections::HashSet<(String, u64)> = pending
            .iter()
            .map(|c| (c.query_id.clone(), c.fragment))
            .collect();
        let path = self.audit.path().to_path_buf();
        let mut audited =
            tokio::task::spawn_blocking(move || railyard_audit::count_charged(&path, &wanted))
                .await
                .map_err(|e| Error::Internal {
                    station: self.name.clone(),
                    message: e.to_string(),
                })?
                .map_err(|e| Error::Internal {
                    station: self.name.clone(),
                    message: format!("the audit log cannot be read: {e}"),
                })?;
        let mut recovered = 0;
        for charge in &pending {
            let key = (charge.query_id.clone(), charge.fragment);
            match audited.get_mut(&key) {
                Some(n) if *n > 0 => *n -= 1,
                _ => {
                    self.audit(Entry {
                        researcher: &charge.researcher,
                        query_id: &charge.query_id,
                        fragment: charge.fragment,
                        sql: &charge.sql,
                        train: None,
                        args: None,
                        decision: Decision::Failed,
                        rule: Some(RECOVERED),
                        rows: 0,
                        suppressed: 0,
                        epsilon: Some(charge.epsilon),
                    })
                    .await?;
                    recovered += 1;
                }
            }
        }
        let ledger = Arc::clone(ledger);
        blocking(&self.name, move || Ok(ledger.mark_reconciled(last)?)).await?;
        if recovered > 0 {
            warn!(station = %self.name, recovered, "ε charges without an audit record (the station stopped between charge and record) are now recorded as failed, rule recovered");
        }
        Ok(recovered)
    }

    /// The ε of a DP fragment and its noise, refused (audited) if the ε is not allowed or
    /// the researcher's budget cannot cover it. With `charge`, the ε is charged to the
    /// ledger (durably) and the spend afterwards is returned too.
    pub(crate) async fn dp_terms(
        &self,
        ticket: &FragmentTicket,
        release: &DpRelease,
        charge: bool,
    ) -> Result<(dp::NoisePlan, f64)> {
        let (Some(policy), Some(ledger)) = (&self.policy.dp, &self.ledger) else {
            return Err(self.refuse(ticket, gate::no_dp(&self.name), None).await);
        };
        let epsilon = match gate::query_epsilon(policy, &self.name, ticket.epsilon) {
            Ok(epsilon) => epsilon,
            Err(refusal) => return Err(self.refuse(ticket, refusal, None).await),
        };
        let noise = dp::plan_noise(release, epsilon).map_err(|e| Error::Internal {
            station: self.name.clone(),
            message: e.to_string(),
        })?;
        let spender = gate::Spender {
            station: &self.name,
            table: &release.table,
            researcher: ticket.researcher(),
            collaboration: ticket.collaboration(),
        };
        let account = (
            spender.researcher.to_string(),
            spender.collaboration.to_string(),
            release.table.clone(),
        );
        let ledger = Arc::clone(ledger);
        let (budget, epsilon) = (policy.budget, noise.epsilon());
        if !charge {
            let spent = blocking(&self.name, move || {
                Ok(ledger.spent(&account.0, &account.1, &account.2)?)
            })
            .await?;
            if !gate::within_budget(spent, epsilon, budget) {
                let refusal = gate::over_budget(spender, epsilon, spent, budget);
                return Err(self.refuse(ticket, refusal, None).await);
            }
            return Ok((noise, spent));
        }
        let (query_id, fragment) = (ticket.query_id.clone(), ticket.fragment as u64);
        let sql = ticket.sql.clone();
        let charged = blocking(&self.name, move || {
            Ok(ledger.charge(
                ledger::Charge {
                    researcher: &account.0,
                    collaboration: &account.1,
                    table: &account.2,
                    query_id: &query_id,
                    fragment,
                    epsilon,
                    sql: &sql,
                },
                budget,
            )?)
        })
        .await?;
        match charged {
            ledger::Charged::Committed { spent } => Ok((noise, spent)),
            ledger::Charged::OverBudget { spent } => {
                let refusal = gate::over_budget(spender, epsilon, spent, budget);
                Err(self.refuse(ticket, refusal, None).await)
            }
        }
    }

    /// Runs a DP fragment: the ε is charged (durably) first, then the aggregate runs, the
    /// states are completed to the public keys and noised, the release is audited with its
    /// ε, and only then returned.
    pub(crate) async fn run_dp(
        &self,
        ticket: &FragmentTicket,
        approved: &Approved,
        release: &DpRelease,
    ) -> Result<SendableRecordBatchStream> {
        let (noise, spent) = self.dp_terms(ticket, release, true).await?;
        let epsilon = noise.epsilon();
        info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, researcher = %ticket.researcher, epsilon, spent, "DP fragment charged");
        let failed = |category: &'static str| async move {
            self.audit(Entry {
                rule: Some(category),
                epsilon: Some(epsilon),
                ..Entry::for_ticket(ticket, Decision::Failed)
            })
            .await?;
            Err(Error::Failed {
                station: self.name.clone(),
                category,
            })
        };
        let batches = match self.execute(&approved.plan).await {
            Ok(batches) => batches,
            Err(e) => {
                warn!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, error = %e, "DP fragment failed");
                return failed(railyard_policy::release::failure_category(&e)).await;
            }
        };
        // OpenDP's measurements are not Send: the noise is added in a plain function.
        let noised = match dp::add_noise(release, &noise, &batches) {
            Ok(batch) => batch,
            Err(e) => {
                warn!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, error = %e, "DP noise failed");
                return failed("a computation failed").await;
            }
        };
        let rows = noised.num_rows() as u64;
        self.audit(Entry {
            rows,
            epsilon: Some(epsilon),
            ..Entry::for_ticket(ticket, Decision::Allowed)
        })
        .await?;
        let schema = noised.schema();
        Ok(Box::pin(MemoryStream::try_new(vec![noised], schema, None)?))
    }
}
