//! What the benches share: timing one query through the Flight SQL client.

use std::time::{Duration, Instant};

use anyhow::Result;
use railyard::client::HubClient;

pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `sql` `warmup` times untimed, then `runs` times; returns the median time.
pub async fn time_query(
    client: &mut HubClient,
    sql: &str,
    warmup: usize,
    runs: usize,
) -> Result<Duration> {
    for _ in 0..warmup {
        client.query(sql).await?;
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        client.query(sql).await?;
        samples.push(t.elapsed());
    }
    Ok(median(samples))
}
