//! Differentially private fragments at the station: the ε of the query (the policy's
//! rules in `railyard_policy::gate`), its durable charge to the researcher's budget, the
//! exact aggregate, OpenDP's noise ([`crate::dp`]) and the audit record with the ε.
//!
//! The order does not bend: the charge is committed (fsync) before the aggregate runs, and
//! the audit record is durable before the noised states leave. The ledger's SQLite writes
//! run on tokio's blocking pool, never on an async worker.

use std::sync::Arc;

use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::memory::MemoryStream;
use railyard_contract::FragmentTicket;
use railyard_policy::dp::DpRelease;
use railyard_policy::gate;
use tracing::{info, warn};

use railyard_audit::{Decision, Entry};

use crate::fragment::Approved;
use crate::{Error, Result, Station, blocking, dp, ledger};

impl Station {
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
        let charged = blocking(&self.name, move || {
            Ok(ledger.charge(
                ledger::Charge {
                    researcher: &account.0,
                    collaboration: &account.1,
                    table: &account.2,
                    query_id: &query_id,
                    fragment,
                    epsilon,
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
