//! What a containerized train costs, and how much of it is the container.
//!
//! `cargo bench --bench trains` (needs a Docker daemon and `scripts/build-trains`) starts
//! three loopback lung stations that allow the example images and times, through the Flight
//! SQL client: one grouped aggregate (the baseline: one round trip per station), the Rust
//! histogram train, and the Python summary train, each over all three stations at once.
//! Then it times one bare container of the histogram image created, started, waited for and
//! removed through the same Docker API the stations use (no input, so it exits at once), and
//! three such containers at once (as three stations run them): the part of a train run that
//! is container start and stop. Ratios are against the baseline measured in the same process.
//!
//! Environment: `RAILYARD_BENCH_RUNS` (timed runs per query, default 20).

#![allow(clippy::unwrap_used)] // a test or benchmark that cannot unwrap has failed

mod support;

use std::time::Instant;

use anyhow::{Context, Result};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{RemoveContainerOptionsBuilder, WaitContainerOptions};
use futures::StreamExt;
use railyard::client::HubClient;
use railyard::local::Governance;

use support::{median, print_ratios, time_query};

const BASELINE: &str = "SELECT sex, count(*), avg(age) FROM lung GROUP BY sex";
const HISTOGRAM: &str = "railyard/histogram:dev";
const SUMMARY: &str = "railyard/summary-python:dev";

/// One container of `image` through its whole life, as a station runs it (minus the data).
async fn bare_container(docker: &Docker, image: &str) -> Result<()> {
    let config = ContainerCreateBody {
        image: Some(image.to_string()),
        user: Some("65534:65534".to_string()),
        network_disabled: Some(true),
        host_config: Some(HostConfig {
            network_mode: Some("none".to_string()),
            readonly_rootfs: Some(true),
            cap_drop: Some(vec!["ALL".to_string()]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = docker.create_container(None, config).await?.id;
    docker.start_container(&id, None).await?;
    // The train exits 1 (no input): the wait reports it as an error, which is expected here.
    let _ = docker
        .wait_container(&id, None::<WaitContainerOptions>)
        .next()
        .await;
    docker
        .remove_container(
            &id,
            Some(RemoveContainerOptionsBuilder::new().force(true).build()),
        )
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let runs = support::runs(20);
    let docker = Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await
        .context("a Docker daemon")?;
    let mut ids = Vec::new();
    for image in [HISTOGRAM, SUMMARY] {
        let inspect = docker
            .inspect_image(image)
            .await
            .with_context(|| format!("image {image}: run scripts/build-trains first"))?;
        ids.push(format!("\"{}\"", inspect.id.unwrap_or_default()));
    }
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("[trains]\nallowed = [{}]\n", ids.join(", ")),
    )?;
    let governance = Governance::new(Some(&policy), dir.path())?;
    let federation = support::lung_federation(&governance).await?;
    let mut client = HubClient::connect(&federation.hub_url).await?;
    let mut time = async |sql: &str| time_query(&mut client, sql, 2, runs).await;
    let baseline = time(BASELINE).await?;
    let histogram = time(&format!(
        "SELECT bin_lower, sum(n) FROM train('{HISTOGRAM}', 'SELECT age FROM lung', \
         '{{\"column\": \"age\", \"edges\": [40, 50, 60, 70, 80]}}') GROUP BY bin_lower"
    ))
    .await?;
    let summary = time(&format!(
        "SELECT level, sum(n) FROM train('{SUMMARY}', 'SELECT wt_loss, sex FROM lung', \
         '{{\"column\": \"wt_loss\", \"by\": \"sex\"}}') GROUP BY level"
    ))
    .await?;
    federation.shutdown().await?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        bare_container(&docker, HISTOGRAM).await?;
        samples.push(t.elapsed());
    }
    let container = median(samples);
    // As in a train over three stations: three containers at once.
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        futures::future::try_join_all((0..3).map(|_| bare_container(&docker, HISTOGRAM))).await?;
        samples.push(t.elapsed());
    }
    let containers = median(samples);

    println!("three loopback lung stations, median of {runs} runs through Flight SQL\n");
    print_ratios(
        baseline,
        &[
            ("baseline: one grouped aggregate", baseline),
            ("histogram train (Rust, FROM scratch)", histogram),
            ("summary train (Python + pyarrow)", summary),
            ("one bare container: create, start, wait, rm", container),
            ("three bare containers at once", containers),
        ],
    );
    println!(
        "\ncontainer start and stop (three at once): {:.0} % of the histogram train's time",
        100.0 * containers.as_secs_f64() / histogram.as_secs_f64()
    );
    Ok(())
}
