//! Containerized trains: a reviewed Docker image the station runs over its own rows.
//!
//! ```text
//!   fragment ticket {sql, train: {image, args}}
//!     │ policy: trains allowed at all, input SQL checked like a row-level fragment over
//!     │ public + aggregate columns (never hidden / dp / join_key), image id on the allowlist
//!     ▼
//!   WORK/run-XXXX/input/input.arrow   (Arrow IPC file, mounted read-only at /railyard/input)
//!   WORK/run-XXXX/output/             (mounted read-write at /railyard/output)
//!     │ docker: no network, read-only root, uid 65534, all capabilities dropped,
//!     │ no-new-privileges, memory / CPU / pids limits, killed after the time limit
//!     ▼
//!   output.arrow: regular file, ≤ max_output_bytes, Arrow IPC, ≤ max_output_rows
//!     → audited with the image id, then released
//! ```
//!
//! The container and the run directory are removed whatever happens: the run is a task of
//! its own that outlives an abandoned request (it kills the container as soon as nobody
//! waits for it), and a station that was killed mid-run removes its leftover containers and
//! directories the next time it talks to Docker (they carry a label naming its work
//! directory).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    KillContainerOptions, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, WaitContainerOptions,
};
use futures::StreamExt;
use railyard_udfs::wire::TRAIN_STATION_COLUMN;
use tokio::sync::{OnceCell, oneshot};
use tracing::{info, warn};

use crate::policy::{TrainPolicy, is_image_id};

/// Where the train finds its input directory, read-only.
pub const INPUT_DIR: &str = "/railyard/input";
/// Where the train writes its output.
pub const OUTPUT_DIR: &str = "/railyard/output";
/// The input file's name in [`INPUT_DIR`].
pub const INPUT_FILE: &str = "input.arrow";
/// The output file's name in [`OUTPUT_DIR`].
pub const OUTPUT_FILE: &str = "output.arrow";
/// The unprivileged user every train runs as (`nobody`), whatever its image says.
pub const TRAIN_USER: &str = "65534:65534";
/// The label on every train container; its value is the station's train work directory.
pub const TRAIN_LABEL: &str = "railyard.train";
/// Longest argument text a station accepts (it travels in an environment variable).
pub const MAX_ARGS_BYTES: usize = 64 * 1024;

/// Why a train produced nothing to release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainError {
    /// Its output breaks a rule of the `[trains]` policy (the text names what, never a value).
    Output { rule: &'static str, why: String },
    /// It could not be run or did not finish (exit code, time limit, memory, the daemon).
    Run(String),
    /// The station has no image of that name.
    NoImage(String),
}

/// A station's train runner: its Docker connection (opened on first use) and its work
/// directory.
pub struct Trains {
    station: String,
    work: PathBuf,
    docker: OnceCell<Docker>,
}

impl Trains {
    pub fn new(station: &str, work: PathBuf) -> Self {
        Self {
            station: station.to_string(),
            work,
            docker: OnceCell::new(),
        }
    }

    /// The work directory: one `run-*` directory per running train.
    pub fn work_dir(&self) -> &Path {
        &self.work
    }

    async fn docker(&self) -> Result<&Docker, TrainError> {
        self.docker
            .get_or_try_init(|| async {
                let unreachable = |e: bollard::errors::Error| {
                    TrainError::Run(format!("cannot reach the Docker daemon ({e})"))
                };
                let docker = Docker::connect_with_local_defaults()
                    .map_err(unreachable)?
                    .negotiate_version()
                    .await
                    .map_err(unreachable)?;
                self.remove_leftovers(&docker).await;
                Ok(docker)
            })
            .await
    }

