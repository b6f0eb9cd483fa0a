//! Containerized trains: a reviewed Docker image the station runs over its own rows.
//!
//! ```text
//!   fragment ticket {sql, train: {image, args}}
//!     │ policy: trains allowed at all, input SQL checked like a row-level fragment over
//!     │ public + aggregate columns (never hidden / dp / join_key), image id on the allowlist
//!     ▼
//!   WORK/run-XXXX/input/input.arrow   (Arrow IPC file, mounted read-only at /railyard/input)
//!   WORK/run-XXXX/output/             (mounted read-write at /railyard/output)
//!     │ docker: no network, read-only root, an unprivileged user (65534, or the station's
//!     │ own uid if it is not root), all capabilities dropped, no-new-privileges,
//!     │ memory / CPU / pids limits, at most `max_concurrent` at once, killed after the
//!     │ time limit
//!     ▼
//!   output.arrow: regular file, ≤ max_output_bytes, uncompressed Arrow IPC, ≤ max_output_rows
//!     → audited with the image id and arguments, then released
//! ```
//!
//! The container and the run directory are removed whatever happens: the run is a task of
//! its own that outlives an abandoned request (it kills the container as soon as nobody
//! waits for it), and a station that was killed mid-run removes its leftover containers and
//! directories the first time it talks to Docker after it restarts (they carry a label
//! naming its work directory).
//!
//! What a failed train says to the researcher is fixed text (the time limit, or "failed"):
//! its exit code, memory use and printed lines are choices of the train, so they go to the
//! station's audit log and log only.

mod output;

use output::read_output;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
use railyard_contract::TRAIN_STATION_COLUMN;
use tokio::sync::{OnceCell, Semaphore, oneshot};
use tracing::{info, warn};

use railyard_policy::Rule;
use railyard_policy::file::{TrainPolicy, is_image_id};

/// Where the train finds its input directory, read-only.
pub const INPUT_DIR: &str = "/railyard/input";
/// Where the train writes its output.
pub const OUTPUT_DIR: &str = "/railyard/output";
/// The input file's name in [`INPUT_DIR`].
pub const INPUT_FILE: &str = "input.arrow";
/// The output file's name in [`OUTPUT_DIR`].
pub const OUTPUT_FILE: &str = "output.arrow";
/// The unprivileged user a train runs as when the station runs as root (`nobody`).
pub const NOBODY: u32 = 65534;
/// The label on every train container; its value is the station's train work directory.
pub const TRAIN_LABEL: &str = "railyard.train";
/// Longest argument text a station accepts (it travels in an environment variable).
pub const MAX_ARGS_BYTES: usize = 64 * 1024;
/// How long the station waits for one Docker call that tidies up (kill, remove, logs).
const TIDY_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a train produced nothing to release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainError {
    /// Its output breaks a rule of the `[trains]` policy (the text names what, never a value).
    Output { rule: Rule, why: String },
    /// It could not be run or did not finish: `message` is for the researcher (fixed text),
    /// `category` for the station's audit log (may name the exit code).
    Failed { message: String, category: String },
    /// The station cannot resolve the name to an image it has.
    NoImage,
}

impl TrainError {
    fn failed(message: impl Into<String>, category: impl Into<String>) -> Self {
        TrainError::Failed {
            message: message.into(),
            category: category.into(),
        }
    }
}

/// A train image as the station's Docker daemon knows it.
#[derive(Debug, Clone)]
pub struct TrainImage {
    /// `sha256:…`, what a policy allows.
    pub id: String,
    /// The value of its `railyard.output-schema` label, if it has one.
    pub output: Option<String>,
}

/// Whether `image` is an image id (`sha256:…`) or a plain image reference (`name[:tag]`,
/// lowercase path components): nothing else reaches the Docker API, whose addresses embed
/// the name unescaped.
pub fn is_image_reference(image: &str) -> bool {
    if is_image_id(image) {
        return true;
    }
    let (name, tag) = match image.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, Some(t)),
        _ => (image, None),
    };
    let component = |c: &str| {
        !c.is_empty()
            && c.len() <= 128
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && c.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
            && !c.contains("..")
    };
    let tag_ok = tag.is_none_or(|t| {
        !t.is_empty()
            && t.len() <= 128
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            && t.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
    });
    image.len() <= 255 && tag_ok && name.split('/').all(component)
}

