//! Train fragments at the station: the policy gates (trains allowed, arguments, image on the
//! allowlist), the checked input (`railyard_policy::check_train_input`, at least k rows),
//! the container ([`crate::train`]) and its checked output, each step audited.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::execute_stream;
use datafusion::physical_plan::memory::MemoryStream;
use futures::StreamExt;

use railyard_contract::train_output::{self, OutputColumn};
use railyard_contract::{FragmentTicket, TrainCall};
use railyard_policy::{Refusal, Release, Rule, gate};
use tracing::info;

use railyard_audit::{Decision, Entry};

use crate::fragment::{Approved, record_of};
use crate::{Error, Result, Station, train};

impl Station {
    /// Checks a train request: the station runs trains at all, its arguments are JSON, its
    /// input passes the policy (rows over `public` and `aggregate` columns), its image is on
    /// the allowlist and declares its output columns for these arguments. Returns the
    /// approved input plan, the image id and the declared columns. Nothing is started. A
    /// refusal is audited.
    pub(crate) async fn approve_train(
        &self,
        ticket: &FragmentTicket,
        call: &TrainCall,
    ) -> Result<(Approved, String, Vec<OutputColumn>)> {
        if self.policy.trains.allowed.is_empty() {
            return Err(self
                .refuse(ticket, gate::no_trains(&self.name), Some(&call.image))
                .await);
        }
        if call.args.len() > train::MAX_ARGS_BYTES {
            return Err(Error::BadRequest(format!(
                "station '{}': a train's arguments may be at most {} bytes",
                self.name,
                train::MAX_ARGS_BYTES
            )));
        }
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&call.args) {
            return Err(Error::BadRequest(format!(
                "station '{}': the train's arguments are not JSON ({e})",
                self.name
            )));
        }
        let logical = self.plan_sql(ticket).await?;
        let checked = match railyard_policy::check_train_input(&logical, &self.policy, &self.name) {
            Ok(checked) => checked,
            Err(refusal) => return Err(self.refuse(ticket, refusal, Some(&call.image)).await),
        };
        let not_allowed = || gate::train_image(&self.name, &call.image);
        let image = match self.trains.inspect(&call.image).await {
            Ok(image) => image,
            Err(train::TrainError::NoImage) => {
                return Err(self.refuse(ticket, not_allowed(), Some(&call.image)).await);
            }
            Err(e) => return Err(self.train_failure(ticket, Some(&call.image), e).await),
        };
        let id = image.id;
        if !self.policy.allows_train(&id) {
            return Err(self.refuse(ticket, not_allowed(), Some(&id)).await);
        }
        let declared = match image.output.as_deref() {
            Some(label) => train_output::declared_columns(label, &call.args),
            None => Err(format!(
                "declares no output columns; {}",
                train_output::HOW_TO_DECLARE
            )),
        };
        let columns = match declared {
            Ok(columns) => columns,
            Err(why) => {
                let refusal = Refusal {
                    rule: Rule::TrainOutput,
                    message: format!(
                        "policy: station '{}' cannot plan a query over image {id}: it {why}",
                        self.name
                    ),
                };
                return Err(self.refuse(ticket, refusal, Some(&id)).await);
            }
        };
        let approved = Approved {
            plan: self.state.optimize(&checked.plan)?,
            table: checked.table,
            release: checked.release,
            audit: checked.audit,
        };
        Ok((approved, id, columns))
    }

    /// Reads a train's approved input, refusing it (audited) below the table's k rows.
    /// Returns the input (if `keep`; otherwise its rows are only counted) and k.
    pub(crate) async fn train_input(
        &self,
        ticket: &FragmentTicket,
        approved: &Approved,
        id: &str,
        keep: bool,
    ) -> Result<(Vec<RecordBatch>, u64)> {
        let Release::TrainInput { k } = approved.release else {
            return Err(Error::Internal {
                station: self.name.clone(),
                message: "a train's input was approved as another release".to_string(),
            });
        };
        let read = async {
            let (physical, task) = self.physical_plan(&approved.plan).await?;
            let mut stream = execute_stream(physical, task)?;
            let (mut kept, mut rows) = (Vec::new(), 0u64);
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                rows += batch.num_rows() as u64;
                if keep {
                    kept.push(batch);
                }
            }
            Ok::<_, DataFusionError>((kept, rows))
        };
        let (input, rows) = match read.await {
            Ok(read) => read,
            Err(e) => return Err(self.failure(ticket, Some(id), &e).await),
        };
        if let Err(refusal) =
            railyard_policy::release::train_input(&self.name, &approved.table, k, rows)
        {
            return Err(self.refuse(ticket, refusal, Some(id)).await);
        }
        Ok((input, k))
    }

    /// Runs a train: its approved input is read, handed to the container, and the checked
    /// output is audited with the image id and arguments, and released.
    pub(crate) async fn run_train(
        &self,
        ticket: &FragmentTicket,
        call: &TrainCall,
    ) -> Result<SendableRecordBatchStream> {
        let (approved, id, columns) = self.approve_train(ticket, call).await?;
        let (input, _) = self.train_input(ticket, &approved, &id, true).await?;
        let rows: u64 = input.iter().map(|b| b.num_rows() as u64).sum();
        let schema = input
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| approved.plan.schema().inner().clone());
        info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, researcher = %ticket.researcher, image = %id, rows, "train approved");
        match self
            .trains
            .run(&id, &call.args, schema, input, &self.policy.trains)
            .await
        {
            Ok((schema, batches)) => {
                // Approved columns were declared; only they may leave, as declared.
                let declared = train_output::schema_of(&columns).map_err(|m| Error::Internal {
                    station: self.name.clone(),
                    message: m,
                })?;
                if !train_output::matches(&declared, &schema) {
                    // The output's own column names are not repeated: a train could write
                    // a value into one.
                    let refusal = Refusal {
                        rule: Rule::TrainOutput,
                        message: format!(
                            "policy: station '{}' releases a train's output only with the \
                             columns its image declares ({}); this output has others",
                            self.name,
                            train_output::describe(&declared)
                        ),
                    };
                    return Err(self.refuse(ticket, refusal, Some(&id)).await);
                }
                let schema = Arc::new(declared);
                let batches = batches
                    .into_iter()
                    .map(|b| RecordBatch::try_new(Arc::clone(&schema), b.columns().to_vec()))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(DataFusionError::from)?;
                let released = batches.iter().map(|b| b.num_rows() as u64).sum();
                self.audit(Entry {
                    rows: released,
                    ..record_of(ticket, Decision::Allowed, Some(&id))
                })
                .await?;
                Ok(Box::pin(MemoryStream::try_new(batches, schema, None)?))
            }
            Err(train::TrainError::Output { rule, why }) => {
                let refusal = Refusal {
                    rule,
                    message: format!("policy: station '{}' {why}", self.name),
                };
                Err(self.refuse(ticket, refusal, Some(&id)).await)
            }
            Err(e) => Err(self.train_failure(ticket, Some(&id), e).await),
        }
    }

    /// Audits a train that could not run or did not finish, and returns its error (fixed
    /// text for the researcher; the audit record has the category, e.g. the exit code).
    async fn train_failure(
        &self,
        ticket: &FragmentTicket,
        image: Option<&str>,
        e: train::TrainError,
    ) -> Error {
        let (message, category) = match e {
            train::TrainError::Failed { message, category } => (message, category),
            train::TrainError::NoImage => (
                "has no such train image".to_string(),
                "no such image".to_string(),
            ),
            train::TrainError::Output { why, rule } => (why, rule.as_str().to_string()),
        };
        let entry = Entry {
            rule: Some(&category),
            ..record_of(ticket, Decision::Failed, image)
        };
        match self.audit(entry).await {
            Ok(()) => Error::Train {
                station: self.name.clone(),
                message,
            },
            Err(e) => e,
        }
    }
}