    /// Removes containers and run directories a killed earlier run of this station left.
    async fn remove_leftovers(&self, docker: &Docker) {
        let filters = HashMap::from([("label", vec![self.label_filter()])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        match docker.list_containers(Some(options)).await {
            Ok(left) => {
                for c in left.into_iter().filter_map(|c| c.id) {
                    warn!(station = %self.station, container = %c, "removing a train container left by an earlier run");
                    remove(docker, &c).await;
                }
            }
            Err(e) => {
                warn!(station = %self.station, error = %e, "cannot list leftover train containers")
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.work) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with("run-") {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }

    fn label_filter(&self) -> String {
        format!("{TRAIN_LABEL}={}", self.work.display())
    }

    /// The id (`sha256:…`) of the station's image `image` (a name or an id).
    pub async fn resolve(&self, image: &str) -> Result<String, TrainError> {
        let docker = self.docker().await?;
        match docker.inspect_image(image).await {
            Ok(inspect) => inspect
                .id
                .filter(|id| is_image_id(id))
                .ok_or_else(|| TrainError::Run(format!("Docker reports no id for '{image}'"))),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(TrainError::NoImage(image.to_string())),
            Err(e) => Err(TrainError::Run(format!(
                "cannot inspect image '{image}' ({e})"
            ))),
        }
    }

    /// Runs image `id` over `input` with `args` inside `limits`; returns its checked output.
    pub async fn run(
        &self,
        id: &str,
        args: &str,
        schema: SchemaRef,
        input: Vec<RecordBatch>,
        limits: &TrainPolicy,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), TrainError> {
        let docker = self.docker().await?.clone();
        let io = |what: &str, e: std::io::Error| {
            TrainError::Run(format!("cannot prepare the train's {what} ({e})"))
        };
        std::fs::create_dir_all(&self.work).map_err(|e| io("work directory", e))?;
        let dir = tempfile::Builder::new()
            .prefix("run-")
            .tempdir_in(&self.work)
            .map_err(|e| io("run directory", e))?;
        let input_dir = dir.path().join("input");
        let output_dir = dir.path().join("output");
        write_input(&input_dir, schema, &input).map_err(|e| io("input", e))?;
        std::fs::create_dir(&output_dir).map_err(|e| io("output directory", e))?;
        // The train's user owns nothing here; the run directory itself stays private.
        std::fs::set_permissions(&output_dir, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| io("output directory", e))?;

        let config = container_config(
            id,
            args,
            &input_dir,
            &output_dir,
            limits,
            self.work.display().to_string(),
        );
        let run = Run {
            station: self.station.clone(),
            image: id.to_string(),
            timeout: Duration::from_secs(limits.timeout_seconds),
            memory_mb: limits.memory_mb,
        };
        let limits = limits.clone();
        let (mut tx, rx) = oneshot::channel();
        // A task of its own: if the request is dropped, the container is still killed and
        // removed, and the run directory deleted.
        tokio::spawn(async move {
            let result = match run.contained(&docker, config, &mut tx).await {
                Ok(()) => read_output(&output_dir, &limits),
                Err(e) => Err(e),
            };
            drop(dir);
            let _ = tx.send(result);
        });
        rx.await.unwrap_or_else(|_| {
            Err(TrainError::Run(
                "the train's task ended unexpectedly".into(),
            ))
        })
    }
}

/// Writes `input` as `dir/input.arrow`, readable by the train's user.
fn write_input(dir: &Path, schema: SchemaRef, input: &[RecordBatch]) -> std::io::Result<()> {
    std::fs::create_dir(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let path = dir.join(INPUT_FILE);
    let file = std::fs::File::create(&path)?;
    let mut writer = FileWriter::try_new(std::io::BufWriter::new(file), &schema)
        .map_err(std::io::Error::other)?;
    for batch in input {
        writer.write(batch).map_err(std::io::Error::other)?;
    }
    writer.finish().map_err(std::io::Error::other)?;
    let mut inner = writer.into_inner().map_err(std::io::Error::other)?;
    inner.flush()?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
}

/// The container: the image by id, the contract's environment, and the sandbox.
fn container_config(
    id: &str,
    args: &str,
    input_dir: &Path,
    output_dir: &Path,
    limits: &TrainPolicy,
    label: String,
) -> ContainerCreateBody {
    let memory = (limits.memory_mb * 1024 * 1024) as i64;
    ContainerCreateBody {
        image: Some(id.to_string()),
        user: Some(TRAIN_USER.to_string()),
        env: Some(vec![
            format!("RAILYARD_INPUT={INPUT_DIR}/{INPUT_FILE}"),
            format!("RAILYARD_OUTPUT={OUTPUT_DIR}/{OUTPUT_FILE}"),
            format!("RAILYARD_ARGS={args}"),
        ]),
        network_disabled: Some(true),
        labels: Some(HashMap::from([(TRAIN_LABEL.to_string(), label)])),
        host_config: Some(HostConfig {
            network_mode: Some("none".to_string()),
            readonly_rootfs: Some(true),
            binds: Some(vec![
                format!("{}:{INPUT_DIR}:ro", input_dir.display()),
                format!("{}:{OUTPUT_DIR}:rw", output_dir.display()),
            ]),
            memory: Some(memory),
            // Equal to `memory`: no swap on top of it.
            memory_swap: Some(memory),
            nano_cpus: Some((limits.cpus * 1e9) as i64),
            pids_limit: Some(limits.pids as i64),
            cap_drop: Some(vec!["ALL".to_string()]),
            security_opt: Some(vec!["no-new-privileges".to_string()]),
            privileged: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One train run, as its task sees it.
struct Run {
    station: String,
    image: String,
    timeout: Duration,
    memory_mb: u64,
}

enum Ended {
    Exited(Option<Result<i64, bollard::errors::Error>>),
    TimedOut,
    Abandoned,
}

impl Run {
    /// Creates, starts and waits for the container, then removes it, whatever happened.
    async fn contained(
        &self,
        docker: &Docker,
        config: ContainerCreateBody,
        waiting: &mut oneshot::Sender<Result<(SchemaRef, Vec<RecordBatch>), TrainError>>,
    ) -> Result<(), TrainError> {
        let created = docker
            .create_container(None, config)
            .await
            .map_err(|e| TrainError::Run(format!("cannot create the container ({e})")))?;
        let id = created.id;
        let result = self.started(docker, &id, waiting).await;
        remove(docker, &id).await;
        result
    }

    async fn started(
        &self,
        docker: &Docker,
        id: &str,
        waiting: &mut oneshot::Sender<Result<(SchemaRef, Vec<RecordBatch>), TrainError>>,
    ) -> Result<(), TrainError> {
        let started = std::time::Instant::now();
        docker
            .start_container(id, None)
            .await
            .map_err(|e| TrainError::Run(format!("cannot start the container ({e})")))?;
        let mut wait = docker.wait_container(id, None::<WaitContainerOptions>);
        let ended = tokio::select! {
            r = wait.next() => Ended::Exited(r.map(|r| r.map(|w| w.status_code))),
            () = tokio::time::sleep(self.timeout) => Ended::TimedOut,
            () = waiting.closed() => Ended::Abandoned,
        };
        let code = match ended {
            Ended::Exited(Some(Ok(code))) => code,
            Ended::Exited(Some(Err(bollard::errors::Error::DockerContainerWaitError {
                code,
                ..
            }))) => code,
            Ended::Exited(Some(Err(e))) => {
                return Err(TrainError::Run(format!(
                    "lost the container while waiting for it ({e})"
                )));
            }
            Ended::Exited(None) => {
                return Err(TrainError::Run(
                    "lost the container while waiting for it".to_string(),
                ));
            }
            Ended::TimedOut => {
                kill(docker, id).await;
                self.log_tail(docker, id, "ran past its time limit").await;
                return Err(TrainError::Run(format!(
                    "train {} ran past the station's time limit of {} s and was killed",
                    self.image,
                    self.timeout.as_secs()
                )));
            }
            Ended::Abandoned => {
                kill(docker, id).await;
                return Err(TrainError::Run(
                    "nobody waits for the train any more".into(),
                ));
            }
        };
        info!(station = %self.station, image = %self.image, code, elapsed_ms = started.elapsed().as_millis() as u64, "train exited");
        if code == 0 {
            return Ok(());
        }
        let oom = docker
            .inspect_container(id, None)
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false);
        self.log_tail(docker, id, "failed").await;
        Err(TrainError::Run(if oom {
            format!(
                "train {} ran out of memory (the station's limit is {} MB)",
                self.image, self.memory_mb
            )
        } else {
            format!(
                "train {} exited with code {code}; nothing was released (the station's log \
                 has the train's last lines)",
                self.image
            )
        }))
    }

    /// Copies the last lines the train printed into the station's own log (they may hold
    /// data values, so they never travel to the hub).
    async fn log_tail(&self, docker: &Docker, id: &str, what: &str) {
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail("20")
            .build();
        let mut lines = String::new();
        let mut logs = docker.logs(id, Some(options));
        while let Some(Ok(chunk)) = logs.next().await {
            lines.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            if lines.len() > 8192 {
                break;
            }
        }
        warn!(station = %self.station, image = %self.image, output = %lines.trim_end(), "train {what}");
    }
}

async fn kill(docker: &Docker, id: &str) {
    if let Err(e) = docker
        .kill_container(id, None::<KillContainerOptions>)
        .await
    {
        warn!(container = %id, error = %e, "cannot kill a train container (removing it anyway)");
    }
}

/// Removes a container (killing it if it still runs), retrying once.
async fn remove(docker: &Docker, id: &str) {
    for attempt in 0..2 {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match docker.remove_container(id, Some(options)).await {
            Ok(()) => return,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return,
            Err(e) if attempt == 1 => {
                warn!(container = %id, error = %e, "cannot remove a train container; the station removes it when it next starts a train");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Reads and checks the train's output file.
fn read_output(
    dir: &Path,
    limits: &TrainPolicy,
) -> Result<(SchemaRef, Vec<RecordBatch>), TrainError> {
    let output = |rule: &'static str, why: String| TrainError::Output { rule, why };
    let path = dir.join(OUTPUT_FILE);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(output(
                "train_output",
                format!(
                    "received no output from the train: it must write {OUTPUT_DIR}/{OUTPUT_FILE}"
                ),
            ));
        }
        Err(e) => {
            return Err(TrainError::Run(format!(
                "cannot read the train's output ({e})"
            )));
        }
    };
    if !meta.file_type().is_file() {
        return Err(output(
            "train_output",
            format!("accepts a train's output only as a regular file {OUTPUT_FILE}"),
        ));
    }
    if meta.len() > limits.max_output_bytes {
        return Err(output(
            "max_output_bytes",
            format!(
                "releases at most {} bytes of train output; this train wrote {}",
                limits.max_output_bytes,
                meta.len()
            ),
        ));
    }
    let not_arrow = || {
        output(
            "train_output",
            format!("accepts a train's output only as an Arrow IPC file; {OUTPUT_FILE} is not one"),
        )
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| TrainError::Run(format!("cannot read the train's output ({e})")))?;
    let reader =
        FileReader::try_new(std::io::BufReader::new(file), None).map_err(|_| not_arrow())?;
    let schema = reader.schema();
    let mut batches = Vec::new();
    let mut rows = 0u64;
    for batch in reader {
        let batch = batch.map_err(|_| not_arrow())?;
        rows += batch.num_rows() as u64;
        if rows > limits.max_output_rows {
            return Err(output(
                "max_output_rows",
                format!(
                    "releases at most {} rows of train output; this train wrote more",
                    limits.max_output_rows
                ),
            ));
        }
        batches.push(batch);
    }
    if schema.fields().is_empty() {
        return Err(output(
            "train_output",
            "received a train output without columns".to_string(),
        ));
    }
    if schema.field_with_name(TRAIN_STATION_COLUMN).is_ok() {
        return Err(output(
            "train_output",
            format!("reserves the output column name '{TRAIN_STATION_COLUMN}' for the hub"),
        ));
    }
    Ok((schema, batches))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn write(dir: &Path, schema: SchemaRef, rows: i64) {
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from_iter_values(0..rows))],
        )
        .unwrap();
        let file = std::fs::File::create(dir.join(OUTPUT_FILE)).unwrap();
        let mut w = FileWriter::try_new(file, &schema).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
    }

    fn rule(r: Result<(SchemaRef, Vec<RecordBatch>), TrainError>) -> &'static str {
        match r {
            Err(TrainError::Output { rule, .. }) => rule,
            other => panic!("expected an output refusal, got {other:?}"),
        }
    }

    #[test]
    fn outputs_are_checked_before_release() {
        let dir = tempfile::tempdir().unwrap();
        let limits = TrainPolicy {
            max_output_rows: 10,
            ..TrainPolicy::default()
        };
        assert_eq!(rule(read_output(dir.path(), &limits)), "train_output");

        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        write(dir.path(), Arc::clone(&schema), 10);
        let (got, batches) = read_output(dir.path(), &limits).unwrap();
        assert_eq!(got, schema);
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 10);

        write(dir.path(), Arc::clone(&schema), 11);
        assert_eq!(rule(read_output(dir.path(), &limits)), "max_output_rows");
        let small = TrainPolicy {
            max_output_bytes: 100,
            ..limits.clone()
        };
        assert_eq!(rule(read_output(dir.path(), &small)), "max_output_bytes");

        let station = Arc::new(Schema::new(vec![Field::new(
            "station",
            DataType::Int64,
            false,
        )]));
        write(dir.path(), station, 1);
        assert_eq!(rule(read_output(dir.path(), &limits)), "train_output");

        std::fs::write(dir.path().join(OUTPUT_FILE), b"age,sex\n61,1\n").unwrap();
        assert_eq!(rule(read_output(dir.path(), &limits)), "train_output");

        // A link to a file the station can read is not followed.
        std::fs::remove_file(dir.path().join(OUTPUT_FILE)).unwrap();
        let secret = dir.path().join("secret.arrow");
        write(dir.path(), schema, 1);
        std::fs::rename(dir.path().join(OUTPUT_FILE), &secret).unwrap();
        std::os::unix::fs::symlink(&secret, dir.path().join(OUTPUT_FILE)).unwrap();
        assert_eq!(rule(read_output(dir.path(), &limits)), "train_output");
    }
}