/// A station's train runner: its Docker connection (opened on first use), its work
/// directory and how many trains may run at once.
pub struct Trains {
    station: String,
    work: PathBuf,
    docker: OnceCell<Docker>,
    running: Arc<Semaphore>,
}

impl Trains {
    pub fn new(station: &str, work: PathBuf, max_concurrent: usize) -> Self {
        Self {
            station: station.to_string(),
            work,
            docker: OnceCell::new(),
            running: Arc::new(Semaphore::new(max_concurrent.max(1))),
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
                    warn!(station = %self.station, error = %e, "cannot reach the Docker daemon");
                    TrainError::failed(
                        "cannot run trains now (the station's log has why)",
                        "docker unavailable",
                    )
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
                    remove_run_dir(&entry.path());
                }
            }
        }
    }

    fn label_filter(&self) -> String {
        format!("{TRAIN_LABEL}={}", self.work.display())
    }

    /// The id (`sha256:…`) of the station's image `image` (a name or an id).
    pub async fn resolve(&self, image: &str) -> Result<String, TrainError> {
        Ok(self.inspect(image).await?.id)
    }

    /// The station's image `image` (a name or an id): its id and the output columns it
    /// declares (the label [`railyard_contract::train_output::OUTPUT_SCHEMA_LABEL`]).
    pub async fn inspect(&self, image: &str) -> Result<TrainImage, TrainError> {
        if !is_image_reference(image) {
            return Err(TrainError::NoImage);
        }
        let docker = self.docker().await?;
        match docker.inspect_image(image).await {
            Ok(inspect) => {
                let output = inspect.config.and_then(|c| c.labels).and_then(|mut l| {
                    l.remove(railyard_contract::train_output::OUTPUT_SCHEMA_LABEL)
                });
                inspect
                    .id
                    .filter(|id| is_image_id(id))
                    .map(|id| TrainImage { id, output })
                    .ok_or(TrainError::NoImage)
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(TrainError::NoImage),
            Err(e) => {
                warn!(station = %self.station, image, error = %e, "cannot inspect a train image");
                Err(TrainError::failed(
                    "cannot run trains now (the station's log has why)",
                    "docker unavailable",
                ))
            }
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
            warn!(error = %e, "cannot prepare the train's {what}");
            TrainError::failed(
                "cannot run trains now (the station's log has why)",
                format!("cannot prepare the train's {what}"),
            )
        };
        let permit = Arc::clone(&self.running)
            .acquire_owned()
            .await
            .map_err(|_| TrainError::failed("the station is stopping", "station stopping"))?;
        std::fs::create_dir_all(&self.work).map_err(|e| io("work directory", e))?;
        let dir = tempfile::Builder::new()
            .prefix("run-")
            .tempdir_in(&self.work)
            .map_err(|e| io("run directory", e))?
            // Removed by remove_run_dir below, which also copes with what the train made.
            .keep();
        let user = train_user();
        let input_dir = dir.join("input");
        let output_dir = dir.join("output");
        let prepared = {
            let (input_dir, output_dir) = (input_dir.clone(), output_dir.clone());
            tokio::task::spawn_blocking(move || {
                prepare(&input_dir, &output_dir, schema, &input, user)
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
        };
        if let Err(e) = prepared {
            remove_run_dir(&dir);
            return Err(io("input", e));
        }
        let config = container_config(
            id,
            args,
            &input_dir,
            &output_dir,
            limits,
            user,
            self.work.display().to_string(),
        );
        let run = Run {
            station: self.station.clone(),
            image: id.to_string(),
            timeout: Duration::from_secs(limits.timeout_seconds),
        };
        let limits = limits.clone();
        let (mut tx, rx) = oneshot::channel();
        // A task of its own: if the request is dropped, the container is still killed and
        // removed, and the run directory deleted.
        tokio::spawn(async move {
            let result = match run.contained(&docker, config, &mut tx).await {
                Ok(()) => tokio::task::spawn_blocking(move || {
                    let read = read_output(&output_dir, &limits);
                    remove_run_dir(&dir);
                    read
                })
                .await
                .unwrap_or_else(|_| {
                    Err(TrainError::failed(
                        "the station could not read the train's output",
                        "output reader panicked",
                    ))
                }),
                Err(e) => {
                    let _ = tokio::task::spawn_blocking(move || remove_run_dir(&dir)).await;
                    Err(e)
                }
            };
            drop(permit);
            let _ = tx.send(result);
        });
        rx.await.unwrap_or_else(|_| {
            Err(TrainError::failed(
                "the train's task ended unexpectedly",
                "train task ended",
            ))
        })
    }
}

/// The user a train runs as: `nobody` for a station running as root, otherwise the
/// station's own (unprivileged) user, so that the station can always delete what the train
/// wrote.
fn train_user() -> (u32, u32) {
    // SAFETY: geteuid and getegid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid == 0 {
        (NOBODY, NOBODY)
    } else {
        (uid, gid)
    }
}

/// Writes `input` as `input_dir/input.arrow` (readable by the train) and makes the output
/// directory, owned by the train's user and private to it.
fn prepare(
    input_dir: &Path,
    output_dir: &Path,
    schema: SchemaRef,
    input: &[RecordBatch],
    (uid, gid): (u32, u32),
) -> std::io::Result<()> {
    std::fs::create_dir(input_dir)?;
    std::fs::set_permissions(input_dir, std::fs::Permissions::from_mode(0o755))?;
    let path = input_dir.join(INPUT_FILE);
    let file = std::fs::File::create(&path)?;
    let mut writer = FileWriter::try_new(std::io::BufWriter::new(file), &schema)
        .map_err(std::io::Error::other)?;
    for batch in input {
        writer.write(batch).map_err(std::io::Error::other)?;
    }
    writer.finish().map_err(std::io::Error::other)?;
    let mut inner = writer.into_inner().map_err(std::io::Error::other)?;
    inner.flush()?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    std::fs::create_dir(output_dir)?;
    std::os::unix::fs::chown(output_dir, Some(uid), Some(gid))?;
    std::fs::set_permissions(output_dir, std::fs::Permissions::from_mode(0o700))
}

/// Deletes a run directory, first making every directory in it writable (a train may
/// leave directories without permissions; the station owns them or runs as root).
fn remove_run_dir(dir: &Path) {
    fn open_up(dir: &Path) {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    open_up(&entry.path());
                }
            }
        }
    }
    open_up(dir);
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(dir = %dir.display(), error = %e, "cannot remove a train's run directory");
    }
}

/// The container: the image by id, the contract's environment, and the sandbox.
fn container_config(
    id: &str,
    args: &str,
    input_dir: &Path,
    output_dir: &Path,
    limits: &TrainPolicy,
    (uid, gid): (u32, u32),
    label: String,
) -> ContainerCreateBody {
    let memory = (limits.memory_mb * 1024 * 1024) as i64;
    ContainerCreateBody {
        image: Some(id.to_string()),
        user: Some(format!("{uid}:{gid}")),
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
}

enum Ended {
    Exited(Option<Result<i64, bollard::errors::Error>>),
    TimedOut,
    Abandoned,
}

type Waiting = oneshot::Sender<Result<(SchemaRef, Vec<RecordBatch>), TrainError>>;

impl Run {
    /// Creates, starts and waits for the container, then removes it, whatever happened.
    async fn contained(
        &self,
        docker: &Docker,
        config: ContainerCreateBody,
        waiting: &mut Waiting,
    ) -> Result<(), TrainError> {
        let created = docker.create_container(None, config).await.map_err(|e| {
            warn!(station = %self.station, error = %e, "cannot create a train container");
            TrainError::failed(
                "cannot run trains now (the station's log has why)",
                "cannot create the container",
            )
        })?;
        let id = created.id;
        let result = self.started(docker, &id, waiting).await;
        remove(docker, &id).await;
        result
    }

    fn failed(&self, category: String) -> TrainError {
        TrainError::failed(
            format!(
                "train {} failed; nothing was released (the station's audit log says how)",
                self.image
            ),
            category,
        )
    }

    async fn started(
        &self,
        docker: &Docker,
        id: &str,
        waiting: &mut Waiting,
    ) -> Result<(), TrainError> {
        let started = std::time::Instant::now();
        if let Err(e) = docker.start_container(id, None).await {
            warn!(station = %self.station, error = %e, "cannot start a train container");
            return Err(self.failed("cannot start the container".to_string()));
        }
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
            Ended::Exited(other) => {
                warn!(station = %self.station, error = ?other.and_then(|r| r.err()), "lost a train container while waiting for it");
                return Err(self.failed("lost the container".to_string()));
            }
            Ended::TimedOut => {
                kill(docker, id).await;
                self.log_tail(docker, id, "ran past its time limit").await;
                return Err(TrainError::failed(
                    format!(
                        "train {} ran past the station's time limit of {} s and was killed",
                        self.image,
                        self.timeout.as_secs()
                    ),
                    "train timed out",
                ));
            }
            Ended::Abandoned => {
                kill(docker, id).await;
                return Err(TrainError::failed(
                    "nobody waits for the train any more",
                    "train abandoned by the hub",
                ));
            }
        };
        info!(station = %self.station, image = %self.image, code, elapsed_ms = started.elapsed().as_millis() as u64, "train exited");
        if code == 0 {
            return Ok(());
        }
        let oom = tokio::time::timeout(TIDY_TIMEOUT, docker.inspect_container(id, None))
            .await
            .ok()
            .and_then(|r| r.ok())
            .and_then(|c| c.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false);
        self.log_tail(docker, id, "failed").await;
        Err(self.failed(if oom {
            "train ran out of memory".to_string()
        } else {
            format!("train exited with code {code}")
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
        let read = async {
            while let Some(Ok(chunk)) = logs.next().await {
                lines.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
                if lines.len() > 8192 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(TIDY_TIMEOUT, read).await;
        warn!(station = %self.station, image = %self.image, output = %lines.trim_end(), "train {what}");
    }
}

async fn kill(docker: &Docker, id: &str) {
    match tokio::time::timeout(
        TIDY_TIMEOUT,
        docker.kill_container(id, None::<KillContainerOptions>),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(container = %id, error = %e, "cannot kill a train container (removing it anyway)")
        }
        Err(_) => warn!(container = %id, "killing a train container timed out"),
    }
}

/// Removes a container (killing it if it still runs), retrying once.
async fn remove(docker: &Docker, id: &str) {
    for attempt in 0..2 {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match tokio::time::timeout(TIDY_TIMEOUT, docker.remove_container(id, Some(options))).await {
            Ok(Ok(())) => return,
            Ok(Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            })) => return,
            _ if attempt == 0 => tokio::time::sleep(Duration::from_millis(200)).await,
            Ok(Err(e)) => {
                warn!(container = %id, error = %e, "cannot remove a train container; the station removes it when it is next restarted and runs a train");
            }
            Err(_) => {
                warn!(container = %id, "removing a train container timed out; the station removes it when it is next restarted and runs a train");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_image_references_reach_the_docker_api() {
        for ok in [
            "railyard/histogram:dev",
            "histogram",
            "my-lab/k_means.v2:1.0",
            &format!("sha256:{}", "ab".repeat(32)),
        ] {
            assert!(is_image_reference(ok), "{ok}");
        }
        for bad in [
            "../info?",
            "../containers/json?",
            "railyard/summary-python:dev/get?",
            "railyard/histogram:dev/../../info",
            "Railyard/histogram",
            "histogram#x",
            "histo%2fgram",
            "a//b",
            "",
            "histogram:",
        ] {
            assert!(!is_image_reference(bad), "{bad}");
        }
    }
}
